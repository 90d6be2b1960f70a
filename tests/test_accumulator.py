"""GradAccumulator: exact large-batch maths, the Optimizer contract, and every single-process pitfall of
PITFALLS.md made impossible (each such test names its row).

Small models and fresh random data, CPU. Backends: "cpu" (the compiled C++ kernels) unless a test says otherwise,
and "reference" where the backend matters.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fusedaccum import GradAccumulator

N = 4  # micro-batches per window
B = 8  # samples per micro-batch
D_IN, D_HID, D_OUT = 6, 16, 3


# ------------------------------------------------------------------------------------------------ helpers
def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    # tanh, not relu: no exactly-dead units, so no gradient sits at the rounding-noise level (Adam would amplify it).
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)).to(dtype)


def make_data(windows: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(windows, N, B, D_IN, generator=g).to(dtype)
    ys = torch.randn(windows, N, B, D_OUT, generator=g).to(dtype)
    return xs, ys


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x).float(), y.float())


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:g} * {scale:.3e}"


def assert_params_rel(model: nn.Module, reference: nn.Module, tol: float) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert_rel(a.detach(), b.detach(), tol, name)


def assert_params_equal(model: nn.Module, reference: nn.Module) -> None:
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name} differs"


def deep_equal(a, b) -> bool:
    """Bitwise equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype:
            return False
        if a.shape != b.shape:
            return False
        # nan == nan here: a skipped window's masters may hold nan, and "unchanged" must still compare equal.
        return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def snapshot(model: nn.Module, acc: GradAccumulator) -> dict:
    """Everything an error must leave alone: params, grads, the wrapper's and the inner optimizer's state."""
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "acc": torch.load(buffer, weights_only=False),
        "micro_step": acc.micro_step,
        "skipped": acc.skipped_windows,
        "stepped": acc.stepped,
    }


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def restored(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def run_windows(model, acc, xs, ys, weights=None, after_step=None) -> None:
    for w in range(xs.shape[0]):
        for i in range(xs.shape[1]):
            loss_of(model, xs[w, i], ys[w, i]).backward()
            acc.step(weight=None if weights is None else weights[w][i])
            acc.zero_grad()
            if after_step is not None:
                after_step()


def run_large_batch(model, opt, xs, ys) -> None:
    for w in range(xs.shape[0]):
        loss_of(model, xs[w].reshape(-1, xs.shape[-1]), ys[w].reshape(-1, ys.shape[-1])).backward()
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------------------------------ equivalence
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
}
if hasattr(torch.optim, "Adafactor"):
    OPTIMIZERS["adafactor"] = lambda p: torch.optim.Adafactor(p, lr=1e-2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equivalence_with_large_batch(name):
    """N micro-batches of B through the wrapper == one batch of N*B through the plain optimizer, 3 updates."""
    make_opt = OPTIMIZERS[name]
    xs, ys = make_data(3)
    model, reference = make_model(), make_model()
    acc = GradAccumulator(make_opt(model.parameters()), N, backend="cpu")
    run_windows(model, acc, xs, ys)
    run_large_batch(reference, make_opt(reference.parameters()), xs, ys)
    assert acc.micro_step == 0 and acc.stepped
    assert_params_rel(model, reference, 1e-6)
    # The updates really happened (a test that compares two unchanged models proves nothing).
    assert not torch.equal(model[0].weight, make_model()[0].weight)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_equivalence_per_backend_and_param_groups(backend):
    """Same large-batch equality with two param groups (different lr), on each backend that runs here."""
    xs, ys = make_data(3, seed=5)
    model, reference = make_model(3), make_model(3)

    def groups(m):
        return [{"params": m[0].parameters(), "lr": 1e-2}, {"params": m[2].parameters(), "lr": 3e-3}]

    acc = GradAccumulator(torch.optim.AdamW(groups(model)), N, backend=backend)
    run_windows(model, acc, xs, ys)
    run_large_batch(reference, torch.optim.AdamW(groups(reference)), xs, ys)
    assert_params_rel(model, reference, 1e-6)


def test_sum_reduction():
    """reduction="sum": the window's gradient is the plain sum of the micro-batch gradients."""
    xs, ys = make_data(2, seed=7)
    model, reference = make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.05), N, reduction="sum", backend="cpu")
    run_windows(model, acc, xs, ys)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for w in range(2):
        sum(loss_of(reference, xs[w, i], ys[w, i]) for i in range(N)).backward()
        opt.step()
        opt.zero_grad()
    assert_params_rel(model, reference, 1e-6)


def test_closure_returns_loss():
    """step(closure) runs the closure each micro-step and returns its loss, like Optimizer.step(closure)."""
    xs, ys = make_data(1, seed=9)
    model, reference = make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu")
    for i in range(N):
        def closure(i=i):
            loss = loss_of(model, xs[0, i], ys[0, i])
            loss.backward()
            return loss

        loss = acc.step(closure)
        assert torch.equal(loss, loss_of(reference, xs[0, i], ys[0, i]))
    run_large_batch(reference, torch.optim.SGD(reference.parameters(), lr=0.1), xs, ys)
    assert_params_rel(model, reference, 1e-6)


def test_step_returns_inner_result():
    """step() returns None on micro-steps that do not update, and the inner step's value on the update."""

    class Marked(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            return "inner"

    xs, ys = make_data(1)
    model = make_model()
    acc = GradAccumulator(Marked(model.parameters(), lr=0.1), N, backend="cpu")
    results = []
    for i in range(N):
        loss_of(model, xs[0, i], ys[0, i]).backward()
        results.append(acc.step())
    assert results == [None] * (N - 1) + ["inner"]


# ------------------------------------------------------------------------------------------- pitfall rows
def token_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 60, (N,), generator=g)]
    lengths[0] = 3  # make the lengths clearly unequal
    xs = [torch.randn(n, D_IN, generator=g) for n in lengths]
    ys = [torch.randn(n, D_OUT, generator=g) + 1.5 * (i % 2) for i, n in enumerate(lengths)]
    return lengths, xs, ys


def test_pitfall_1_token_weighted_mean():
    """PITFALLS row 1: per-micro-batch token means averaged over micro-batches != the large batch's token mean.

    With step(weight=token count), the update equals the large batch's token mean; without weights the
    difference is visible, so the pitfall is real and this test would catch it."""
    lengths, xs, ys = token_batches(11)
    reference = make_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    loss_of(reference, torch.cat(xs), torch.cat(ys)).backward()  # token mean over the whole batch
    opt.step()

    results = {}
    for weighted in (True, False):
        model = make_model()
        acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.5), N, backend="cpu")
        for i in range(N):
            loss_of(model, xs[i], ys[i]).backward()  # each micro-batch's own token mean
            acc.step(weight=lengths[i] if weighted else None)
        assert acc.stepped
        results[weighted] = model
    assert_params_rel(results[True], reference, 1e-6)
    unweighted_error = max(
        ((a - b).abs().max() / b.abs().max()).item()
        for a, b in zip(results[False].parameters(), reference.parameters())
    )
    assert unweighted_error > 1e-3, f"the unweighted mean should differ visibly, got {unweighted_error:.2e}"


