"""GradAccumulator in everyday moves that an independent check found broken (issue 11): a compiled train step, a
refused add_param_group, meta-device params, a failing update, frozen params and checkpoints, malformed state
dicts, extreme weights, the wrapped optimizer's own state_dict. Each test names the bug it pins."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from fusedaccum import GradAccumulator

N = 3


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def batches(count: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g).to(dtype), torch.randn(4, 2, generator=g).to(dtype)) for _ in range(count)]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def micro_step(model, acc, batch, weight=None) -> None:
    loss_of(model, batch).backward()
    acc.step(weight=weight)
    acc.zero_grad()


def through_disk(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------- bug 1: torch.compile
@pytest.mark.parametrize("how", ["compiled_train_step", "compiled_acc_step"])
def test_compiled_train_step_matches_eager(how):
    """Bug 1: inside a compiled train step, acc.step() moved the grads into the masters but never advanced the
    window, so no update ever happened. step() now runs eagerly (a graph break at the call): the compiled run updates
    on the same micro-steps as the eager one, over several windows, without a recompilation per micro-step; with
    acc.step compiled alone the params are bit-identical, with the model's forward and backward compiled too they
    agree to Inductor's float32 rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_model, compiled_model = make_model(), make_model()
    eager = GradAccumulator(torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9), N)
    compiled = GradAccumulator(torch.optim.SGD(compiled_model.parameters(), lr=0.1, momentum=0.9), N)

    def train_step(model, acc, batch):
        loss_of(model, batch).backward()
        acc.step()
        acc.zero_grad()

    if how == "compiled_train_step":
        compiled_step = torch.compile(train_step)
    else:
        step = torch.compile(compiled.step)

        def compiled_step(model, acc, batch):
            loss_of(model, batch).backward()
            step()
            acc.zero_grad()

    updates = 0
    for batch in batches(3 * N):
        train_step(eager_model, eager, batch)
        compiled_step(compiled_model, compiled, batch)
        assert compiled.micro_step == eager.micro_step and compiled.stepped == eager.stepped
        updates += compiled.stepped
    assert updates == 3
    if how == "compiled_acc_step":
        assert_same(params_of(compiled_model), params_of(eager_model))
    else:
        for a, b in zip(params_of(compiled_model), params_of(eager_model)):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    # One graph per compiled frame, compiled once: the window's position is not baked into a guard.
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


# ------------------------------------------------------------------------- bug 7: refused add_param_group
def test_refused_add_param_group_leaves_the_wrapped_optimizer_alone():
    """Bug 7: a group the wrapper refuses (float64 params) was still added to the wrapped optimizer, and every later
    step() raised."""
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N)
    data = batches(N)
    micro_step(model, acc, data[0])
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        acc.add_param_group({"params": [extra]})
    assert len(acc.optimizer.param_groups) == 1 and len(acc.param_groups) == 1
    for batch in data[1:]:
        micro_step(model, acc, batch)
    assert acc.stepped


# ---------------------------------------------------------------------- bug 8: meta params, failing update
def test_meta_device_params_are_refused_at_construction():
    """Bug 8: meta-device params were accepted; the window's last step() then failed with NotImplementedError after
    counting the micro-step, and step() never updated again."""
    with torch.device("meta"):
        model = make_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*meta device"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N)


class FailsOnce(torch.optim.SGD):
    """An optimizer whose first step raises (any failure during the update)."""

    failed = False

    def step(self, closure=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("optimizer failure")
        return super().step(closure)


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_failed_update_drops_the_window_instead_of_wedging(in_backward):
    """Bug 8, general form: any exception between counting the last micro-step and the update left micro_step at
    accumulation_steps, and step() never updated again. Now the failed window is dropped (the error says so) and
    the next window updates."""
    model = make_model()
    acc = GradAccumulator(FailsOnce(model.parameters(), lr=0.1), N, accumulate_in_backward=in_backward)
    data = batches(2 * N)
    for batch in data[: N - 1]:
        micro_step(model, acc, batch)
    loss_of(model, data[N - 1]).backward()
    with pytest.raises(RuntimeError, match="optimizer failure"):
        acc.step()
    assert acc.micro_step == 0 and not acc.stepped
    before = params_of(model)
    for batch in data[N:]:
        micro_step(model, acc, batch)
    assert acc.stepped and acc.micro_step == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))


