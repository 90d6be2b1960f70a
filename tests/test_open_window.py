"""accumulation_steps=None: the window is everything between two step() calls (fusedaccum/_hooks.py,
OpenWindowHooks), for loops and frameworks that call step() once per window and own the accumulation knob.

Checked against a float64 large batch on fresh random data: windows of changing length with their true count,
the framework convention (the loss divided by N before backward, reduction="sum"), GradScaler driven by the caller
(scaler.step(acc) + scaler.update() once per window) or by the wrapper, and mid-window checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fusedaccum import GradAccumulator


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(count)]


def expected_sgd(model: nn.Module, windows: list[list[tuple[torch.Tensor, torch.Tensor]]], lr: float,
                 divide_by: str) -> list[torch.Tensor]:
    """SGD on a float64 copy: each window's gradient is the mean of its micro-batch gradients."""
    ref = copy.deepcopy(model).double()
    for window in windows:
        grads = [torch.zeros_like(p) for p in ref.parameters()]
        for x, y in window:
            ref.zero_grad()
            F.mse_loss(ref(x.double()), y.double()).backward()
            for g, p in zip(grads, ref.parameters()):
                g += p.grad / len(window)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= lr * g
    return [p.detach() for p in ref.parameters()]


def assert_close(model: nn.Module, expected: list[torch.Tensor], tol: float = 1e-6) -> None:
    for p, e in zip(model.parameters(), expected):
        err = (p.detach().double() - e).abs().max().item()
        assert err <= tol * e.abs().max().item(), err


@pytest.mark.parametrize("lengths", [[3, 1, 4], [2, 2, 2], [1]])
def test_windows_of_any_length_use_their_true_count(lengths):
    """Every step() applies the mean of the backwards since the last one: short and long windows alike."""
    model = make_model()
    start = copy.deepcopy(model)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.3), None)
    data = batches(sum(lengths), seed=sum(lengths))
    windows, i = [], 0
    for n in lengths:
        windows.append(data[i : i + n])
        i += n
    sched = torch.optim.lr_scheduler.StepLR(acc, step_size=100)
    for window in windows:
        for x, y in window:
            F.mse_loss(model(x), y).backward()
            assert acc.micro_step > 0
        acc.step()
        sched.step()
        assert acc.stepped and acc.micro_step == 0
    assert sched.last_epoch == len(lengths)
    assert_close(model, expected_sgd(start, windows, 0.3, "count"))


def test_framework_convention_loss_divided_by_n_and_sum():
    """What Trainer, Lightning and accelerate do: the loss divided by their own N, one step() per window."""
    model = make_model(1)
    start = copy.deepcopy(model)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.2), None, reduction="sum")
    data = batches(8, seed=5)
    for k in range(2):
        for x, y in data[4 * k : 4 * k + 4]:
            (F.mse_loss(model(x), y) / 4).backward()
        acc.step()
        acc.zero_grad()
    assert_close(model, expected_sgd(start, [data[:4], data[4:]], 0.2, "sum"))


def test_step_without_backward_does_nothing():
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.2), None)
    before = [p.detach().clone() for p in model.parameters()]
    assert acc.step() is None and not acc.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_weights_are_refused():
    model = make_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.2), None)
    F.mse_loss(model(torch.randn(2, 6)), torch.randn(2, 3)).backward()
    with pytest.raises(ValueError, match="weight"):
        acc.step(weight=2.0)
    assert acc.micro_step == 1


def _fp16_loop(model, opt, scaler, data, n, wrapped: bool) -> list[float]:
    scales = []
    for k in range(len(data) // n):
        for x, y in data[k * n : (k + 1) * n]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.mse_loss(model(x).float(), y) / n
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("poison_window", [None, 1])
def test_caller_driven_grad_scaler_matches_native(poison_window):
    """scaler.step(acc) + scaler.update() once per window, as frameworks drive fp16: accepted when the wrapper has
    that scaler (it unscales in its passes and records the window's inf flag for the caller's update). Same weights
    as native accumulation to float32 rounding, and the same scale schedule, a skipped window included."""
    data = batches(12, seed=9)
    if poison_window is not None:
        data[poison_window * 4 + 2] = (data[poison_window * 4 + 2][0] * 1e30, data[poison_window * 4 + 2][1])
    native_model, model = make_model(2), make_model(2)
    native_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    native_scales = _fp16_loop(native_model, torch.optim.SGD(native_model.parameters(), lr=0.1), native_scaler,
                               data, 4, wrapped=False)
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), None, reduction="sum", scaler=scaler)
    scales = _fp16_loop(model, acc, scaler, data, 4, wrapped=True)
    assert scales == native_scales
    assert acc.skipped_windows == (poison_window is not None)
    for p, q in zip(model.parameters(), native_model.parameters()):
        assert (p - q).abs().max() <= 1e-6 * q.abs().max()


def test_scaler_step_without_the_wrappers_scaler_is_refused():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), None)
    scaler.scale(F.mse_loss(model(torch.randn(2, 6)), torch.randn(2, 3))).backward()
    with pytest.raises(RuntimeError, match="was not given that scaler"):
        scaler.step(acc)


def test_mid_window_checkpoint_resumes_bit_identically():
    data = batches(7, seed=3)

    def run(model, acc, part):
        for i in part:
            F.mse_loss(model(data[i][0]), data[i][1]).backward()
            if i in (2, 6):
                acc.step()

    model = make_model()
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), None, max_grad_norm=0.5)
    run(model, acc, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "acc": acc.state_dict()}, buffer)
    run(model, acc, range(5, 7))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=4)
    resumed_model.load_state_dict(saved["model"])
    resumed = GradAccumulator(torch.optim.AdamW(resumed_model.parameters(), lr=1e-2), None, max_grad_norm=0.5)
    resumed.load_state_dict(saved["acc"])
    assert resumed.micro_step == 2
    run(resumed_model, resumed, range(5, 7))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_release_masters_between_windows_and_for_eval_changes_nothing():
    """README: ``acc.release_masters()`` at a window boundary frees the masters (their storage is 0 bytes until
    the next backward); the run is bit-identical to one that keeps them, with an eval forward between windows.
    Mid-window (after a backward, before step()) it is refused and changes nothing."""
    runs = []
    for release in (False, True):
        model = make_model(seed=3)
        acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=0.05), None, reduction="sum")
        data = batches(9, seed=4)
        for start, length in ((0, 3), (3, 4), (7, 2)):
            for x, y in data[start:start + length]:
                (F.mse_loss(model(x), y) / length).backward()
            if release:
                with pytest.raises(RuntimeError, match="release_masters.*middle of a window"):
                    acc.release_masters()
            acc.step()
            acc.zero_grad()
            if release:
                acc.release_masters()
                assert all(b.untyped_storage().nbytes() == 0 for b in acc._masters.buffers.values())
            with torch.no_grad():
                model(data[0][0])  # eval between windows
        runs.append([p.detach().clone() for p in model.parameters()])
    for kept, released in zip(*runs):
        assert torch.equal(kept, released)
