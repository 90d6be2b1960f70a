"""State dicts (fusedaccum/_checkpoint.py): resume bit-identically at any micro-step; another layout is refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wrapper_helpers import (
    D_HID,
    D_IN,
    D_OUT,
    N_SMALL,
    N,
    assert_params_equal,
    assert_same,
    bits_equal,
    build_adamw,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    params_of,
    restored,
    run_windows,
    saved,
    small_batches,
    small_loss,
    small_micro_step,
    small_model,
    snapshot,
    through_disk,
)

from fusedaccum import GradAccumulator


@pytest.mark.parametrize("k", range(N))
@pytest.mark.parametrize("variant", ["adam_fp32_weighted_clipped", "adamw_bf16_master_weights"])
def test_pitfall_9_checkpoint_resume_every_k(k, variant):
    """PITFALLS row 9: a checkpoint taken mid-window loses the accumulated gradients.

    Save after micro-step k of the second window, load into a fresh model + optimizer + wrapper, go on: the
    parameters are bit-identical to a run that never stopped."""
    bf16 = variant.startswith("adamw_bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    xs, ys = make_data(3, seed=37, dtype=dtype)
    weights = [[float(3 + (w * N + i) % 5) for i in range(N)] for w in range(3)] if not bf16 else None

    def build(seed):
        model = make_model(seed, dtype)
        if bf16:
            acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-3), N, master_weights=True,
                                  backend="cpu")
        else:
            acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, max_grad_norm=0.3,
                                  backend="cpu")
        return model, acc

    stream = [(w, i) for w in range(3) for i in range(N)]

    def feed(model, acc, items):
        for w, i in items:
            loss_of(model, xs[w, i], ys[w, i]).backward()
            acc.step(weight=None if weights is None else weights[w][i])
            acc.zero_grad()

    full_model, full_acc = build(0)
    feed(full_model, full_acc, stream)

    cut = N + k
    model, acc = build(0)
    feed(model, acc, stream[:cut])
    assert acc.micro_step == k
    checkpoint = saved({"model": model.state_dict(), "acc": acc.state_dict()})
    del model, acc

    fresh_model, fresh_acc = build(99)  # other initial values: everything must come from the checkpoint
    state = restored(checkpoint)
    if bf16 and k % 2:
        # master_weights: the load order must not matter (loading the model after the wrapper is fine).
        fresh_acc.load_state_dict(state["acc"])
        fresh_model.load_state_dict(state["model"])
    else:
        fresh_model.load_state_dict(state["model"])
        fresh_acc.load_state_dict(state["acc"])
    assert fresh_acc.micro_step == k
    feed(fresh_model, fresh_acc, stream[cut:])
    assert_params_equal(fresh_model, full_model)
    assert deep_equal(fresh_acc.state_dict()["state"], full_acc.state_dict()["state"])


def test_state_dict_from_other_layout_is_refused():
    """A state dict from another parameter layout: ValueError naming the difference; nothing changes."""
    model = make_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu")
    xs, ys = make_data(1)
    run_windows(model, acc, xs, ys)
    loss_of(model, xs[0, 0], ys[0, 0]).backward()
    acc.step()
    other = nn.Sequential(nn.Linear(D_IN, D_HID + 1), nn.Tanh(), nn.Linear(D_HID + 1, D_OUT))
    other_acc = GradAccumulator(torch.optim.Adam(other.parameters(), lr=1e-2), N, backend="cpu")
    loss_of(other, xs[0, 0], ys[0, 0]).backward()
    other_acc.step()
    foreign = restored(saved(other_acc.state_dict()))
    before = snapshot(model, acc)
    with pytest.raises(ValueError, match="another parameter layout"):
        acc.load_state_dict(foreign)
    assert deep_equal(snapshot(model, acc), before)
    frozen = make_model()
    frozen[0].bias.requires_grad_(False)
    frozen_acc = GradAccumulator(torch.optim.Adam(frozen.parameters(), lr=1e-2), N, backend="cpu")
    with pytest.raises(ValueError, match="another parameter layout"):
        frozen_acc.load_state_dict(restored(saved(acc.state_dict())))


def test_window_boundary_checkpoint_leaves_the_masters_out():
    """At a window boundary the masters hold nothing of use (the next window's first grads overwrite them): the
    state dict saves none (4 B per trainable param less), and it loads and continues bit-identically, in either
    order of loading model and wrapper."""
    model = make_model()
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N)
    xs, ys = make_data(3, seed=81)
    run_windows(model, acc, xs[:1], ys[:1])
    boundary = acc.state_dict()
    assert boundary["fusedaccum"]["master_grads"] == []
    size = len(saved(boundary))
    loss_of(model, xs[1, 0], ys[1, 0]).backward()
    acc.step()
    mid = acc.state_dict()
    masters = sum(t.numel() for t in mid["fusedaccum"]["master_grads"])
    assert masters >= sum(p.numel() for p in model.parameters())
    assert len(saved(mid)) - size >= 4 * masters

    resumed_model, original = make_model(seed=5), make_model()
    resumed = GradAccumulator(torch.optim.AdamW(resumed_model.parameters(), lr=1e-2), N)
    original_acc = GradAccumulator(torch.optim.AdamW(original.parameters(), lr=1e-2), N)
    run_windows(original, original_acc, xs[:1], ys[:1])
    resumed.load_state_dict(restored(saved(boundary)))
    resumed_model.load_state_dict(original.state_dict())
    run_windows(resumed_model, resumed, xs[1:], ys[1:])
    run_windows(original, original_acc, xs[1:], ys[1:])
    assert_params_equal(resumed_model, original)


# save_at: mid-window (the frozen param untouched in that window), and a window boundary
@pytest.mark.parametrize("save_at", [N_SMALL + 1, 2 * N_SMALL])
@pytest.mark.parametrize(("dtype", "master_weights"), [(torch.float32, False), (torch.bfloat16, True)])
def test_checkpoint_after_freezing_a_trained_param_loads_into_a_fresh_frozen_setup(save_at, dtype, master_weights):
    """Bug 2: a param that ever had a master stayed in the layout forever, so after freezing it every checkpoint
    was refused by a freshly built identical setup with that param frozen ("another parameter layout"). Now it
    leaves the layout when its last window ends, and the resumed run is bit-identical to the uninterrupted one
    (with master_weights its optimizer state goes back to the param, as in the fresh setup)."""
    data = small_batches(4 * N_SMALL, dtype=dtype)
    model, acc = build_adamw(dtype, master_weights, frozen=False)
    for i, batch in enumerate(data):
        if i == N_SMALL - 1:
            model[0].bias.requires_grad_(False)  # frozen in the middle of the first window
        if i == save_at:
            state = through_disk({"model": model.state_dict(), "acc": acc.state_dict()})
            acc.optimizer.state_dict()  # the wrapped optimizer's own state dict works too (bug 4)
        small_micro_step(model, acc, batch)
    assert acc.stepped

    resumed_model, resumed = build_adamw(dtype, master_weights, frozen=True, seed=7)
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["acc"])
    for batch in data[save_at:]:
        small_micro_step(resumed_model, resumed, batch)
    assert_same(params_of(resumed_model), params_of(model))
    assert bits_equal(through_disk(resumed.state_dict()), through_disk(acc.state_dict()))


def _mid_window_state():
    model = small_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N_SMALL)
    data = small_batches(N_SMALL + 1)
    for batch in data:
        small_micro_step(model, acc, batch)  # one update (inner state exists), then one micro-step of the next window
    small_loss(model, small_batches(1, seed=9)[0]).backward()  # grads waiting for the next step
    return model, acc


def _edit(**changes):
    def apply(entry):
        for key, value in changes.items():
            if value is _DELETE:
                del entry[key]
            else:
                entry[key] = value(entry) if callable(value) else value
        return entry
    return apply


_DELETE = object()


MALFORMED = {
    "entry_is_a_string": (lambda entry: "fusedaccum", "entry must be a dict, got a str"),
    "missing_layout": (_edit(layout=_DELETE), "has no 'layout' field"),
    "missing_touched": (_edit(touched=_DELETE), "has no 'touched' field"),
    "micro_step_past_the_window": (_edit(micro_step=N_SMALL), "micro_step=3 with accumulation_steps=3"),
    "negative_micro_step": (_edit(micro_step=-1), "micro_step=-1"),
    "micro_step_not_int": (_edit(micro_step=1.0), "'micro_step'] is a float"),
    "zero_accumulation_steps": (_edit(accumulation_steps=0, micro_step=0, weight_sum=0.0), "accumulation_steps=0"),
    "negative_weight_sum": (_edit(weight_sum=-1.0), "weight_sum=-1.0"),
    "nan_weight_sum": (_edit(weight_sum=float("nan")), "weight_sum=nan"),
    "weight_sum_not_the_count": (_edit(weight_sum=5.0), "weight_sum=5.0 after 1 unweighted micro-steps"),
    "weighted_none_mid_window": (_edit(weighted=None), "weighted=None at micro_step 1"),
    "touched_too_short": (_edit(touched=lambda e: e["touched"][:-1]), "'touched' must be 4 bools"),
    "touched_not_bools": (_edit(touched=lambda e: [1] * len(e["touched"])), "'touched' must be 4 bools"),
    "master_grads_truncated": (_edit(master_grads=[]), "0 master_grads buffers saved"),
    "master_grads_int64": (_edit(master_grads=lambda e: [m.long() for m in e["master_grads"]]),
                           "master_grads[0] must be a float32 tensor"),
    "master_grads_wrong_size": (_edit(master_grads=lambda e: [m[:-1] for m in e["master_grads"]]),
                                "master_grads[0] must be a float32 tensor of shape"),
    "master_weights_flag_not_bool": (_edit(master_weights="no"), "'master_weights'] is a str"),
    "unknown_reduction": (_edit(reduction="max"), "reduction='max'"),
    "extra_master_weight": (_edit(master_weight_tensors={0: torch.zeros(7, 5)}), "master_weight_tensors for params"),
    "grad_norm_not_a_tensor": (_edit(grad_norm=1.5), "'grad_norm'] is a float"),
    "layout_garbage": (_edit(layout={"x": 1}), "another parameter layout"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_state_dict_is_refused_and_changes_nothing(case):
    """Bug 3: load_state_dict loaded the wrapped optimizer first and trusted the "fusedaccum" entry: a missing or
    malformed field raised a bare KeyError/AttributeError after the optimizer state had been replaced, and
    inconsistent values were accepted (a micro_step past the window wedged the wrapper for good). Now the whole
    entry is checked first; a refusal names the field and leaves the wrapper, its masters, the grads and the
    wrapped optimizer exactly as they were."""
    donor_model, donor = _mid_window_state()
    state = through_disk(donor.state_dict())
    edit, message = MALFORMED[case]
    state["fusedaccum"] = edit(state["fusedaccum"])
    state["state"] = {k: {n: v + 1 if n != "step" else v for n, v in s.items()} for k, s in state["state"].items()}

    model, acc = _mid_window_state()
    before = through_disk({"acc": acc.state_dict(), "inner": acc.optimizer.state_dict(),
                           "grads": [p.grad for p in model.parameters()]})
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        acc.load_state_dict(state)
    after = through_disk({"acc": acc.state_dict(), "inner": acc.optimizer.state_dict(),
                          "grads": [p.grad for p in model.parameters()]})
    assert bits_equal(after, before)
    small_micro_step(model, acc, small_batches(1, seed=3)[0])  # and it still trains
    small_micro_step(model, acc, small_batches(1, seed=4)[0])
    assert acc.stepped


def test_load_state_dict_refuses_what_is_not_a_dict():
    model, acc = _mid_window_state()
    with pytest.raises(TypeError, match="expects a dict, got a list"):
        acc.load_state_dict([1, 2])
