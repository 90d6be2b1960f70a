"""GradAccumulator in everyday moves that an independent check found broken (issue 11): a compiled train step, a
refused add_param_group, meta-device params, a failing update, frozen params and checkpoints, malformed state
dicts, extreme weights, the wrapped optimizer's own state_dict. Each test names the bug it pins."""

from __future__ import annotations

import io
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