def test_pitfall_2_flush_short_last_window():
    """PITFALLS row 2: the short last window of an epoch divided by N instead of its real size.

    10 micro-batches with N=4: windows of 4, 4 and 2; flush() applies the last with 1/2."""
    g = torch.Generator().manual_seed(13)
    xs = torch.randn(10, B, D_IN, generator=g)
    ys = torch.randn(10, B, D_OUT, generator=g)
    model, reference, wrong = make_model(), make_model(), make_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu")
    updates = 0
    for i in range(10):
        loss_of(model, xs[i], ys[i]).backward()
        acc.step()
        updates += acc.stepped
    assert (updates, acc.micro_step) == (2, 2)
    assert acc.flush() is True
    assert acc.stepped and acc.micro_step == 0
    assert acc.flush() is False  # nothing left: no update, no error
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for window in (slice(0, 4), slice(4, 8), slice(8, 10)):
        loss_of(reference, xs[window].reshape(-1, D_IN), ys[window].reshape(-1, D_OUT)).backward()
        opt.step()
        opt.zero_grad()
    assert_params_rel(model, reference, 1e-6)
    # The bug the row describes (last window divided by N=4) gives a visibly different result.
    opt = torch.optim.Adam(wrong.parameters(), lr=1e-2)
    for window in (slice(0, 4), slice(4, 8), slice(8, 10)):
        count = window.stop - window.start
        (loss_of(wrong, xs[window].reshape(-1, D_IN), ys[window].reshape(-1, D_OUT)) * count / N).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(wrong[0].weight, reference[0].weight, rtol=1e-4, atol=0)


def test_flush_weighted_short_window():
    """A flushed weighted window uses its own weight sum."""
    lengths, xs, ys = token_batches(17)
    model, reference = make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.5), N, backend="cpu")
    for i in range(3):
        loss_of(model, xs[i], ys[i]).backward()
        acc.step(weight=lengths[i])
    assert acc.flush()
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    loss_of(reference, torch.cat(xs[:3]), torch.cat(ys[:3])).backward()
    opt.step()
    assert_params_rel(model, reference, 1e-6)


def bf16_grad_errors(micro_batches: int, seed: int = 21) -> tuple[float, float]:
    """(wrapper error, native bf16 accumulation error) of the window's gradient vs a float64 large batch."""
    torch.manual_seed(seed)
    d_in, d_out = 64, 16
    base = nn.Linear(d_in, d_out).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    # Inputs with a non-zero mean and targets far from the outputs: the micro-batch gradients agree in sign, as
    # in real training, which is where bf16 swamping hurts.
    xs = (1.0 + 0.5 * torch.randn(micro_batches, B, d_in, generator=g)).to(torch.bfloat16)
    ys = (4.0 + torch.randn(micro_batches, B, d_out, generator=g)).to(torch.bfloat16)

    reference = copy.deepcopy(base).double()
    F.mse_loss(reference(xs.double().reshape(-1, d_in)), ys.double().reshape(-1, d_out)).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])

    native = copy.deepcopy(base)
    for i in range(micro_batches):
        (F.mse_loss(native(xs[i]), ys[i]) / micro_batches).backward()  # the usual loop, grads add up in bf16
    native_grad = torch.cat([p.grad.double().flatten() for p in native.parameters()])

    model = copy.deepcopy(base)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.0), micro_batches, master_weights=True,
                          backend="cpu")
    seen = []
    acc.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(p.grad.double().flatten() for p in opt.param_groups[0]["params"])
    )
    for i in range(micro_batches):
        F.mse_loss(model(xs[i]), ys[i]).backward()
        acc.step()
    wrapper_grad = torch.cat(seen)

    def err(grad):
        return ((grad - expected).norm() / expected.norm()).item()

    return err(wrapper_grad), err(native_grad)


def test_pitfall_3_bf16_accumulation_precision():
    """PITFALLS row 3: bf16 grads accumulated in bf16 lose precision.

    N=32 bf16 micro-batches: the wrapper's error against a float64 large-batch gradient is at least 10x smaller
    than native bf16 accumulation's."""
    wrapper_error, native_error = bf16_grad_errors(32)
    factor = native_error / wrapper_error
    print(f"\nbf16, N=32: wrapper error {wrapper_error:.3e}, native bf16 {native_error:.3e}, factor {factor:.1f}x")
    assert wrapper_error > 0  # a real comparison, not two identical computations
    assert factor >= 10, f"factor {factor:.1f}"


def test_pitfall_4_one_fp32_buffer_no_grads_kept():
    """PITFALLS row 4: fp32 accumulation buffers cost large extra memory.

    The wrapper holds exactly one fp32 master per trainable element (4 B/param), frozen params get none, and
    no bf16 grad survives a step (step consumes it), so bf16 grads + fp32 masters never coexist between
    micro-steps."""
    model = make_model(dtype=torch.bfloat16)
    model[0].bias.requires_grad_(False)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = acc.master_grad_buffers()
    assert sum(b.buffer.numel() * b.buffer.element_size() for b in buffers) == 4 * trainable
    assert all(b.buffer.dtype == torch.float32 for b in buffers)
    assert all(p is not model[0].bias for b in buffers for p in b.params)
    xs, ys = make_data(1, dtype=torch.bfloat16)
    for i in range(N):
        loss_of(model, xs[0, i], ys[0, i]).backward()
        acc.step()
        assert all(p.grad is None for p in model.parameters())


def test_pitfall_6_divided_exactly_once():
    """PITFALLS row 6: loss divided by N twice, or not at all, when two libraries each handle accumulation.

    The wrapper is the single place that divides: accumulation_steps=1 changes nothing (bit-identical to the
    plain optimizer), reduction="mean" expects the plain loss, and a loss another library already divided by N
    goes with reduction="sum"; both give the large-batch update."""
    xs, ys = make_data(2, seed=23)
    plain, single = make_model(), make_model()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    acc1 = GradAccumulator(torch.optim.Adam(single.parameters(), lr=1e-2), 1, backend="cpu")
    for w in range(2):
        for i in range(N):
            loss_of(plain, xs[w, i], ys[w, i]).backward()
            opt.step()
            opt.zero_grad()
            loss_of(single, xs[w, i], ys[w, i]).backward()
            acc1.step()
            acc1.zero_grad()
    assert_params_equal(single, plain)

    reference, mean_model, sum_model = make_model(), make_model(), make_model()
    run_large_batch(reference, torch.optim.SGD(reference.parameters(), lr=0.3), xs, ys)
    run_windows(mean_model, GradAccumulator(torch.optim.SGD(mean_model.parameters(), lr=0.3), N, backend="cpu"), xs, ys)
    acc_sum = GradAccumulator(torch.optim.SGD(sum_model.parameters(), lr=0.3), N, reduction="sum", backend="cpu")
    for w in range(2):
        for i in range(N):
            (loss_of(sum_model, xs[w, i], ys[w, i]) / N).backward()  # divided elsewhere
            acc_sum.step()
    assert_params_rel(mean_model, reference, 1e-6)
    assert_params_rel(sum_model, reference, 1e-6)


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
    ],
    ids=["StepLR", "LambdaLR", "CosineAnnealingLR"],
)
def test_pitfall_7_scheduler_once_per_update(make_sched):
    """PITFALLS row 7: LR scheduler stepped every micro-batch.

    A scheduler built on the wrapper, with `if acc.stepped: sched.step()`, advances once per real update, drives
    the inner optimizer's lr, raises no call-order warning, and matches the large-batch run with the same
    schedule."""
    xs, ys = make_data(3, seed=29)
    model, reference = make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), N, backend="cpu")
    seen_lrs = []
    acc.optimizer.register_step_pre_hook(lambda opt, a, k: seen_lrs.append(opt.param_groups[0]["lr"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = make_sched(acc)
        assert acc.param_groups is acc.optimizer.param_groups and acc.state is acc.optimizer.state
        for w in range(3):
            for i in range(N):
                loss_of(model, xs[w, i], ys[w, i]).backward()
                acc.step()
                acc.zero_grad()
                if acc.stepped:
                    sched.step()
    assert sched.last_epoch == 3
    opt = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    ref_sched = make_sched(opt)
    ref_lrs = []
    for w in range(3):
        ref_lrs.append(opt.param_groups[0]["lr"])
        loss_of(reference, xs[w].reshape(-1, D_IN), ys[w].reshape(-1, D_OUT)).backward()
        opt.step()
        opt.zero_grad()
        ref_sched.step()
    assert seen_lrs == ref_lrs and len(set(seen_lrs)) > 1
    assert_params_rel(model, reference, 1e-6)


def test_reduce_lr_on_plateau_accepts_wrapper():
    """Schedulers that check isinstance(optimizer, Optimizer) accept the wrapper and reach the inner optimizer."""
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=1.0), N, backend="cpu")
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(acc, patience=0, factor=0.5)
    sched.step(1.0)
    sched.step(2.0)
    assert acc.optimizer.param_groups[0]["lr"] == 0.5


def test_pitfall_8_clipping_on_the_averaged_window():
    """PITFALLS row 8: clipping applied per micro-batch or before averaging.

    max_grad_norm clips the window's mean with the norm from the last micro-step's fused pass: equal to
    clip_grad_norm_ on the large batch; grad_norm is the pre-clip norm."""
    xs, ys = make_data(3, seed=31)
    ys = ys * 10  # large gradients, so clipping really acts
    model, reference = make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, max_grad_norm=0.5, backend="cpu")
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for w in range(3):
        for i in range(N):
            loss_of(model, xs[w, i], ys[w, i]).backward()
            acc.step()
        loss_of(reference, xs[w].reshape(-1, D_IN), ys[w].reshape(-1, D_OUT)).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        assert norm > 0.5
        assert_rel(acc.grad_norm, norm, 1e-6, "grad_norm")
        assert acc.grad_norm.dim() == 0
    assert_params_rel(model, reference, 1e-6)


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