# ------------------------------------------------------------------------------- smaller things
def test_flush_as_the_first_update_after_a_resume_does_not_warn():
    """After a resume, a flush() that applies the first update must count as optimizer.step() for an LR scheduler
    (torch warned "lr_scheduler.step() before optimizer.step()", contrary to the README)."""
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N)
    sched = torch.optim.lr_scheduler.StepLR(acc, step_size=1, gamma=0.5)
    data = batches(2)
    micro_step(model, acc, data[0])
    state = through_disk({"acc": acc.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()})

    model2 = make_model(seed=5)
    model2.load_state_dict(state["model"])
    acc2 = GradAccumulator(torch.optim.SGD(model2.parameters(), lr=0.1), N)
    acc2.load_state_dict(state["acc"])
    sched2 = torch.optim.lr_scheduler.StepLR(acc2, step_size=1, gamma=0.5)
    sched2.load_state_dict(state["sched"])
    micro_step(model2, acc2, data[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc2.flush()
        sched2.step()


@pytest.mark.parametrize("option", ["master_weights", "accumulate_in_backward"])
def test_boolean_options_refuse_truthy_strings(option):
    model = make_model()
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, **{option: "no"})


def test_closure_that_is_not_callable_is_refused():
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N)
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(TypeError, match="closure must be a callable"):
        acc.step(5)
    assert acc.micro_step == 0 and all(p.grad is not None for p in model.parameters())


def test_params_sharing_one_grad_are_named():
    """Two params handed one .grad tensor: the refusal names the params, not the op's internal list indices."""
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    acc = GradAccumulator(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), N)
    a.grad = b.grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and param_groups\[1\]\['params'\]\[0\] "
                                         r"have one \.grad tensor"):
        acc.step()
    assert acc.micro_step == 0


def test_overlapping_low_precision_params_with_master_weights_are_refused_at_construction():
    """Before: the fp32 copies were stepped, then the write-back refused: nothing applied, but the state moved."""
    storage = torch.randn(10).bfloat16()
    a = nn.Parameter(storage[:6])
    b = nn.Parameter(storage[4:])
    with pytest.raises(ValueError, match="share memory"):
        GradAccumulator(torch.optim.SGD([a, b], lr=0.1), N, master_weights=True)
    GradAccumulator(torch.optim.SGD([a, b], lr=0.1), N)  # without master weights nothing is written back


