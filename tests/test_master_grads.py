"""The float32 master gradients (fusedaccum/_master_grads.py): their precision, one flat buffer per (device,
dtype), the layout and its changes, params without grads, refused grads.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from wrapper_helpers import (
    D_HID,
    D_IN,
    D_OUT,
    N_SMALL,
    B,
    Branchy,
    N,
    assert_params_rel,
    bf16_grad_errors,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    small_batches,
    small_micro_step,
    small_model,
    snapshot,
)

from fusedaccum import GradAccumulator


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


def test_refused_add_param_group_leaves_the_wrapped_optimizer_alone():
    """Bug 7: a group the wrapper refuses (float64 params) was still added to the wrapped optimizer, and every later
    step() raised."""
    model = small_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N_SMALL)
    data = small_batches(N_SMALL)
    small_micro_step(model, acc, data[0])
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        acc.add_param_group({"params": [extra]})
    assert len(acc.optimizer.param_groups) == 1 and len(acc.param_groups) == 1
    for batch in data[1:]:
        small_micro_step(model, acc, batch)
    assert acc.stepped


def test_meta_device_params_are_refused_at_construction():
    """Bug 8: meta-device params were accepted; the window's last step() then failed with NotImplementedError after
    counting the micro-step, and step() never updated again."""
    with torch.device("meta"):
        model = small_model()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*meta device"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N_SMALL)


def test_params_sharing_one_grad_are_named():
    """Two params handed one .grad tensor: the refusal names the params, not the op's internal list indices."""
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    acc = GradAccumulator(torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1), N_SMALL)
    a.grad = b.grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and param_groups\[1\]\['params'\]\[0\] "
                                         r"have one \.grad tensor"):
        acc.step()
    assert acc.micro_step == 0