def test_pitfall_10_compiled_model():
    """PITFALLS row 10: torch.compile breaks with accumulation.

    A torch.compile'd model trained through the wrapper gives the eager result (the wrapper keeps no autograd
    state between micro-steps: .grad is None after every step, so every backward sees the same graph inputs)."""
    import torch._dynamo

    torch._dynamo.reset()
    xs, ys = make_data(2, seed=41)
    eager, compiled_base = make_model(), make_model()
    compiled = torch.compile(compiled_base, backend="aot_eager")
    run_windows(eager, GradAccumulator(torch.optim.AdamW(eager.parameters(), lr=1e-2), N, backend="cpu"), xs, ys)
    run_windows(compiled, GradAccumulator(torch.optim.AdamW(compiled_base.parameters(), lr=1e-2), N,
                                          backend="cpu"), xs, ys)
    assert_params_rel(compiled_base, eager, 1e-6)


def test_pitfall_12_textbook_loop_never_divides():
    """PITFALLS row 12: the textbook loop never divides the loss by N, so the update is N x too large.

    The same loop written with the wrapper gives the large-batch update; the textbook loop's gradient is N
    times the large-batch gradient (shown, so the check is real)."""
    xs, ys = make_data(1, seed=43)
    model, textbook, reference = make_model(), make_model(), make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu")
    for i in range(N):
        loss_of(model, xs[0, i], ys[0, i]).backward()
        acc.step()
        loss_of(textbook, xs[0, i], ys[0, i]).backward()  # textbook: no division, step every N
    loss_of(reference, xs[0].reshape(-1, D_IN), ys[0].reshape(-1, D_OUT)).backward()
    assert_rel(textbook[0].weight.grad, N * reference[0].weight.grad, 1e-5, "textbook grad")
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert_params_rel(model, reference, 1e-6)