# ------------------------------------------------------------------ bug 2: a frozen param and checkpoints
def deep_equal(a, b) -> bool:
    """Bitwise equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8)
                                                       if b.dim() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def build(dtype: torch.dtype, master_weights: bool, frozen: bool, seed: int = 0):
    model = make_model(seed, dtype)
    if frozen:
        model[0].bias.requires_grad_(False)
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N, master_weights=master_weights)
    return model, acc


@pytest.mark.parametrize("save_at", [N + 1, 2 * N])  # mid-window, the frozen param untouched in it; a boundary
@pytest.mark.parametrize(("dtype", "master_weights"), [(torch.float32, False), (torch.bfloat16, True)])
def test_checkpoint_after_freezing_a_trained_param_loads_into_a_fresh_frozen_setup(save_at, dtype, master_weights):
    """Bug 2: a param that ever had a master stayed in the layout forever, so after freezing it every checkpoint
    was refused by a freshly built identical setup with that param frozen ("another parameter layout"). Now it
    leaves the layout when its last window ends, and the resumed run is bit-identical to the uninterrupted one
    (with master_weights its optimizer state goes back to the param, as in the fresh setup)."""
    data = batches(4 * N, dtype=dtype)
    model, acc = build(dtype, master_weights, frozen=False)
    for i, batch in enumerate(data):
        if i == N - 1:
            model[0].bias.requires_grad_(False)  # frozen in the middle of the first window
        if i == save_at:
            state = through_disk({"model": model.state_dict(), "acc": acc.state_dict()})
            acc.optimizer.state_dict()  # the wrapped optimizer's own state dict works too (bug 4)
        micro_step(model, acc, batch)
    assert acc.stepped

    resumed_model, resumed = build(dtype, master_weights, frozen=True, seed=7)
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["acc"])
    for batch in data[save_at:]:
        micro_step(resumed_model, resumed, batch)
    assert_same(params_of(resumed_model), params_of(model))
    assert deep_equal(through_disk(resumed.state_dict()), through_disk(acc.state_dict()))


# ------------------------------------------------------------------------ bug 3: malformed state dicts
def _mid_window_state():
    model = make_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N)
    data = batches(N + 1)
    for batch in data:
        micro_step(model, acc, batch)  # one update (inner state exists), then one micro-step of the next window
    loss_of(model, batches(1, seed=9)[0]).backward()  # grads waiting for the next step
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
    "micro_step_past_the_window": (_edit(micro_step=N), "micro_step=3 with accumulation_steps=3"),
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
    assert deep_equal(after, before)
    micro_step(model, acc, batches(1, seed=3)[0])  # and it still trains
    micro_step(model, acc, batches(1, seed=4)[0])
    assert acc.stepped


def test_load_state_dict_refuses_what_is_not_a_dict():
    model, acc = _mid_window_state()
    with pytest.raises(TypeError, match="expects a dict, got a list"):
        acc.load_state_dict([1, 2])


# --------------------------------------------------------- bug 4: the wrapped optimizer's own state_dict
def test_wrapped_optimizer_state_dict_with_master_weights_works_and_round_trips():
    """Bug 4: with master_weights=True the wrapped optimizer's state is keyed by the float32 copies, which are not in
    its param_groups, so acc.optimizer.state_dict() raised KeyError after the first update. Now it works, keeps the
    float32 state, leaves the model's params in the param_groups, and loads back into a fresh wrapper's optimizer
    unchanged (the master weights themselves are in acc.state_dict(), which resumes bit-identically)."""
    dtype = torch.bfloat16
    data = batches(3 * N, dtype=dtype)
    model, acc = build(dtype, master_weights=True, frozen=False)
    for batch in data[: 2 * N]:
        micro_step(model, acc, batch)
    saved = through_disk(acc.optimizer.state_dict())
    assert all(p is q for p, q in zip(acc.param_groups[0]["params"], model.parameters()))
    assert saved["state"] and all(v.dtype == torch.float32 for s in saved["state"].values()
                                  for k, v in s.items() if k != "step")
    assert deep_equal(saved["state"], through_disk(acc.state_dict())["state"])

    resumed_model, resumed = build(dtype, master_weights=True, frozen=False, seed=3)
    resumed.optimizer.load_state_dict(saved)
    assert all(p is q for p, q in zip(resumed.param_groups[0]["params"], resumed_model.parameters()))
    assert deep_equal(through_disk(resumed.optimizer.state_dict()), saved)
    for batch in data[2 * N:]:
        micro_step(resumed_model, resumed, batch)
    assert resumed.stepped and resumed.optimizer.state_dict()["state"][0]["step"].item() == 3
    with pytest.raises(ValueError, match="different number of parameter groups"):
        resumed.optimizer.load_state_dict({"state": {}, "param_groups": []})
    assert all(p is q for p, q in zip(resumed.param_groups[0]["params"], resumed_model.parameters()))


# ------------------------------------------------------------------------------ bug 5: extreme weights
def weighted_window_update(weights, grads_scale: float = 1.0, reduction: str = "mean"):
    """SGD(lr=1) on a zero param, one window of explicit grads with these weights: returns -param (the window's
    gradient), the float64 expectation and the bound on float32 rounding (a few units of roundoff of the sum of
    the terms' magnitudes, per element)."""
    g = torch.Generator().manual_seed(11)
    grads = [torch.randn(64, generator=g) * grads_scale for _ in weights]
    p = nn.Parameter(torch.zeros(64))
    acc = GradAccumulator(torch.optim.SGD([p], lr=1.0), len(weights), reduction=reduction)
    for w, grad in zip(weights, grads):
        p.grad = grad.clone()
        acc.step(weight=w)
    assert acc.stepped and acc.skipped_windows == 0
    total = sum(w * grad.double() for w, grad in zip(weights, grads))
    magnitude = sum(w * grad.double().abs() for w, grad in zip(weights, grads))
    divisor = math.fsum(weights) if reduction == "mean" else 1.0
    bound = (len(weights) + 3) * 2.0**-24 * magnitude / divisor
    return -p.detach().double(), total / divisor, bound


@pytest.mark.parametrize("weights", [[1.2e-38] * 4, [1e38] * 4, [3e38, 1e38, 2e38], [2e-38, 7e-36, 1.5e-37],
                                     [1e-15, 1e15, 3.0]])
def test_extreme_weights_give_the_weighted_mean(weights):
    """Bug 5: equal weights of 1.2e-38 made the products w*g subnormal (the mean 0.7% off, small grads 0), equal
    weights of 1e38 overflowed w*g and the window was dropped as non-finite. The masters now accumulate w_i / ref
    with ref a power of two near the window's first weight: the weighted mean is right to float32 rounding."""
    got, expected, bound = weighted_window_update(weights)
    assert ((got - expected).abs() <= bound).all(), ((got - expected).abs() / bound).max()


def test_tiny_gradient_survives_tiny_weights():
    got, expected, bound = weighted_window_update([1.2e-38] * 4, grads_scale=4e-8)
    assert (got != 0).all() and ((got - expected).abs() <= bound).all()


def test_weights_scaled_by_a_power_of_two_give_the_same_bits():
    """The normalisation is exact: weights w_i and w_i * 2**k give bit-identical updates, and so do the token counts
    the wrapper always handled (their bits did not change)."""
    base, _, _ = weighted_window_update([3.0, 5.0, 7.0, 11.0])
    for k in (-120, -30, 1, 40, 100):
        scaled, _, _ = weighted_window_update([math.ldexp(w, k) for w in (3.0, 5.0, 7.0, 11.0)])
        assert torch.equal(scaled, base), k


def test_sum_reduction_with_large_weights():
    got, expected, bound = weighted_window_update([1e-30, 3e-30], reduction="sum")
    assert ((got - expected).abs() <= bound).all()


def test_weights_too_far_apart_are_refused_before_anything_changes():
    p = nn.Parameter(torch.zeros(8))
    acc = GradAccumulator(torch.optim.SGD([p], lr=1.0), 3)
    p.grad = torch.ones(8)
    acc.step(weight=1e-37)
    p.grad = torch.ones(8)
    with pytest.raises(ValueError, match="more than float32's range apart"):
        acc.step(weight=1e38)
    assert acc.micro_step == 1 and p.grad is not None
    acc.step(weight=3e-37)
    p.grad = torch.ones(8)
    acc.step(weight=2e-37)
    assert acc.stepped and torch.allclose(p.detach(), torch.full((8,), -1.0))


# ------------------------------------------------------- bug 6: accumulate_in_backward and a late unfreeze
class TwoBackwards(nn.Module):
    """Two losses, two backwards per micro-step: in .grad they would sum in bf16, in the masters in fp32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 7).bfloat16()
        self.head = nn.Linear(7, 2).bfloat16()

    def losses(self, batch):
        x, y = batch
        h = torch.tanh(self.body(x))
        return [nn.functional.mse_loss(self.head(h).float(), y.float()), h.float().pow(2).mean()]


UNFREEZE_AT = 2 * N - 1  # the last micro-step of the second window: its norm is summed in hook order


def run_with_late_unfreeze(data, save_at=None, peek_state_dict=False, resume_from=None):
    model = TwoBackwards()
    # Frozen when the hooks are registered (a resume rebuilds the model as it was when saved).
    model.body.bias.requires_grad_(resume_from is not None and resume_from["at"] >= UNFREEZE_AT)
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N, accumulate_in_backward=True,
                          max_grad_norm=0.05, master_weights=True)
    start = 0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        acc.load_state_dict(resume_from["acc"])
        start = resume_from["at"]
    saved = None
    for i, batch in enumerate(data[start:], start):
        if i == UNFREEZE_AT:
            model.body.bias.requires_grad_(True)  # unfrozen mid-run, no wrapper call in between
            if peek_state_dict:
                acc.state_dict()
        if i == save_at:
            saved = through_disk({"model": model.state_dict(), "acc": acc.state_dict(), "at": i})
        first, second = model.losses(batch)
        first.backward(retain_graph=True)
        second.backward()
        acc.step()
        acc.zero_grad()
    return through_disk({"params": params_of(model), "acc": acc.state_dict()}), saved


def test_in_backward_param_unfrozen_later_takes_the_hook_path():
    """Bug 6: a param frozen when the hooks were registered and unfrozen later had no hook: its grad stayed alive
    through backward and was added at step() (two backwards summed in bf16 first, its norm term added last). A
    resumed wrapper, or one that merely had state_dict() called, hooked it: not bit-identical. Now every float
    param is hooked, frozen or not, and an unfrozen one gets its master from its hook."""
    data = batches(4 * N, dtype=torch.bfloat16)
    plain, _ = run_with_late_unfreeze(data)
    peeked, _ = run_with_late_unfreeze(data, peek_state_dict=True)
    assert deep_equal(peeked, plain)
    _, saved = run_with_late_unfreeze(data, save_at=UNFREEZE_AT)
    resumed, _ = run_with_late_unfreeze(data, resume_from=saved)
    assert deep_equal(resumed, plain)


def test_in_backward_sparse_grad_discards_the_window_with_a_clear_error():
    """A sparse grad in accumulate_in_backward mode raised inside backward after earlier grads had been added, and
    left them in a half-counted micro-step. Now the window is dropped and the error says so: the next window is
    exactly a fresh wrapper's."""
    def build_sparse():
        torch.manual_seed(0)
        embedding, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1)
        acc = GradAccumulator(torch.optim.SGD([*embedding.parameters(), *head.parameters()], lr=0.1), N,
                              accumulate_in_backward=True)
        return embedding, head, acc

    embedding, head, acc = build_sparse()
    tokens = torch.tensor([1, 2, 3])
    head(nn.functional.embedding(tokens, embedding.weight.detach())).sum().backward()  # a first micro-step
    acc.step()
    with pytest.raises(ValueError, match="sparse .*The window was discarded"):
        head(embedding(tokens)).sum().backward()  # the dense head's grads arrive first, then the sparse one
    assert acc.micro_step == 0
    fresh_embedding, fresh_head, fresh = build_sparse()
    for e, h, a in ((embedding, head, acc), (fresh_embedding, fresh_head, fresh)):
        e.weight.requires_grad_(False)
        e.weight.grad = None
        for _ in range(N):
            h(e(tokens)).sum().backward()
            a.step()
        assert a.stepped
    assert_same(params_of(head), params_of(fresh_head))
