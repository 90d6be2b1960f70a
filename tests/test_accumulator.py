"""GradAccumulator, the facade: exact large-batch maths end to end, the Optimizer contract (schedulers, closures,
return values, step hooks, copies) and the single-process PITFALLS.md rows it makes impossible (each such test names
its row).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from wrapper_helpers import (
    D_IN,
    D_OUT,
    N_SMALL,
    OPTIMIZERS,
    N,
    assert_params_equal,
    assert_params_rel,
    assert_rel,
    assert_same,
    loss_of,
    make_data,
    make_model,
    params_of,
    run_large_batch,
    run_windows,
    small_batches,
    small_loss,
    small_micro_step,
    small_model,
    through_disk,
)

from fusedaccum import GradAccumulator


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
    eager_model, compiled_model = small_model(), small_model()
    eager = GradAccumulator(torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9), N_SMALL)
    compiled = GradAccumulator(torch.optim.SGD(compiled_model.parameters(), lr=0.1, momentum=0.9), N_SMALL)

    def train_step(model, acc, batch):
        small_loss(model, batch).backward()
        acc.step()
        acc.zero_grad()

    if how == "compiled_train_step":
        compiled_step = torch.compile(train_step)
    else:
        step = torch.compile(compiled.step)

        def compiled_step(model, acc, batch):
            small_loss(model, batch).backward()
            step()
            acc.zero_grad()

    updates = 0
    for batch in small_batches(3 * N_SMALL):
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
    model = small_model()
    acc = GradAccumulator(FailsOnce(model.parameters(), lr=0.1), N_SMALL, accumulate_in_backward=in_backward)
    data = small_batches(2 * N_SMALL)
    for batch in data[: N_SMALL - 1]:
        small_micro_step(model, acc, batch)
    small_loss(model, data[N_SMALL - 1]).backward()
    with pytest.raises(RuntimeError, match="optimizer failure"):
        acc.step()
    assert acc.micro_step == 0 and not acc.stepped
    before = params_of(model)
    for batch in data[N_SMALL:]:
        small_micro_step(model, acc, batch)
    assert acc.stepped and acc.micro_step == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_flush_as_the_first_update_after_a_resume_does_not_warn():
    """After a resume, a flush() that applies the first update must count as optimizer.step() for an LR scheduler
    (torch warned "lr_scheduler.step() before optimizer.step()", contrary to the README)."""
    model = small_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N_SMALL)
    sched = torch.optim.lr_scheduler.StepLR(acc, step_size=1, gamma=0.5)
    data = small_batches(2)
    small_micro_step(model, acc, data[0])
    state = through_disk({"acc": acc.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()})

    model2 = small_model(seed=5)
    model2.load_state_dict(state["model"])
    acc2 = GradAccumulator(torch.optim.SGD(model2.parameters(), lr=0.1), N_SMALL)
    acc2.load_state_dict(state["acc"])
    sched2 = torch.optim.lr_scheduler.StepLR(acc2, step_size=1, gamma=0.5)
    sched2.load_state_dict(state["sched"])
    small_micro_step(model2, acc2, data[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc2.flush()
        sched2.step()


def test_closure_that_is_not_callable_is_refused():
    model = small_model()
    acc = GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N_SMALL)
    small_loss(model, small_batches(1)[0]).backward()
    with pytest.raises(TypeError, match="closure must be a callable"):
        acc.step(5)
    assert acc.micro_step == 0 and all(p.grad is not None for p in model.parameters())
