"""accumulate_in_backward (fusedaccum/_hooks.py): the default mode's maths, bit for bit, with each grad freed at
once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from wrapper_helpers import (
    D_IN,
    D_OUT,
    N_SMALL,
    OPTIMIZERS,
    B,
    Branchy,
    Dyadic,
    N,
    assert_params_equal,
    assert_params_rel,
    assert_rel,
    assert_same,
    assert_same_state,
    bits_equal,
    deep_equal,
    loss_of,
    make_data,
    make_model,
    params_of,
    restored,
    run_windows,
    saved,
    small_batches,
    snapshot,
    through_disk,
    twin,
)

from fusedaccum import GradAccumulator


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


UNFREEZE_AT = 2 * N_SMALL - 1  # the last micro-step of the second window: its norm is summed in hook order


def run_with_late_unfreeze(data, save_at=None, peek_state_dict=False, resume_from=None):
    model = TwoBackwards()
    # Frozen when the hooks are registered (a resume rebuilds the model as it was when saved).
    model.body.bias.requires_grad_(resume_from is not None and resume_from["at"] >= UNFREEZE_AT)
    acc = GradAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2), N_SMALL, accumulate_in_backward=True,
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
    data = small_batches(4 * N_SMALL, dtype=torch.bfloat16)
    plain, _ = run_with_late_unfreeze(data)
    peeked, _ = run_with_late_unfreeze(data, peek_state_dict=True)
    assert bits_equal(peeked, plain)
    _, saved = run_with_late_unfreeze(data, save_at=UNFREEZE_AT)
    resumed, _ = run_with_late_unfreeze(data, resume_from=saved)
    assert bits_equal(resumed, plain)


def test_in_backward_sparse_grad_discards_the_window_with_a_clear_error():
    """A sparse grad in accumulate_in_backward mode raised inside backward after earlier grads had been added, and
    left them in a half-counted micro-step. Now the window is dropped and the error says so: the next window is
    exactly a fresh wrapper's."""
    def build_sparse():
        torch.manual_seed(0)
        embedding, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1)
        acc = GradAccumulator(torch.optim.SGD([*embedding.parameters(), *head.parameters()], lr=0.1), N_SMALL,
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
        for _ in range(N_SMALL):
            h(e(tokens)).sum().backward()
            a.step()
        assert a.stepped
    assert_same(params_of(head), params_of(fresh_head))
