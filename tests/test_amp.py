"""The GradScaler link (fusedaccum/_amp.py): fp16 loops, refused scaler calls, exact unscaling.
"""

from __future__ import annotations

import copy

import pytest
import torch
from wrapper_helpers import (
    N,
    assert_params_equal,
    assert_rel,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    run_large_batch,
    snapshot,
    token_batches,
)

from fusedaccum import GradAccumulator


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