# --------------------------------------------------------------------------------------------- semantics
class Branchy(nn.Module):
    """Three sub-layers; `use` picks which take part in a forward, so some params get no grad."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(47)
        self.a = nn.Linear(D_IN, D_OUT)
        self.b = nn.Linear(D_IN, D_OUT)
        self.c = nn.Linear(D_IN, D_OUT)

    def forward(self, x, use):
        return sum(getattr(self, name)(x) for name in use)


def test_params_without_grads_in_some_micro_steps():
    """A param missing from a window's first micro-step still has its master reset (no stale sum from the last
    window); one missing from the last micro-step still gets 1/W; one absent from a whole window keeps
    .grad None for the inner step, so the optimizer skips it as natively (its Adam state does not advance)."""
    g = torch.Generator().manual_seed(53)
    xs = torch.randn(3, N, B, D_IN, generator=g)
    ys = torch.randn(3, N, B, D_OUT, generator=g)
    uses = [
        [("a", "b", "c")] * N,  # window 0: everything, so every master holds a full sum afterwards
        [("a", "c"), ("a", "b"), ("a", "b"), ("a",)],  # b: absent first; c: absent last
        [("a",), ("a", "b"), ("a",), ("a", "b")],  # c: absent the whole window
    ]
    model, reference = Branchy(), Branchy()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu")
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for w in range(3):
        for i in range(N):
            F.mse_loss(model(xs[w, i], uses[w][i]), ys[w, i]).backward()
            acc.step()
        (sum(F.mse_loss(reference(xs[w, i], uses[w][i]), ys[w, i]) for i in range(N)) / N).backward()
        assert reference.c.weight.grad is None or w < 2
        opt.step()
        opt.zero_grad()
    assert_params_rel(model, reference, 1e-6)
    assert acc.state[model.c.weight]["step"] == 2 and acc.state[model.a.weight]["step"] == 3


def test_add_param_group_mid_run():
    """add_param_group works between windows and mid-window; requires_grad=False params are ignored."""
    xs, ys = make_data(3, seed=59)
    model, reference = make_model(), make_model()
    for m in (model, reference):
        m[2].weight.requires_grad_(False)
    acc = GradAccumulator(torch.optim.Adam(model[0].parameters(), lr=1e-2), N, backend="cpu")
    opt = torch.optim.Adam(reference[0].parameters(), lr=1e-2)
    for w in range(3):
        for i in range(N):
            if (w, i) == (1, 0):
                acc.add_param_group({"params": [model[2].bias], "lr": 5e-3})
                opt.add_param_group({"params": [reference[2].bias], "lr": 5e-3})
            if (w, i) == (2, 2):  # mid-window: the frozen weight joins, with the window's last two micro-batches
                for m, o in ((model, acc), (reference, opt)):
                    m[2].weight.requires_grad_(True)
                    o.add_param_group({"params": [m[2].weight], "lr": 5e-3})
            loss_of(model, xs[w, i], ys[w, i]).backward()
            acc.step()
            acc.zero_grad()
            # The reference: the correct fp32 hand-written loop (loss / N, native accumulation, same freezing).
            (loss_of(reference, xs[w, i], ys[w, i]) / N).backward()
        opt.step()
        opt.zero_grad()
    assert_params_rel(model, reference, 1e-6)
    assert not torch.equal(model[2].weight, make_model()[2].weight)


def test_reused_walk_sees_every_layout_change():
    """step() reuses its last walk over the params while the params, their groups and their requires_grad are
    unchanged. Every other change between micro-steps must take the full walk: a wrapper that reuses it and one
    forced to walk in full every time keep the same layout after every micro-step and end bit-identical, through
    a frozen param given a grad by hand, a param swapped for a new one in its group, an idle frozen param
    unfrozen (it gets a master before it gets a grad), a param moved to another group, and freezing and
    unfreezing."""
    xs, ys = make_data(3, seed=61)
    models = [make_model(), make_model()]
    for m in models:
        m[2].bias.requires_grad_(False)
    idles = [nn.Parameter(torch.zeros(5), requires_grad=False) for _ in models]
    accs = [GradAccumulator(torch.optim.SGD([{"params": [m[0].weight, m[0].bias, m[2].bias]},
                                             {"params": [m[2].weight, idle], "lr": 0.05}], lr=0.1), N, backend="cpu")
            for m, idle in zip(models, idles)]
    spares = [nn.Parameter(torch.randn(D_HID, generator=torch.Generator().manual_seed(3))) for _ in models]
    extra = torch.Generator().manual_seed(4)

    def layout(acc: GradAccumulator) -> list:
        return [(b.offsets, [tuple(p.shape) for p in b.params]) for b in acc.master_grad_buffers()]

    for k in range(3 * N):
        hand_grad = torch.randn(D_OUT, generator=extra)
        spare_grad = torch.randn(D_HID, generator=extra)
        for m, acc, spare, idle in zip(models, accs, spares, idles):
            groups = acc.param_groups
            if k == 1:  # the frozen bias (no master) gets a grad by hand: it joins the layout
                m[2].bias.grad = hand_grad.clone()
            if k == 4:  # a new param takes the first layer's bias's place, same group, same count
                groups[0]["params"][1] = spare
            if k == 5:  # trainable now, so it gets a master, though no grad reaches it
                idle.requires_grad_(True)
            if k == 6:  # the last param of group 0 moves to group 1: same flat order, other group sizes
                groups[1]["params"].insert(0, groups[0]["params"].pop())
            if k == 7:
                m[2].weight.requires_grad_(False)
            if k == 9:
                m[2].weight.requires_grad_(True)
            loss_of(m, xs[k // N, k % N], ys[k // N, k % N]).backward()
            if k >= 4:
                spare.grad = spare_grad.clone()
        accs[1]._masters.forget_walk()  # the full walk
        for acc in accs:
            acc.step()
        assert layout(accs[0]) == layout(accs[1]), f"micro-step {k}"
    for a, b in zip([*models[0].parameters(), spares[0]], [*models[1].parameters(), spares[1]]):
        assert torch.equal(a, b)
    assert not torch.equal(spares[0], torch.randn(D_HID, generator=torch.Generator().manual_seed(3)))
    # The swapped-out bias gone, idle in; the frozen bias given a grad by hand left with its window (issue 11, bug 2:
    # the layout of a wrapper built afresh with it frozen).
    assert sum(len(b.params) for b in accs[0].master_grad_buffers()) == 4


def test_master_buffers_layout():
    """One flat fp32 buffer per (device, dtype) group; per-parameter views in param order; the masters of a
    mixed fp32/bf16 model live in two buffers."""
    model = make_model()
    model[2].to(torch.bfloat16)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu")
    buffers = acc.master_grad_buffers()
    assert [(b.device.type, b.param_dtype) for b in buffers] == [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    assert [id(p) for b in buffers for p in b.params] == [id(p) for p in model.parameters()]
    for b in buffers:
        assert b.buffer.dim() == 1 and b.buffer.is_contiguous()
        # Views in order, each at the next 16-byte boundary (4 float32s) after the previous one.
        expected, end = [], 0
        for p in b.params:
            expected.append(-(-end // 4) * 4)
            end = expected[-1] + p.numel()
        assert list(b.offsets) == expected and b.buffer.numel() == end
        assert all(b.buffer[off:].data_ptr() % 16 == 0 for off in b.offsets)
    x = torch.randn(B, D_IN)
    model[2](model[1](model[0](x)).to(torch.bfloat16)).float().sum().backward()
    grads = {id(p): p.grad.float().clone() for p in model.parameters()}
    acc.step()
    for b in buffers:
        for p, off in zip(b.params, b.offsets):
            assert torch.equal(b.buffer[off : off + p.numel()].view(p.shape), grads[id(p)])


def test_nonfinite_window_is_skipped():
    """A window with an inf or nan gradient at any micro-step is skipped: params and optimizer state bit for
    bit, skipped_windows += 1, and the next window is exact (masters reset)."""
    xs, ys = make_data(2, seed=61)
    for bad_step in (0, 2, N - 1):
        model, reference = make_model(), make_model()
        acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, max_grad_norm=10.0, backend="cpu")
        opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
        run_windows(model, acc, xs[:1], ys[:1])
        run_large_batch(reference, opt, xs[:1], ys[:1])
        before = snapshot(model, acc)
        norm_before = acc.grad_norm.clone()
        for i in range(N):
            x = xs[1, i].clone()
            if i == bad_step:
                x[0, 0] = float("nan") if bad_step == 2 else float("inf")
            loss_of(model, x, ys[1, i]).backward()
            acc.step()
            acc.zero_grad()
        assert acc.skipped_windows == 1 and not acc.stepped and acc.micro_step == 0
        after = snapshot(model, acc)
        assert deep_equal(after["params"], before["params"])
        assert deep_equal(after["acc"]["state"], before["acc"]["state"])
        assert torch.equal(acc.grad_norm, norm_before)  # the last *applied* window's norm
        run_windows(model, acc, xs[1:], ys[1:])  # the same window again, now finite
        run_large_batch(reference, opt, xs[1:], ys[1:])
        assert_params_rel(model, reference, 1e-6)


def test_master_weights_bf16():
    """master_weights=True on a bf16 model: the inner optimizer's state is fp32 and steps fp32 copies; the bf16
    params are their rounding; tiny updates that plain bf16 params lose are kept."""
    xs, ys = make_data(6, seed=67, dtype=torch.bfloat16)
    lr = 1e-4  # Adam steps ~lr: far below half a bf16 ulp of weights ~0.1-0.3, lost by plain bf16 params
    base = make_model(5, torch.bfloat16)
    with_masters, plain, reference = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).double()
    acc = GradAccumulator(torch.optim.Adam(with_masters.parameters(), lr=lr), N, master_weights=True, backend="cpu")
    acc_plain = GradAccumulator(torch.optim.Adam(plain.parameters(), lr=lr), N, backend="cpu")
    run_windows(with_masters, acc, xs, ys)
    run_windows(plain, acc_plain, xs, ys)
    run_large_batch(reference, torch.optim.Adam(reference.parameters(), lr=lr), xs.double(), ys.double())
    for state in acc.state.values():
        assert state["exp_avg"].dtype == torch.float32
    masters = list(acc.state.keys())
    assert all(m.dtype == torch.float32 for m in masters) and len(masters) == 4
    # The bf16 params are exactly the rounded master weights.
    for p, m in zip(with_masters.parameters(), masters):
        assert torch.equal(p, m.to(torch.bfloat16))
    ref_w = reference[0].weight
    err_masters = (masters[0].double() - ref_w).abs().max().item()
    err_plain = (plain[0].weight.double() - ref_w).abs().max().item()
    moved = (ref_w - base[0].weight.double()).abs().max().item()
    assert err_masters < 0.05 * moved, (err_masters, moved)
    assert err_plain > 10 * err_masters, (err_plain, err_masters)
    assert all(p.dtype == torch.bfloat16 for p in with_masters.parameters())


def test_master_weights_follow_external_param_changes():
    """With master_weights, a param changed outside the wrapper (e.g. model.load_state_dict of pretrained
    weights after wrapping) wins over its stale master copy."""
    model = make_model(dtype=torch.bfloat16)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.0), 1, master_weights=True, backend="cpu")
    pretrained = make_model(123, torch.bfloat16).state_dict()
    model.load_state_dict(pretrained)
    loss_of(model, torch.randn(B, D_IN).bfloat16(), torch.randn(B, D_OUT).bfloat16()).backward()
    acc.step()  # lr 0: the params must stay the pretrained ones, not revert to the wrapped-time copies
    for name, p in model.named_parameters():
        assert torch.equal(p, pretrained[name])


def test_grad_scaler_fp16_loop():
    """torch.amp.GradScaler with an fp16 model on CPU (torch 2.14 runs fp16 Linear forward/backward on CPU).

    Loop: scaler.scale(loss).backward(); acc.step(); acc.zero_grad(). The fused pass unscales with the scaler's
    device scale into fp32 masters (native GradScaler refuses fp16 grads); a window with an overflow at any
    micro-step is skipped with params untouched; the scale changes only at window ends: backoff once per
    overflowing window, growth after growth_interval good windows (not micro-steps)."""
    xs, ys = make_data(5, seed=71, dtype=torch.float16)
    base = make_model(7, torch.float16)
    model, reference = copy.deepcopy(base), copy.deepcopy(base).double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=2)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler, master_weights=True,
                          backend="cpu")
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    scales = []
    for w in range(5):
        before = [p.clone() for p in model.parameters()]
        for i in range(N):
            scaler.scale(loss_of(model, xs[w, i], ys[w, i])).backward()
            acc.step()
            acc.zero_grad()
            scales.append(scaler.get_scale())
        if w == 0:
            # 2**17 overflows this data's fp16 backward: skipped, params untouched, scale halved once per window.
            assert acc.skipped_windows == 1 and not acc.stepped
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
            continue
        assert acc.stepped
        run_large_batch(reference, ref_opt, xs[w : w + 1].double(), ys[w : w + 1].double())
    # Scale constant inside each window; changes only at window ends.
    for w in range(5):
        assert len(set(scales[w * N : w * N + N - 1])) == 1
    window_end = [scales[w * N + N - 1] for w in range(5)]
    # w0 overflows -> 2**16 (halved once, however many micro-steps overflowed), w1 ok, w2 ok -> growth to 2**17
    # (after 2 windows, not 2 micro-steps), w3 ok, w4 ok -> 2**18.
    assert window_end == [2.0**16, 2.0**16, 2.0**17, 2.0**17, 2.0**18]
    # The applied updates are the fp64 large-batch ones up to fp16 forward/backward precision.
    for p, r in zip(model.parameters(), reference.parameters()):
        assert_rel(p, r, 2e-3, "fp16 + GradScaler")


def test_grad_scaler_step_on_wrapper_is_refused():
    """scaler.step(acc) / per-micro-batch scaler.update() would change the scale per micro-batch: refused with a
    message naming the supported loop; nothing changes."""
    model = make_model(dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler, backend="cpu")
    xs, ys = make_data(1, dtype=torch.float16)
    scaler.scale(loss_of(model, xs[0, 0], ys[0, 0])).backward()
    acc.step()
    scaler.scale(loss_of(model, xs[0, 1], ys[0, 1])).backward()
    before = snapshot(model, acc)
    with pytest.raises(RuntimeError, match="scaler=scaler"):
        scaler.step(acc)
    assert deep_equal(snapshot(model, acc), before)
    acc.step()  # the supported call still works afterwards
    assert acc.micro_step == 2


def test_grad_scaler_fp32_params_weighted_is_exact():
    """fp32 params (the autocast setup) with a GradScaler and token weights: unscaling by the power-of-two
    scale inside the fused pass makes the result bit-identical to the same run without a scaler. And
    scaler.unscale_(acc) (which would unscale twice) is refused."""
    lengths, xs, ys = token_batches(83)
    results = []
    for use_scaler in (True, False):
        model = make_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, scaler=scaler, backend="cpu")
        for i in range(N):
            loss = loss_of(model, xs[i], ys[i])
            (scaler.scale(loss) if use_scaler else loss).backward()
            acc.step(weight=lengths[i])
        assert acc.stepped
        results.append(model)
    assert_params_equal(results[0], results[1])
    assert not torch.equal(results[0][0].weight, make_model()[0].weight)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler, backend="cpu")
    scaler.scale(loss_of(model, xs[0], ys[0])).backward()
    scaler.unscale_(acc)
    with pytest.raises(RuntimeError, match="unscale_"):
        acc.step()
    assert acc.micro_step == 0 and all(p.grad is not None for p in model.parameters())


def test_deepcopy_mid_window():
    """copy.deepcopy of (model, wrapper) mid-window gives an independent pair that continues identically."""
    xs, ys = make_data(2, seed=89)
    model = make_model()
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N, backend="cpu")
    torch.optim.lr_scheduler.StepLR(acc, 1)  # puts a step wrapper on the instance; the copy must not call it
    stream = [(w, i) for w in range(2) for i in range(N)]
    for w, i in stream[:N + 1]:
        loss_of(model, xs[w, i], ys[w, i]).backward()
        acc.step()
    model2, acc2 = copy.deepcopy((model, acc))
    assert acc2.micro_step == 1 and acc2.optimizer is not acc.optimizer
    for m, a in ((model, acc), (model2, acc2)):
        for w, i in stream[N + 1 :]:
            loss_of(m, xs[w, i], ys[w, i]).backward()
            a.step()
        assert a.stepped
    assert_params_equal(model2, model)


# ------------------------------------------------------------------------------------------- bad input
def test_constructor_bad_input():
    """accumulation_steps < 1 or not an int, not an optimizer, a wrapper, bad options: clear errors, and the
    optimizer is left as it was."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    cases = [
        ((opt, 0), {}, ValueError, ">= 1"),
        ((opt, -3), {}, ValueError, ">= 1"),
        ((opt, 2.0), {}, TypeError, "int"),
        ((opt, "4"), {}, TypeError, "int"),
        ((opt, True), {}, TypeError, "int"),
        ((model, 4), {}, TypeError, "torch.optim.Optimizer"),
        ((list(model.parameters()), 4), {}, TypeError, "torch.optim.Optimizer"),
        ((GradAccumulator(opt, 2), 4), {}, TypeError, "another GradAccumulator"),
        ((opt, 4), {"reduction": "avg"}, ValueError, "reduction"),
        ((opt, 4), {"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ((opt, 4), {"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ((opt, 4), {"backend": "gpu"}, ValueError, "backend"),
        ((opt, 4), {"scaler": object()}, TypeError, "GradScaler"),
        ((torch.optim.LBFGS(model.parameters()), 4), {}, TypeError, "LBFGS"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            GradAccumulator(*args, **kwargs)
    with pytest.raises(TypeError, match="float64"):
        GradAccumulator(torch.optim.SGD(make_model().double().parameters(), lr=0.1), 4)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert len(opt.state) == 0


def _mid_window(weighted: bool = False):
    model = make_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu")
    xs, ys = make_data(2, seed=73)
    run_windows(model, acc, xs[:1], ys[:1], weights=[[2.0] * N] if weighted else None)  # inner state exists
    for i in range(2):
        loss_of(model, xs[1, i], ys[1, i]).backward()
        acc.step(weight=3.0 if weighted else None)
    loss_of(model, xs[1, 2], ys[1, 2]).backward()  # grads waiting for the next step
    return model, acc


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (0.0, ValueError, "> 0"),
        (-2.0, ValueError, "> 0"),
        (float("nan"), ValueError, "> 0"),
        (float("inf"), ValueError, "> 0"),
        (torch.tensor(float("inf")), ValueError, "> 0"),
        (True, TypeError, "positive number"),
        ("3", TypeError, "positive number"),
        (torch.ones(2), TypeError, "one-element"),
    ],
)
def test_bad_weight_changes_nothing(weight, error, match):
    """weight <= 0, nan, inf or not a number: a clear error; params, grads and wrapper state unchanged."""
    model, acc = _mid_window(weighted=True)
    before = snapshot(model, acc)
    with pytest.raises(error, match=match):
        acc.step(weight=weight)
    assert deep_equal(snapshot(model, acc), before)


def test_mixed_weighting_in_a_window_is_refused():
    """weight= on some micro-steps of a window and not on others is ambiguous: refused, nothing changes."""
    model, acc = _mid_window(weighted=False)
    before = snapshot(model, acc)
    with pytest.raises(ValueError, match="every micro-step"):
        acc.step(weight=5.0)
    assert deep_equal(snapshot(model, acc), before)
    acc.step()
    assert acc.micro_step == 3


def test_sparse_grads_are_refused():
    """A sparse gradient: a clear error; the grad stays, nothing else changes."""
    torch.manual_seed(79)
    emb = nn.Embedding(10, 4, sparse=True)
    acc = GradAccumulator(torch.optim.SGD(emb.parameters(), lr=0.1), N, backend="cpu")
    emb(torch.tensor([1, 2, 2])).sum().backward()
    before = snapshot(emb, acc)
    with pytest.raises(ValueError, match="sparse"):
        acc.step()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    after = snapshot(emb, acc)
    assert deep_equal(after["acc"], before["acc"]) and deep_equal(after["params"], before["params"])
    assert after["micro_step"] == before["micro_step"] == 0


def test_update_with_no_grads_in_window_is_refused():
    """An update due after a window in which no parameter received a gradient: RuntimeError (documented), no
    silent zero update, nothing changes; once a backward happens the same call goes through."""
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), N, backend="cpu")
    for _ in range(N - 1):
        acc.step()  # no backward at all
    before = snapshot(model, acc)
    with pytest.raises(RuntimeError, match="no parameter received a gradient"):
        acc.step()
    assert deep_equal(snapshot(model, acc), before)
    with pytest.raises(RuntimeError, match="no parameter received a gradient"):
        acc.flush()
    assert deep_equal(snapshot(model, acc), before)
    loss_of(model, torch.randn(B, D_IN), torch.randn(B, D_OUT)).backward()
    acc.step()
    assert acc.stepped


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


