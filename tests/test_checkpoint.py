"""State dicts (fusedaccum/_checkpoint.py): resume bit-identically at any micro-step; another layout is refused.

Small models and fresh random data, CPU. Backends: "cpu" (the compiled C++ kernels) unless a test says otherwise,
and "reference" where the backend matters.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wrapper_helpers import (
    D_HID,
    D_IN,
    D_OUT,
    N,
    assert_params_equal,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    restored,
    run_windows,
    saved,
    snapshot,
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
