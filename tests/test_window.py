"""The window (fusedaccum/_window.py and the window's end in the facade): mean, sum and weighted means, short
windows, clipping on the whole window, skipped and refused windows, bad weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from wrapper_helpers import (
    D_IN,
    D_OUT,
    B,
    N,
    assert_params_rel,
    assert_rel,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    mid_window,
    run_large_batch,
    run_windows,
    snapshot,
    token_batches,
)

from fusedaccum import GradAccumulator


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
    model, acc = mid_window(weighted=True)
    before = snapshot(model, acc)
    with pytest.raises(error, match=match):
        acc.step(weight=weight)
    assert deep_equal(snapshot(model, acc), before)


def test_mixed_weighting_in_a_window_is_refused():
    """weight= on some micro-steps of a window and not on others is ambiguous: refused, nothing changes."""
    model, acc = mid_window(weighted=False)
    before = snapshot(model, acc)
    with pytest.raises(ValueError, match="every micro-step"):
        acc.step(weight=5.0)
    assert deep_equal(snapshot(model, acc), before)
    acc.step()
    assert acc.micro_step == 3


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