# ------------------------------------------------------------------------------ review findings, pinned
def test_master_weights_resume_keeps_changes_made_after_an_update():
    """A param the user changes after an update (a projection, here a clamp) must survive a checkpoint taken at a
    window boundary, whichever of model and wrapper is loaded first: the resumed run matches bit for bit."""
    torch.manual_seed(torch.seed() % 2**31)
    data = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(12)]
    init = torch.nn.Linear(16, 4).to(torch.bfloat16)

    def make():
        model = copy.deepcopy(init)
        return model, GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.5), 2, master_weights=True)

    def micro(model, acc, x, y):
        ((model(x.bfloat16()).float() - y) ** 2).mean().backward()
        acc.step()
        if acc.stepped:
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-0.05, 0.05)

    model_a, acc_a = make()
    for x, y in data:
        micro(model_a, acc_a, x, y)
    for model_first in (True, False):
        model_b, acc_b = make()
        for x, y in data[:6]:
            micro(model_b, acc_b, x, y)
        buffer = io.BytesIO()
        torch.save({"model": model_b.state_dict(), "acc": acc_b.state_dict()}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=False)
        model_c, acc_c = make()
        if model_first:
            model_c.load_state_dict(checkpoint["model"])
            acc_c.load_state_dict(checkpoint["acc"])
        else:
            acc_c.load_state_dict(checkpoint["acc"])
            model_c.load_state_dict(checkpoint["model"])
        for x, y in data[6:]:
            micro(model_c, acc_c, x, y)
        for p_a, p_c in zip(model_a.parameters(), model_c.parameters()):
            assert torch.equal(p_a, p_c), f"resumed run differs (model loaded first: {model_first})"


