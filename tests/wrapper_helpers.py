"""Shared helpers of the GradAccumulator tests (tests/test_accumulator.py and one file per part of the wrapper):
tiny models, data, runs and bitwise comparisons (tests/ is on pytest's pythonpath: `from wrapper_helpers import`).

Small models and fresh random data, CPU. Backends: "cpu" (the compiled C++ kernels) unless a test says otherwise,
and "reference" where the backend matters."""

from __future__ import annotations

import copy
import io
import math

import torch
from torch import nn
from torch.nn import functional as F

from fusedaccum import GradAccumulator

N = 4  # micro-batches per window
B = 8  # samples per micro-batch
D_IN, D_HID, D_OUT = 6, 16, 3


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


def token_batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(1, 60, (N,), generator=g)]
    lengths[0] = 3  # make the lengths clearly unequal
    xs = [torch.randn(n, D_IN, generator=g) for n in lengths]
    ys = [torch.randn(n, D_OUT, generator=g) + 1.5 * (i % 2) for i, n in enumerate(lengths)]
    return lengths, xs, ys


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


def mid_window(weighted: bool = False):
    model = make_model()
    acc = GradAccumulator(torch.optim.Adam(model.parameters(), lr=1e-2), N, backend="cpu")
    xs, ys = make_data(2, seed=73)
    run_windows(model, acc, xs[:1], ys[:1], weights=[[2.0] * N] if weighted else None)  # inner state exists
    for i in range(2):
        loss_of(model, xs[1, i], ys[1, i]).backward()
        acc.step(weight=3.0 if weighted else None)
    loss_of(model, xs[1, 2], ys[1, 2]).backward()  # grads waiting for the next step
    return model, acc


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

class Dyadic(nn.Module):
    """loss = sum(p * x) + sum(q * x[:3]): grads are x itself, small integers, so every sum, 1/4 scaling and
    norm² is exact in float32 whatever the order of additions."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(5))
        self.q = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (self.p * x).sum() + (self.q * x[:3]).sum()


# ---------------------------------------------- helpers of the issue 11 regression tests


N_SMALL = 3


def small_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def small_batches(
    count: int, seed: int = 1, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g).to(dtype), torch.randn(4, 2, generator=g).to(dtype)) for _ in range(count)]


def small_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).float(), y.float())


def small_micro_step(model, acc, batch, weight=None) -> None:
    small_loss(model, batch).backward()
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


def bits_equal(a, b) -> bool:
    """Bitwise equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8)
                                                       if b.dim() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def build_adamw(dtype: torch.dtype, master_weights: bool, frozen: bool, seed: int = 0):
    model = small_model(seed, dtype)
    if frozen:
        model[0].bias.requires_grad_(False)
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N_SMALL, master_weights=master_weights)
    return model, acc
