"""float32 master weights of bf16/fp16 params (fusedaccum/_master_weights.py).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from wrapper_helpers import (
    D_IN,
    D_OUT,
    N_SMALL,
    B,
    N,
    bits_equal,
    build_adamw,
    loss_of,
    make_data,
    make_model,
    run_large_batch,
    run_windows,
    small_batches,
    small_micro_step,
    through_disk,
)

from fusedaccum import GradAccumulator


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


def test_overlapping_low_precision_params_with_master_weights_are_refused_at_construction():
    """Before: the fp32 copies were stepped, then the write-back refused: nothing applied, but the state moved."""
    storage = torch.randn(10).bfloat16()
    a = nn.Parameter(storage[:6])
    b = nn.Parameter(storage[4:])
    with pytest.raises(ValueError, match="share memory"):
        GradAccumulator(torch.optim.SGD([a, b], lr=0.1), N_SMALL, master_weights=True)
    GradAccumulator(torch.optim.SGD([a, b], lr=0.1), N_SMALL)  # without master weights nothing is written back


def test_wrapped_optimizer_state_dict_with_master_weights_works_and_round_trips():
    """Bug 4: with master_weights=True the wrapped optimizer's state is keyed by the float32 copies, which are not in
    its param_groups, so acc.optimizer.state_dict() raised KeyError after the first update. Now it works, keeps the
    float32 state, leaves the model's params in the param_groups, and loads back into a fresh wrapper's optimizer
    unchanged (the master weights themselves are in acc.state_dict(), which resumes bit-identically)."""
    dtype = torch.bfloat16
    data = small_batches(3 * N_SMALL, dtype=dtype)
    model, acc = build_adamw(dtype, master_weights=True, frozen=False)
    for batch in data[: 2 * N_SMALL]:
        small_micro_step(model, acc, batch)
    saved = through_disk(acc.optimizer.state_dict())
    assert all(p is q for p, q in zip(acc.param_groups[0]["params"], model.parameters()))
    assert saved["state"] and all(v.dtype == torch.float32 for s in saved["state"].values()
                                  for k, v in s.items() if k != "step")
    assert bits_equal(saved["state"], through_disk(acc.state_dict())["state"])

    resumed_model, resumed = build_adamw(dtype, master_weights=True, frozen=False, seed=3)
    resumed.optimizer.load_state_dict(saved)
    assert all(p is q for p, q in zip(resumed.param_groups[0]["params"], resumed_model.parameters()))
    assert bits_equal(through_disk(resumed.optimizer.state_dict()), saved)
    for batch in data[2 * N_SMALL:]:
        small_micro_step(resumed_model, resumed, batch)
    assert resumed.stepped and resumed.optimizer.state_dict()["state"][0]["step"].item() == 3
    with pytest.raises(ValueError, match="different number of parameter groups"):
        resumed.optimizer.load_state_dict({"state": {}, "param_groups": []})
    assert all(p is q for p, q in zip(resumed.param_groups[0]["params"], resumed_model.parameters()))