@pytest.mark.parametrize("weight", [1e39, 1e-39])
def test_weight_outside_float32_range_is_refused(weight):
    p = torch.nn.Parameter(torch.randn(5))
    acc = GradAccumulator(torch.optim.SGD([p], lr=0.1), 2)
    p.grad = torch.randn(5)
    with pytest.raises(ValueError, match="float32's normal range"):
        acc.step(weight=weight)
    assert acc.micro_step == 0 and p.grad is not None


def test_window_whose_sum_overflows_float32_is_skipped():
    """Finite grads whose sum leaves float32's range: the window is skipped, nothing is corrupted."""
    p = torch.nn.Parameter(torch.randn(5))
    before = p.detach().clone()
    acc = GradAccumulator(torch.optim.SGD([p], lr=0.1, momentum=0.9), 2, reduction="sum")
    for _ in range(2):
        p.grad = torch.full((5,), 3e38)
        acc.step()
    assert not acc.stepped and acc.skipped_windows == 1
    assert torch.equal(p.detach(), before) and not acc.optimizer.state
    p.grad = torch.ones(5)
    acc.step()
    p.grad = torch.ones(5)
    acc.step()
    assert acc.stepped and torch.allclose(p.detach(), before - 0.1 * 2.0)


@pytest.mark.parametrize("before", [0, 1, 3], ids=["one-call", "two-calls", "last-micro-step"])
def test_step_rejected_by_the_kernel_checks_changes_nothing(before: int):
    """Two params sharing one grad tensor are refused by the op's overlap check, before the micro-step counts:
    as the only accumulate_ call of the micro-step (both params first in the window, or the window's last
    micro-step) and as two calls (a first grad for one param, a later one for the other), which the wrapper checks
    together beforehand."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    acc = GradAccumulator(torch.optim.SGD([a, b], lr=0.1), 4, backend="cpu")
    for i in range(before):
        a.grad = torch.ones(4)
        if i > 0:
            b.grad = torch.ones(4)
        acc.step(weight=1.0)
    masters = [buf.buffer.clone() for buf in acc.master_grad_buffers()]
    shared = torch.randn(4)
    a.grad = b.grad = shared
    with pytest.raises(ValueError, match="overlap"):
        acc.step(weight=1.0)
    assert acc.micro_step == before and a.grad is shared and b.grad is shared
    assert all(torch.equal(m, buf.buffer) for m, buf in zip(masters, acc.master_grad_buffers()))
    a0, b0 = a.detach().clone(), b.detach().clone()
    for _ in range(before, 4):
        a.grad, b.grad = torch.ones(4), torch.ones(4)
        acc.step(weight=1.0)
    assert acc.stepped
    # a had a grad of ones on every micro-step, b on all but the first: the rejected call added nothing.
    assert torch.allclose(a0 - a.detach(), torch.full((4,), 0.1)), "an earlier rejected call leaked into the window"
    assert torch.allclose(b0 - b.detach(), torch.full((4,), 0.1 * (1.0 if before == 0 else (4 - 1) / 4)))


def test_hooks_registered_on_the_wrapper_run():
    """Step hooks on the wrapper run on every micro-step; state-dict hooks on save and load."""
    p = torch.nn.Parameter(torch.randn(3))
    acc = GradAccumulator(torch.optim.SGD([p], lr=0.1), 2)
    calls = []
    handles = [
        acc.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre")),
        acc.register_step_post_hook(lambda opt, args, kwargs: calls.append("post")),
        acc.register_state_dict_pre_hook(lambda opt: calls.append("sd_pre")),
        acc.register_state_dict_post_hook(lambda opt, sd: calls.append("sd_post")),
        acc.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load_pre")),
        acc.register_load_state_dict_post_hook(lambda opt: calls.append("load_post")),
    ]
    for _ in range(2):
        p.grad = torch.randn(3)
        acc.step()
    acc.load_state_dict(acc.state_dict())
    assert calls == ["pre", "post", "pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    for handle in handles:
        handle.remove()
    p.grad = torch.randn(3)
    acc.step()
    assert len(calls) == 8


# ------------------------------------------------------------------------ accumulate_in_backward=True
def twin(make_opt, dtype=torch.float32, seed=0, **kwargs):
    """The same model twice: a default-mode wrapper and an accumulate_in_backward wrapper."""
    pair = []
    for in_backward in (False, True):
        model = make_model(seed, dtype)
        acc = GradAccumulator(make_opt(model.parameters()), N, backend="cpu", accumulate_in_backward=in_backward,
                              **kwargs)
        pair.append((model, acc))
    return pair


def assert_same_state(default, hooked, norm_exact=True) -> None:
    (m0, a0), (m1, a1) = default, hooked
    assert_params_equal(m1, m0)
    assert a0.micro_step == a1.micro_step and a0.stepped == a1.stepped
    assert a0.skipped_windows == a1.skipped_windows
    for b0, b1 in zip(a0.master_grad_buffers(), a1.master_grad_buffers()):
        assert deep_equal(b1.buffer, b0.buffer)
    assert all(p.grad is None for group in a1.param_groups for p in group["params"])
    if a0.grad_norm is not None:
        if norm_exact:
            assert torch.equal(a1.grad_norm, a0.grad_norm)
        else:
            # The hook mode sums the norm² one param at a time (the default mode: one fused pass per device), so
            # the float32 partial sums round differently: a few ulps, nothing more.
            assert_rel(a1.grad_norm, a0.grad_norm, 1e-6, "grad_norm")


@pytest.mark.parametrize("dtype,master_weights", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.bfloat16, True)])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_in_backward_matches_default_bit_for_bit(name, dtype, master_weights):
    """Same masters after every micro-step, same params after every window and after the short last window's
    flush(), same optimizer state: the hooks do the default mode's maths, element for element."""
    default, hooked = twin(OPTIMIZERS[name], dtype, master_weights=master_weights)
    xs, ys = make_data(3, seed=101, dtype=dtype)
    for w in range(3):
        for i in range(N if w < 2 else 2):  # the last window is short: flushed below
            for model, acc in (default, hooked):
                loss_of(model, xs[w, i], ys[w, i]).backward()
                acc.step()
                acc.zero_grad()
            assert_same_state(default, hooked, norm_exact=False)
    assert default[1].flush() and hooked[1].flush()
    assert_same_state(default, hooked, norm_exact=False)
    assert deep_equal(hooked[1].state_dict()["state"], default[1].state_dict()["state"])
    assert any(not torch.equal(p, q) for p, q in zip(hooked[0].parameters(), make_model(0, dtype).parameters()))


def test_in_backward_params_absent_from_some_micro_steps():
    """Branches not taken: first grad mid-window overwrites, a param absent from the last micro-step still gets
    1/W and its norm² (step() scales it), a param absent from a whole window keeps .grad None for the optimizer."""
    g = torch.Generator().manual_seed(53)
    xs = torch.randn(3, N, B, D_IN, generator=g)
    ys = torch.randn(3, N, B, D_OUT, generator=g)
    uses = [
        [("a", "b", "c")] * N,
        [("a", "c"), ("a", "b"), ("a", "b"), ("a",)],
        [("a",), ("a", "b"), ("a",), ("a", "b")],
    ]
    pair = []
    for in_backward in (False, True):
        model = Branchy()
        pair.append((model, GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu",
                                            accumulate_in_backward=in_backward)))
    for w in range(3):
        for i in range(N):
            for model, acc in pair:
                F.mse_loss(model(xs[w, i], uses[w][i]), ys[w, i]).backward()
                acc.step()
            assert_same_state(*pair, norm_exact=False)
    model, acc = pair[1]
    assert acc.state[model.c.weight]["step"] == 2 and acc.state[model.a.weight]["step"] == 3


def test_in_backward_nonfinite_window_is_skipped():
    xs, ys = make_data(2, seed=61)
    for bad_step in (0, 2, N - 1):
        default, hooked = twin(lambda p: torch.optim.Adam(p, lr=1e-2), max_grad_norm=10.0)
        for w in range(2):
            for i in range(N):
                x = xs[w, i].clone()
                if (w, i) == (1, bad_step):
                    x[0, 0] = float("nan") if bad_step == 2 else float("inf")
                for model, acc in (default, hooked):
                    loss_of(model, x, ys[w, i]).backward()
                    acc.step()
        assert hooked[1].skipped_windows == 1 and not hooked[1].stepped
        assert_same_state(default, hooked, norm_exact=False)
        run_windows(*default, xs[1:], ys[1:])  # the same window again, now finite
        run_windows(*hooked, xs[1:], ys[1:])
        assert_params_rel(hooked[0], default[0], 1e-6)


def test_in_backward_clipping():
    """max_grad_norm clips with the norm the hooks measured; the window's norm is well above the limit."""
    default, hooked = twin(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), max_grad_norm=0.05)
    xs, ys = make_data(3, seed=67)
    for acc_model in (default, hooked):
        run_windows(*acc_model, xs, ys)
    assert hooked[1].grad_norm > 0.2
    assert_rel(hooked[1].grad_norm, default[1].grad_norm, 1e-6, "grad_norm")
    # The coefficient max_norm / norm inherits the norm's few-ulp difference (see assert_same_state).
    assert_params_rel(hooked[0], default[0], 1e-6)


class Dyadic(nn.Module):
    """loss = sum(p * x) + sum(q * x[:3]): grads are x itself, small integers, so every sum, 1/4 scaling and
    norm² is exact in float32 whatever the order of additions."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(5))
        self.q = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (self.p * x).sum() + (self.q * x[:3]).sum()


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_in_backward_two_backwards_before_one_step_are_one_micro_step(max_grad_norm):
    """Two backward() before one step() are one micro-step, as in the default mode (where they add in .grad),
    on a non-last micro-step and on the last one (there the second grad arrives after the master is final: it
    is added already scaled by 1/W and the norm² is recounted)."""
    g = torch.Generator().manual_seed(5)
    xs = torch.randint(-4, 5, (2, N, 2, 5), generator=g).float()
    pair = []
    for in_backward in (False, True):
        model = Dyadic()
        pair.append((model, GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.25), N, backend="cpu",
                                            max_grad_norm=max_grad_norm, accumulate_in_backward=in_backward)))
    for w in range(2):
        for i in range(N):
            for model, acc in pair:
                model(xs[w, i, 0]).backward()
                if i in (1, N - 1):
                    model(xs[w, i, 1]).backward()
                acc.step()
            assert_same_state(*pair, norm_exact=True)
    model, acc = pair[1]
    # The last window's mean gradient: p's is the mean of its x's (both backwards of micro-steps 1 and N-1), q's
    # the first 3 entries of it; the norm before clipping is exact.
    mean = (xs[1, :, 0].sum(0) + xs[1, 1, 1] + xs[1, N - 1, 1]) / N
    assert torch.equal(acc.grad_norm, (mean.square().sum() + mean[:3].square().sum()).sqrt())
    assert not torch.equal(model.p, torch.zeros(5))


def test_in_backward_frees_each_grad_at_once():
    """Peak gradient memory: in the hook mode at most one param's bf16 .grad exists at any point of backward (and
    none after it); the default mode keeps every param's .grad until step()."""
    xs, ys = make_data(1, seed=73, dtype=torch.bfloat16)
    for in_backward in (False, True):
        model = make_model(3, torch.bfloat16)
        params = list(model.parameters())
        live: list[int] = []
        for p in params:
            # Registered before the wrapper's hooks, so it runs first: it sees the grad that just arrived.
            p.register_post_accumulate_grad_hook(
                lambda _, live=live, params=params: live.append(sum(q.grad is not None for q in params)))
        acc = GradAccumulator(torch.optim.SGD(params, lr=0.1), N, backend="cpu", accumulate_in_backward=in_backward)
        loss_of(model, xs[0, 0], ys[0, 0]).backward()
        alive_after_backward = sum(p.grad is not None for p in params)
        acc.step()
        assert len(live) == len(params)
        if in_backward:
            assert max(live) == 1 and alive_after_backward == 0
        else:
            assert live == list(range(1, len(params) + 1)) and alive_after_backward == len(params)
        assert all(p.grad is None for p in params)


def test_in_backward_add_param_group_and_late_unfreeze():
    """add_param_group (between windows and mid-window) re-registers the hooks, one per trainable param; a param
    unfrozen without add_param_group has no hook for its first backward, and step() takes its .grad instead
    (here on a window's last micro-step). Bit for bit the default mode's result."""
    xs, ys = make_data(3, seed=59)
    pair = []
    for in_backward in (False, True):
        model = make_model()
        model[2].weight.requires_grad_(False)
        model[0].bias.requires_grad_(False)
        pair.append((model, GradAccumulator(torch.optim.Adam(model[0].parameters(), lr=1e-2), N, backend="cpu",
                                            accumulate_in_backward=in_backward)))
    for w in range(3):
        for i in range(N):
            for model, acc in pair:
                if (w, i) == (1, 0):
                    acc.add_param_group({"params": [model[2].bias], "lr": 5e-3})
                if (w, i) == (1, N - 1):
                    model[0].bias.requires_grad_(True)
                if (w, i) == (2, 2):
                    model[2].weight.requires_grad_(True)
                    acc.add_param_group({"params": [model[2].weight], "lr": 5e-3})
                loss_of(model, xs[w, i], ys[w, i]).backward()
                acc.step()
            assert_same_state(*pair, norm_exact=False)
    model, acc = pair[1]
    assert len(acc._mode._handles) == 4  # every param trainable now, each hooked once
    for p in model.parameters():
        assert len(p._post_accumulate_grad_hooks) == 1


@pytest.mark.parametrize("k", range(N))
def test_in_backward_checkpoint_and_deepcopy_mid_window(k):
    """state_dict()/load_state_dict() into a fresh model and wrapper at micro-step k, and a deepcopy of model and
    wrapper together, both continue bit-identically to the uninterrupted run; the copy's hooks are its own."""
    xs, ys = make_data(3, seed=79, dtype=torch.bfloat16)

    def build():
        model = make_model(0, torch.bfloat16)
        return model, GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N, backend="cpu",
                                      master_weights=True, max_grad_norm=1.0, accumulate_in_backward=True)

    def run(model, acc, start, stop):
        for s in range(start, stop):
            loss_of(model, xs[s // N, s % N], ys[s // N, s % N]).backward()
            acc.step()

    model, acc = build()
    run(model, acc, 0, N + k)
    checkpoint = saved({"model": model.state_dict(), "acc": acc.state_dict()})
    twin_model, twin_acc = copy.deepcopy((model, acc))
    run(model, acc, N + k, 3 * N)

    resumed_model, resumed_acc = build()
    state = restored(checkpoint)
    resumed_model.load_state_dict(state["model"])
    resumed_acc.load_state_dict(state["acc"])
    assert resumed_acc.micro_step == k
    for m, a in ((resumed_model, resumed_acc), (twin_model, twin_acc)):
        run(m, a, N + k, 3 * N)
        assert_params_equal(m, model)
        assert torch.equal(a.grad_norm, acc.grad_norm)
        assert all(len(p._post_accumulate_grad_hooks) == 1 for p in m.parameters())


def test_in_backward_grad_scaler_matches_default():
    """GradScaler: the hooks unscale with the scaler's device scale, read per micro-step; skipped windows and
    scale updates are the default mode's."""
    xs, ys = make_data(3, seed=71, dtype=torch.float16)
    runs = []
    for in_backward in (False, True):
        model = make_model(7, torch.float16)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17, growth_interval=1)
        acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler, master_weights=True,
                              backend="cpu", accumulate_in_backward=in_backward)
        scales = []
        for w in range(3):
            for i in range(N):
                scaler.scale(loss_of(model, xs[w, i], ys[w, i])).backward()
                acc.step()
                scales.append(scaler.get_scale())
        runs.append((model, acc, scales))
    (m0, a0, s0), (m1, a1, s1) = runs
    assert s0 == s1 and a1.skipped_windows == a0.skipped_windows == 1
    assert_params_equal(m1, m0)


def test_in_backward_grad_scaler_without_scale_is_refused():
    model = make_model(dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu")
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, scaler=scaler, backend="cpu",
                          accumulate_in_backward=True)
    xs, ys = make_data(1, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="scaler.scale"):
        loss_of(model, xs[0, 0], ys[0, 0]).backward()
    assert acc.micro_step == 0


def test_in_backward_dropped_wrapper_lets_grads_be():
    """The hooks hold the wrapper weakly: once it is gone, backward leaves .grad alone (nothing eats it)."""
    model = make_model()
    GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu", accumulate_in_backward=True)
    xs, ys = make_data(1)
    loss_of(model, xs[0, 0], ys[0, 0]).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_in_backward_refusals():
    model = make_model()
    with pytest.raises(TypeError, match="accumulate_in_backward must be a bool"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, accumulate_in_backward=1)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, accumulate_in_backward=True,
                        ddp_module=model)
    # The failed constructions registered no hook.
    assert all(p._post_accumulate_grad_hooks is None for p in model.parameters())

    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N, backend="cpu", accumulate_in_backward=True)
    xs, ys = make_data(1)
    loss_of(model, xs[0, 0], ys[0, 0]).backward()
    acc.step()
    before = snapshot(model, acc)
    loss_of(model, xs[0, 1], ys[0, 1]).backward()
    with pytest.raises(ValueError, match="weight"):
        acc.step(weight=2.0)
    with pytest.raises(RuntimeError, match="before acc.step"):
        acc.flush()
    with pytest.raises(RuntimeError, match="before acc.step"):
        acc.state_dict()
    assert acc.micro_step == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before["params"]))
    acc.step()  # the refused calls left a consistent window: the micro-step counts now
    assert acc.micro_step == 2

    # A half-finished weighted window (default mode) cannot be continued without weights.
    plain_model = make_model()
    plain = GradAccumulator(torch.optim.SGD(plain_model.parameters(), lr=0.1), N, backend="cpu")
    loss_of(plain_model, xs[0, 0], ys[0, 0]).backward()
    plain.step(weight=3.0)
    before = snapshot(model, acc)
    with pytest.raises(ValueError, match="weighted window"):
        acc.load_state_dict(plain.state_dict())
    assert deep_equal(snapshot(model, acc), before)
