"""GradAccumulator across processes: CPU, gloo, loopback, processes started by the tests themselves.

Each scenario is a test of its own, for 2 and 3 processes. One group of worker processes per world size goes through
the scenarios (starting processes and importing torch dominates the cost); the workers assert, a failure comes back
as the worker's traceback, and the scenarios after a failed one run in a new group, so no failure hides another.
Every scenario is checked against a single-process large batch of the same global batch, computed in the worker.
"""

from __future__ import annotations

import io
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedaccum

W = 3  # accumulation_steps
ROWS = 4  # rows per micro-batch in the unweighted scenario
LR, MOMENTUM, MAX_NORM = 0.1, 0.9, 0.05  # MAX_NORM is small enough that every window is clipped
REL = 1e-6
BUCKET = 64  # float32 elements per all-reduce bucket in the plain scenario: the 174-element buffer makes 3 buckets


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def _rel_err(ours: torch.Tensor, want: torch.Tensor) -> float:
    return ((ours.double() - want.double()).norm() / want.double().norm()).item()


def _record_grads(opt: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """The gradients the optimizer steps with, one list per update: what accumulation computes, compared directly
    (a difference of fp32 weights before and after would mostly measure the weights' own rounding)."""
    seen: list[list[torch.Tensor | None]] = []
    opt.register_step_pre_hook(
        lambda o, args, kwargs: seen.append(
            [None if p.grad is None else p.grad.detach().clone() for g in o.param_groups for p in g["params"]]
        )
    )
    return seen


def _assert_rel_close(
    model: torch.nn.Module, ref: torch.nn.Module, grads: list[list[torch.Tensor]], ref_grads: list[list[torch.Tensor]],
    what: str,
) -> None:
    assert len(grads) == len(ref_grads), f"{what}: {len(grads)} updates, the reference made {len(ref_grads)}"
    for k, (ours, want) in enumerate(zip(grads, ref_grads)):
        for g, r in zip(ours, want):
            assert (g is None) == (r is None), f"{what}: update {k}: a gradient is None on one side only"
            if g is None:
                continue
            err = _rel_err(g, r)
            assert err <= REL, f"{what}: update {k}: gradient relative error {err:.3g} > {REL}"
    for p, r in zip(model.parameters(), ref.parameters()):
        err = _rel_err(p.detach(), r.detach())
        assert err <= REL, f"{what}: weights relative error {err:.3g} > {REL}"


def _assert_replicas_identical(model: torch.nn.Module, world: int, what: str) -> None:
    for p in model.parameters():
        copies = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(copies, p.detach().contiguous())
        for c in copies[1:]:
            assert torch.equal(c, copies[0]), f"{what}: replicas differ"


def _assert_buckets_tile(buckets: list[torch.Tensor], buffer: torch.Tensor, what: str) -> None:
    """The all-reduced tensors are consecutive views of ``buffer`` that cover it exactly, each <= BUCKET long,
    issued from the end of the buffer to its start (the order in which backward finishes the params)."""
    assert len(buckets) == -(-buffer.numel() // BUCKET), f"{what}: {len(buckets)} buckets for {buffer.numel()}"
    stop = buffer.data_ptr() + buffer.numel() * buffer.element_size()
    for b in buckets:
        assert b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), f"{what}: not a view"
        end = b.data_ptr() + b.numel() * b.element_size()
        assert end == stop and b.is_contiguous() and b.numel() <= BUCKET, f"{what}: bucket out of place"
        stop = b.data_ptr()
    assert stop == buffer.data_ptr(), f"{what}: the buckets miss the start of the buffer"


def _batches(seed: int, world: int, windows: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fresh inputs and targets for every micro-batch: ``data[k][r, i]`` is rank r's micro-step i of window k
    (ROWS rows each). The same on every rank and in the reference, which sees them all."""
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(world, n, ROWS, 7, generator=gen) for n in windows]
    targets = [torch.randn(world, n, ROWS, 5, generator=gen) for n in windows]
    return data, targets


class _CountAllReduce:
    """Replaces torch.distributed.all_reduce (which the wrapper looks up at call time) and logs every call, and
    every wait on an asynchronous one, in order (``events``: "issue" / "wait")."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []
        self.events: list[str] = []
        self._real = dist.all_reduce

    def __call__(self, tensor: torch.Tensor, *args, **kwargs):
        self.calls.append(tensor)
        self.events.append("issue")
        work = self._real(tensor, *args, **kwargs)
        return _LoggedWork(work, self.events) if kwargs.get("async_op") else work


class _LoggedWork:
    def __init__(self, work, events: list[str]) -> None:
        self._work, self._events = work, events

    def wait(self, *args, **kwargs):
        self._events.append("wait")
        return self._work.wait(*args, **kwargs)


def _scenario_plain(rank: int, world: int) -> None:
    """process_group="default", unweighted mean, global-norm clipping, a NaN on the last rank in window 1, a short
    window flushed at the end: equivalence, collective counts, same skip everywhere, bit-identical replicas."""
    windows = [W, W, W, W - 1]  # micro-steps per window on every rank; the last one is short and flushed
    data, targets = _batches(1, world, windows)
    nan_window = 1

    model, ref = _model(), _model()
    inner, ref_opt = _sgd(model), _sgd(ref)
    grads, ref_grads = _record_grads(inner), _record_grads(ref_opt)
    acc = fusedaccum.GradAccumulator(
        inner, W, max_grad_norm=MAX_NORM, process_group="default", bucket_cap_mb=BUCKET * 4 / 2**20
    )
    masters = [b.buffer for b in acc.master_grad_buffers()]
    assert len(masters) == 1 and masters[0].numel() > 2 * BUCKET

    counter = _CountAllReduce()
    dist.all_reduce = counter
    try:
        for k, n in enumerate(windows):
            for i in range(n):
                before, events_before = len(counter.calls), len(counter.events)
                F.mse_loss(model(data[k][rank, i]), targets[k][rank, i]).backward()
                if k == nan_window and i == 0 and rank == world - 1:
                    next(model.parameters()).grad[0, 0] = float("nan")
                acc.step()
                acc.zero_grad()
                made = counter.calls[before:]
                if i + 1 < W:
                    assert made == [], f"window {k} micro-step {i}: {len(made)} all-reduce(s) on a non-final step"
                else:
                    # The flat master buffer exactly once, in buckets, then one small metadata tensor.
                    assert made[-1].dtype == torch.float64 and made[-1].numel() < 16, f"window {k}: no metadata"
                    _assert_buckets_tile(made[:-1], masters[0], f"window {k}")
                    # All issued back to back, then all waited on: the buckets are in flight together.
                    assert counter.events[events_before:] == ["issue"] * len(made) + ["wait"] * len(made)
            if n < W:
                before = len(counter.calls)
                assert acc.flush()
                made = counter.calls[before:]
                assert made[-1].dtype == torch.float64
                _assert_buckets_tile(made[:-1], masters[0], "flush")
            assert acc.stepped == (k != nan_window)
    finally:
        dist.all_reduce = counter._real
    assert acc.skipped_windows == 1

    for k in range(len(windows)):
        if k == nan_window:
            continue  # every rank skipped it: the reference never sees it
        ref_opt.zero_grad()
        F.mse_loss(ref(data[k].reshape(-1, 7)), targets[k].reshape(-1, 5)).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        assert norm > MAX_NORM  # the clip is exercised
        ref_opt.step()
    # The last window's norm is the global one (a rank-local norm would differ by far more than this).
    assert abs(acc.grad_norm.item() - norm.item()) <= REL * norm.item()
    _assert_rel_close(model, ref, grads, ref_grads, "plain")
    _assert_replicas_identical(model, world, "plain")


def _scenario_ddp_weighted(rank: int, world: int) -> None:
    """A DDP model passed as ddp_module: DDP does not reduce on any backward (each rank's .grad is its own), and
    token-count weights that differ across ranks give the global token mean."""
    gen = torch.Generator().manual_seed(2)
    windows = 2
    # rows[k][r][i]: an uneven row count for every micro-batch of every rank
    rows = torch.randint(1, 9, (windows, world, W), generator=gen).tolist()
    data = [[[torch.randn(n, 7, generator=gen) for n in per_rank] for per_rank in per_window] for per_window in rows]
    targets = [[[torch.randn(x.shape[0], 5, generator=gen) for x in per_rank] for per_rank in per_window]
               for per_window in data]

    local, ref = _model(), _model()
    model = torch.nn.parallel.DistributedDataParallel(_model())
    inner, ref_opt = _sgd(model), _sgd(ref)
    grads, ref_grads = _record_grads(inner), _record_grads(ref_opt)
    acc = fusedaccum.GradAccumulator(inner, W, ddp_module=model)
    for k in range(windows):
        local.load_state_dict(model.module.state_dict())
        for i in range(W):
            x, y = data[k][rank][i], targets[k][rank][i]
            F.mse_loss(model(x), y).backward()
            local.zero_grad()
            F.mse_loss(local(x), y).backward()
            for p, q in zip(model.parameters(), local.parameters()):
                # Equal to this rank's own gradient: DDP reduced nothing (its mean would differ on every rank).
                assert torch.equal(p.grad, q.grad), f"window {k} micro-step {i}: DDP changed the gradient"
            acc.step(weight=x.shape[0])
        assert acc.stepped
        ref_opt.zero_grad()
        xs = torch.cat([x for per_rank in data[k] for x in per_rank])
        ys = torch.cat([y for per_rank in targets[k] for y in per_rank])
        F.mse_loss(ref(xs), ys).backward()  # the mean over every row of the global batch
        ref_opt.step()
    _assert_rel_close(model.module, ref, grads, ref_grads, "ddp weighted")
    _assert_replicas_identical(model, world, "ddp weighted")


def _scenario_attach_and_refusals(rank: int, world: int) -> None:
    """nanoGPT's order (optimizer and wrapper built before DDP wraps the model): acc.attach(ddp_module=...) makes it
    the ddp_module run; an open window (accumulation_steps=None) reduced at step(). Refused, on every rank, before
    anything changes: a wrapper with no reduction in a multi-process run, and DDP's require_backward_grad_sync
    switched back on."""
    windows = [W, W]
    data, targets = _batches(7, world, windows)
    for steps in (W, None):
        plain, ref = _model(), _model()
        inner, ref_opt = _sgd(plain), _sgd(ref)
        grads, ref_grads = _record_grads(inner), _record_grads(ref_opt)
        acc = fusedaccum.GradAccumulator(inner, steps)
        F.mse_loss(plain(data[0][rank, 0]), targets[0][rank, 0]).backward()
        with pytest.raises(RuntimeError, match="given no ddp_module, process_group or fsdp_module"):
            acc.step()
        assert acc.micro_step == (0 if steps else 1)  # the open window counted the backward; nothing else moved
        plain.zero_grad()
        acc = fusedaccum.GradAccumulator(inner, steps)
        model = torch.nn.parallel.DistributedDataParallel(plain)
        acc.attach(ddp_module=model)
        assert not model.require_backward_grad_sync
        for k, n in enumerate(windows):
            for i in range(n):
                if steps and k == 1 and i == n - 1:
                    model.require_backward_grad_sync = True  # nanoGPT's line, on the window's last micro-step
                    F.mse_loss(model(data[k][rank, i]), targets[k][rank, i]).backward()
                    with pytest.raises(RuntimeError, match="require_backward_grad_sync was switched back on"):
                        acc.step()
                    model.require_backward_grad_sync = False
                    acc.zero_grad()
                F.mse_loss(model(data[k][rank, i]), targets[k][rank, i]).backward()
                if steps or i == n - 1:
                    acc.step()
            assert acc.stepped
        for k in range(len(windows)):
            ref_opt.zero_grad()
            F.mse_loss(ref(data[k].reshape(-1, 7)), targets[k].reshape(-1, 5)).backward()
            ref_opt.step()
        _assert_rel_close(model.module, ref, grads, ref_grads, f"attach, accumulation_steps={steps}")
        _assert_replicas_identical(model, world, f"attach, accumulation_steps={steps}")


def _scenario_ddp_checkpoint(rank: int, world: int) -> None:
    """DDP, checkpoint mid-window: every rank saves acc.state_dict() and the model's state at micro-step CUT of
    window 1, a fresh model/DDP/optimizer/wrapper (other initial weights) loads them and trains on; the weights
    are bit-identical to a run that never stopped. The run ends with a short window flushed under DDP, checked
    against the single-process large batch."""
    windows = [W, W, W - 1]  # the last window is short: flush() must divide by world x (W - 1)
    cut_window, cut = 1, 1  # save after micro-step 1 of window 1: the masters hold one rank-local partial sum
    data, targets = _batches(3, world, windows)
    schedule = [(k, i) for k, n in enumerate(windows) for i in range(n)]

    def build(seed: int) -> tuple[torch.nn.Module, fusedaccum.GradAccumulator]:
        torch.manual_seed(seed)
        ddp = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
        )
        return ddp, fusedaccum.GradAccumulator(_sgd(ddp), W, ddp_module=ddp)

    # The run that never stops (seed 0: the reference's initial weights).
    whole, whole_acc = build(0)
    grads = _record_grads(whole_acc.optimizer)
    _train_schedule(whole, whole_acc, schedule, data, targets, windows, rank)
    resumed = _assert_resumes_bitwise(
        whole, build, schedule, schedule.index((cut_window, cut)) + 1, (data, targets, windows, rank),
        state_of=lambda ddp: ddp.module, weights_only=True, what="ddp checkpoint",
    )
    _assert_replicas_identical(resumed, world, "ddp checkpoint")

    ref = _model()
    ref_opt = _sgd(ref)
    ref_grads = _record_grads(ref_opt)
    for k in range(len(windows)):
        ref_opt.zero_grad()
        F.mse_loss(ref(data[k].reshape(-1, 7)), targets[k].reshape(-1, 5)).backward()
        ref_opt.step()
    _assert_rel_close(whole.module, ref, grads, ref_grads, "ddp checkpoint (short last window)")


def _train_schedule(
    model: torch.nn.Module, acc: fusedaccum.GradAccumulator, steps: list[tuple[int, int]],
    data: list[torch.Tensor], targets: list[torch.Tensor], windows: list[int], rank: int,
) -> None:
    """This rank's micro-steps ``steps`` ((window, micro-step) pairs); a short window is flushed at its end."""
    for k, i in steps:
        F.mse_loss(model(data[k][rank, i]), targets[k][rank, i]).backward()
        acc.step()
        acc.zero_grad()
        if i + 1 == windows[k] and windows[k] < W:
            assert acc.flush(), f"window {k}: the short window was not applied"


def _assert_resumes_bitwise(
    whole: torch.nn.Module,
    build: Callable[[int], tuple[torch.nn.Module, fusedaccum.GradAccumulator]],
    schedule: list[tuple[int, int]],
    split: int,
    batches: tuple[list[torch.Tensor], list[torch.Tensor], list[int], int],
    state_of: Callable[[torch.nn.Module], torch.nn.Module],
    weights_only: bool,
    what: str,
) -> torch.nn.Module:
    """Checkpoint mid-window: ``build(0)`` trained for the first ``split`` micro-steps of ``schedule`` (stopping
    mid-window), saved through torch.save (``state_of(model)``'s state and ``acc.state_dict()``), loaded into
    ``build(5)`` (other initial weights, so nothing carries over but what the checkpoint holds) and trained on,
    ends bit-identical to ``whole``, the run that never stopped. Returns the resumed model."""
    first, first_acc = build(0)
    _train_schedule(first, first_acc, schedule[:split], *batches)
    micro_step = first_acc.micro_step
    assert micro_step == schedule[split - 1][1] + 1 and not first_acc.stepped, f"{what}: not stopped mid-window"
    blob = io.BytesIO()
    torch.save({"model": state_of(first).state_dict(), "acc": first_acc.state_dict()}, blob)
    del first, first_acc
    blob.seek(0)
    saved = torch.load(blob, weights_only=weights_only)

    resumed, resumed_acc = build(5)
    assert not torch.equal(_local(next(resumed.parameters())), _local(next(whole.parameters())))
    state_of(resumed).load_state_dict(saved["model"])
    resumed_acc.load_state_dict(saved["acc"])
    assert resumed_acc.micro_step == micro_step
    _train_schedule(resumed, resumed_acc, schedule[split:], *batches)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(_local(p), _local(q)), f"{what}: resumed mid-window, the weights differ"
    return resumed


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: an FSDP2 shard's local tensor, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class _Branchy(torch.nn.Module):
    """The test model plus a last layer a micro-batch may skip: its params then get no grad in that backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(7, 13)
        self.head = torch.nn.Linear(13, 5)
        self.extra = torch.nn.Linear(5, 5)

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = self.head(torch.tanh(self.body(x)))
        return self.extra(h) if use_extra else h


def _count_before_body_grads(model: _Branchy, counter: _CountAllReduce) -> list[int]:
    """Records len(counter.calls) each time backward reaches the body's output, i.e. after the head's and the
    extra layer's grads are final and before the body's are computed."""
    seen: list[int] = []

    def on_forward(module: torch.nn.Module, inputs: object, out: torch.Tensor) -> None:
        out.register_hook(lambda grad: seen.append(len(counter.calls)))

    model.body.register_forward_hook(on_forward)
    return seen


def _scenario_overlap_bitwise(rank: int, world: int) -> None:
    """accumulate_in_backward under DDP: the last backward issues the buckets as their params become final (the
    first before the backward reaches the body), step() adds only the metadata; the weights equal the default
    distributed mode's bit for bit."""
    windows = [W, W, W - 1]  # the last one short, flushed
    data, targets = _batches(4, world, windows)
    cap = BUCKET * 4 / 2**20

    plain, hooked = _Branchy(), torch.nn.parallel.DistributedDataParallel(_Branchy())
    plain_acc = fusedaccum.GradAccumulator(_sgd(plain), W, max_grad_norm=MAX_NORM, process_group="default",
                                           bucket_cap_mb=cap)
    acc = fusedaccum.GradAccumulator(_sgd(hooked), W, max_grad_norm=MAX_NORM, ddp_module=hooked, bucket_cap_mb=cap,
                                     accumulate_in_backward=True)
    (buffer,) = [b.buffer for b in acc.master_grad_buffers()]
    n_buckets = -(-buffer.numel() // BUCKET)
    assert n_buckets >= 3
    counter = _CountAllReduce()
    at_body = _count_before_body_grads(hooked.module, counter)
    dist.all_reduce = counter
    try:
        for k, n in enumerate(windows):
            for i in range(n):
                x, y = data[k][rank, i], targets[k][rank, i]
                F.mse_loss(plain(x), y).backward()
                plain_acc.step()
                before, events_before = len(counter.calls), len(counter.events)
                F.mse_loss(hooked(x), y).backward()
                in_backward = counter.events[events_before:]
                acc.step()
                if i + 1 < W:
                    assert len(counter.calls) == before, f"window {k} micro-step {i}: a collective on a non-final step"
                    continue
                # The whole buffer was issued during the last backward, the first bucket before the body's grads
                # existed; nothing was waited on inside backward. step() added the metadata, then waited.
                assert in_backward == ["issue"] * n_buckets, f"window {k}: {in_backward} during the last backward"
                assert at_body[-1] - before >= 1, f"window {k}: no bucket issued before backward reached the body"
                _assert_buckets_tile(counter.calls[before : before + n_buckets], buffer, f"window {k}")
                assert counter.calls[-1].dtype == torch.float64, f"window {k}: step() did not add the metadata"
                assert counter.events[events_before + n_buckets :] == ["issue"] + ["wait"] * (n_buckets + 1)
            if n < W:
                assert plain_acc.flush() and acc.flush()
            for p, q in zip(plain.parameters(), hooked.module.parameters()):
                assert torch.equal(p, q), f"window {k}: accumulate_in_backward differs from the default mode"
            assert torch.equal(plain_acc.grad_norm, acc.grad_norm)
    finally:
        dist.all_reduce = counter._real
    _assert_replicas_identical(hooked, world, "overlap bitwise")


def _scenario_overlap_edges(rank: int, world: int) -> None:
    """accumulate_in_backward with process_group: a param unused on one rank in the last micro-step (its bucket,
    and the ones after it, wait for the end of that rank's backward, so a collective of the user's between
    backward() and step() still pairs up on every rank), a NaN on one rank (every rank skips), two backwards in the
    last micro-step after the buckets were issued (the second one's grads are reduced at step() on every rank), a
    short window in which a layer gets no grad anywhere, parameters added while the reduction is under way
    (refused, nothing changed): equal to the single-process large batch."""
    windows = [W, W, W, W, W - 1]
    data, targets = _batches(5, world, windows)
    use = [[[True] * n for _ in range(world)] for n in windows]
    use[1][world - 1][W - 1] = False  # unused on the last rank in window 1's last micro-step
    use[4] = [[False] * windows[4] for _ in range(world)]  # unused everywhere in the short last window
    nan_window, late_window = 2, 3
    data[nan_window][0, 0, 0, 0] = float("nan")  # rank 0, micro-step 0: every grad of that backward is nan

    model, ref = _Branchy(), _Branchy()
    inner, ref_opt = _sgd(model), _sgd(ref)
    grads, ref_grads = _record_grads(inner), _record_grads(ref_opt)
    acc = fusedaccum.GradAccumulator(inner, W, max_grad_norm=MAX_NORM, process_group="default",
                                     bucket_cap_mb=BUCKET * 4 / 2**20, accumulate_in_backward=True)
    (buffer,) = [b.buffer for b in acc.master_grad_buffers()]
    n_buckets = -(-buffer.numel() // BUCKET)
    counter = _CountAllReduce()
    at_body = _count_before_body_grads(model, counter)
    dist.all_reduce = counter
    try:
        for k, n in enumerate(windows):
            for i in range(n):
                x, y, u = data[k][rank, i], targets[k][rank, i], use[k][rank][i]
                before = len(counter.calls)
                if k == late_window and i + 1 == W and rank == 0:
                    half = ROWS // 2  # the mean over ROWS rows, as two backwards of half the rows each
                    (0.5 * F.mse_loss(model(x[:half], u), y[:half])).backward()
                    assert len(counter.calls) - before == n_buckets
                    (0.5 * F.mse_loss(model(x[half:], u), y[half:])).backward()
                else:
                    F.mse_loss(model(x, u), y).backward()
                issued_in_backward = len(counter.calls) - before
                if i + 1 == W and k == 0:
                    group_count = len(inner.param_groups)
                    with pytest.raises(RuntimeError, match="add_param_group.*nothing was changed"):
                        acc.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
                    assert len(inner.param_groups) == group_count
                if i + 1 == W and k == 1:
                    # A collective of the user's between the last backward and step() (e.g. logging the loss).
                    token = torch.tensor([float(rank + 1)])
                    counter._real(token)
                    assert token.item() == world * (world + 1) / 2, "collectives paired up differently on the ranks"
                acc.step()
                if i + 1 < W:
                    continue
                # Every bucket went out during the last backward (those the unused layer held back, at its end).
                assert issued_in_backward == n_buckets, f"window {k}: {issued_in_backward} issued in backward"
                if k == 1:  # the unused layer's bucket holds back every bucket until the end of that backward
                    assert (at_body[-1] == before) == (rank == world - 1), f"window {k}: issued before the body"
                made = counter.calls[before + issued_in_backward :]
                _assert_buckets_tile(counter.calls[before : before + n_buckets], buffer, f"window {k}")
                assert made[0].dtype == torch.float64  # the metadata, after every bucket
                # The late grads: one more all-reduce on every rank (the others contribute zeros).
                assert len(made) == 1 + (k == late_window), f"window {k}: {len(made)} at step()"
            if n < W:
                assert acc.flush()
            assert acc.stepped == (k != nan_window) or n < W
    finally:
        dist.all_reduce = counter._real
    assert acc.skipped_windows == 1
    assert model.extra.weight.grad is None

    for k, n in enumerate(windows):
        if k == nan_window:
            continue
        ref_opt.zero_grad(set_to_none=True)
        total = sum(F.mse_loss(ref(data[k][r, i], use[k][r][i]), targets[k][r, i])
                    for r in range(world) for i in range(n))
        (total / (world * n)).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        ref_opt.step()
    assert abs(acc.grad_norm.item() - norm.item()) <= REL * norm.item()
    _assert_rel_close(model, ref, grads, ref_grads, "overlap edges")
    _assert_replicas_identical(model, world, "overlap edges")


def _cpu_mesh(world: int):
    """FSDP2 on the CPU explicitly: without a mesh, fully_shard shards onto the machine's accelerator when it has
    one (the GPU machine runs this suite too, all ranks on one GPU, over gloo)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _scenario_fsdp(rank: int, world: int) -> None:
    """FSDP2 (fully_shard per layer and at the root, float32 reduce-scatter): the wrapper accumulates each rank's
    gradient shards; a NaN in one rank's shard skips the window on every rank; the clipping norm is the global
    one; one small all-reduce per window and none on other micro-steps; a short window flushed at the end. Equal to
    the single-process large batch (3 ranks shard unevenly)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    windows = [W, W, W, W - 1]
    data, targets = _batches(6, world, windows)
    nan_window = 1

    model, ref = _model(), _model()
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=_cpu_mesh(world), mp_policy=policy)
    fully_shard(model, mesh=_cpu_mesh(world), mp_policy=policy)
    inner, ref_opt = _sgd(model), _sgd(ref)
    ref_grads = _record_grads(ref_opt)
    grads: list[list[torch.Tensor]] = []  # the whole gradients the sharded optimizer steps with (all-gathered)
    inner.register_step_pre_hook(
        lambda o, args, kwargs: grads.append([p.grad.full_tensor() for g in o.param_groups for p in g["params"]])
    )
    acc = fusedaccum.GradAccumulator(inner, W, max_grad_norm=MAX_NORM, fsdp_module=model)
    (buffer,) = acc.master_grad_buffers()
    local = sum(p.to_local().numel() for p in model.parameters())
    assert local < sum(p.numel() for p in model.parameters()) and buffer.buffer.numel() < local + 16, "not sharded"

    counter = _CountAllReduce()
    dist.all_reduce = counter
    try:
        for k, n in enumerate(windows):
            for i in range(n):
                before = len(counter.calls)
                F.mse_loss(model(data[k][rank, i]), targets[k][rank, i]).backward()
                if k == nan_window and i == 0 and rank == 0:
                    with torch.no_grad():  # in this rank's shard only: the other ranks' grads stay finite
                        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
                acc.step()
                made = counter.calls[before:]
                if i + 1 < W:
                    assert made == [], f"window {k} micro-step {i}: {len(made)} all-reduce(s) on a non-final step"
                else:
                    assert len(made) == 1 and made[0].dtype == torch.float64 and made[0].numel() == 2, made
            if n < W:
                assert acc.flush()
            assert acc.stepped == (k != nan_window), f"window {k}"
    finally:
        dist.all_reduce = counter._real
    assert acc.skipped_windows == 1

    for k in range(len(windows)):
        if k == nan_window:
            continue
        ref_opt.zero_grad()
        F.mse_loss(ref(data[k].reshape(-1, 7)), targets[k].reshape(-1, 5)).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        assert norm > MAX_NORM
        ref_opt.step()
    assert abs(acc.grad_norm.item() - norm.item()) <= REL * norm.item()
    full = torch.nn.Module()  # the whole weights, gathered from the shards, to compare with the reference
    full.params = torch.nn.ParameterList([torch.nn.Parameter(p.full_tensor()) for p in model.parameters()])
    _assert_rel_close(full, ref, grads, ref_grads, "fsdp")


def _scenario_fsdp_checkpoint(rank: int, world: int) -> None:
    """FSDP2, checkpoint mid-window: each rank saves its sharded model state and acc.state_dict() (its gradient
    shards' partial sums) through torch.save; a fresh sharded model/optimizer/wrapper with other initial weights
    loads them and trains on; its shards are bit-identical to a run that never stopped."""
    from torch.distributed.fsdp import fully_shard

    windows = [W, W, W - 1]
    data, targets = _batches(7, world, windows)
    schedule = [(k, i) for k, n in enumerate(windows) for i in range(n)]

    def build(seed: int) -> tuple[torch.nn.Module, fusedaccum.GradAccumulator]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
        fully_shard(model, mesh=_cpu_mesh(world))
        return model, fusedaccum.GradAccumulator(_sgd(model), W, max_grad_norm=MAX_NORM, fsdp_module=model)

    whole, whole_acc = build(0)
    _train_schedule(whole, whole_acc, schedule, data, targets, windows, rank)
    # weights_only=False: the sharded state dicts hold DTensors (the test's own file).
    _assert_resumes_bitwise(
        whole, build, schedule, schedule.index((1, 1)) + 1, (data, targets, windows, rank),
        state_of=lambda model: model, weights_only=False, what="fsdp checkpoint",
    )


def _scenario_fsdp_in_backward(rank: int, world: int) -> None:
    """FSDP2 with accumulate_in_backward: the hooks FSDP runs on the sharded params after each reduce-scatter add
    the shards into the masters and free them during backward; the shards after every window equal the default
    mode's bit for bit (no clipping: the norm is summed per param in this mode)."""
    from torch.distributed.fsdp import fully_shard

    windows = [W, W, W - 1]
    data, targets = _batches(8, world, windows)
    plain, hooked = _model(), _model()
    for model in (plain, hooked):
        fully_shard(model[0], mesh=_cpu_mesh(world))
        fully_shard(model, mesh=_cpu_mesh(world))
    plain_acc = fusedaccum.GradAccumulator(_sgd(plain), W, fsdp_module=plain)
    acc = fusedaccum.GradAccumulator(_sgd(hooked), W, fsdp_module=hooked, accumulate_in_backward=True)
    for k, n in enumerate(windows):
        for i in range(n):
            x, y = data[k][rank, i], targets[k][rank, i]
            F.mse_loss(plain(x), y).backward()
            plain_acc.step()
            F.mse_loss(hooked(x), y).backward()
            assert all(p.grad is None for p in hooked.parameters()), "a shard outlived its hook"
            acc.step()
        if n < W:
            assert plain_acc.flush() and acc.flush()
        assert acc.stepped and plain_acc.stepped
        for p, q in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), f"window {k}: in-backward shards differ"
        # The norm is summed per param in this mode: equal up to float32 rounding.
        assert abs(acc.grad_norm.item() - plain_acc.grad_norm.item()) <= REL * plain_acc.grad_norm.item()


SCENARIOS: dict[str, Callable[[int, int], None]] = {
    "plain": _scenario_plain,
    "ddp_weighted": _scenario_ddp_weighted,
    "ddp_checkpoint": _scenario_ddp_checkpoint,
    "attach_and_refusals": _scenario_attach_and_refusals,
    "overlap_bitwise": _scenario_overlap_bitwise,
    "overlap_edges": _scenario_overlap_edges,
    "fsdp": _scenario_fsdp,
    "fsdp_checkpoint": _scenario_fsdp_checkpoint,
    "fsdp_in_backward": _scenario_fsdp_in_backward,
}


def _worker(rank: int, world: int, folder: str, names: list[str]) -> None:
    """Runs the named scenarios in order, writing <name>.rank<r>.ok or .failed (the traceback) into ``folder``; the
    first failure ends this process (the other ranks may be waiting in a collective: mp.spawn ends them)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Loopback only: gloo otherwise resolves the host name to pick an interface, which in containers can be one
    # the other ranks cannot reach.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # A file store rather than a TCP port: no race for a free port between tests (gloo still talks over loopback).
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        for name in names:
            try:
                SCENARIOS[name](rank, world)
            except BaseException:
                Path(folder, f"{name}.rank{rank}.failed").write_text(f"rank {rank}:\n{traceback.format_exc()}")
                sys.stdout.flush()
                os._exit(1)
            Path(folder, f"{name}.rank{rank}.ok").touch()
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's shutdown, where a gloo worker thread still freeing a finished collective's tensors can
    # abort the process (the group outlives destroy_process_group() under DDP/FSDP): examples/ddp_accumulate.py
    # has the details. Failures never reach this line.
    sys.stdout.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def scenario_failures(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, str | None]]:
    """world -> {scenario: None (passed) or what failed}, each world size run once for the whole module."""
    cache: dict[int, dict[str, str | None]] = {}

    def run(world: int) -> dict[str, str | None]:
        if world in cache:
            return cache[world]
        outcome: dict[str, str | None] = {}
        remaining = list(SCENARIOS)
        # Spawned workers import this module by name (tests.test_distributed): they need the repository root on
        # sys.path, which pytest's importlib mode does not add (multiprocessing hands sys.path to the children).
        root = str(Path(__file__).resolve().parents[1])
        sys.path.insert(0, root)
        try:
            while remaining:
                folder = tmp_path_factory.mktemp(f"world{world}")
                ended = None
                try:
                    mp.spawn(_worker, args=(world, str(folder), remaining), nprocs=world, join=True)
                except Exception as error:  # a scenario failed (its traceback is in folder) or a worker died
                    ended = error
                for name in list(remaining):
                    failed = sorted(folder.glob(f"{name}.rank*.failed"))
                    if failed:
                        outcome[name] = "\n".join(f.read_text() for f in failed)
                    elif len(list(folder.glob(f"{name}.rank*.ok"))) == world:
                        outcome[name] = None
                    elif ended is not None:  # no traceback: a worker died in this scenario
                        outcome[name] = f"the workers ended during this scenario without a traceback: {ended}"
                    else:
                        break
                    remaining.remove(name)
                    if outcome[name] is not None:
                        break  # the scenarios after it run in a new group
        finally:
            sys.path.remove(root)
        cache[world] = outcome
        return outcome

    return run


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_multi_process(scenario: str, world: int, scenario_failures) -> None:
    failure = scenario_failures(world)[scenario]
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_refusals() -> None:
    opt = _sgd(_model())
    with pytest.raises(RuntimeError, match="not initialised"):
        fusedaccum.GradAccumulator(opt, 2, process_group="default")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        fusedaccum.GradAccumulator(opt, 2, ddp_module=_model())
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="bucket_cap_mb"):
            fusedaccum.GradAccumulator(opt, 2, bucket_cap_mb=bad)
    with pytest.raises(TypeError, match="bucket_cap_mb"):
        fusedaccum.GradAccumulator(opt, 2, bucket_cap_mb="25")


def test_refuses_dtensor_params(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(TypeError, match="DTensor"):
            fusedaccum.GradAccumulator(torch.optim.SGD([param], lr=0.1), 2, process_group="default")
    finally:
        dist.destroy_process_group()


def test_refuses_ddp_setups_that_would_diverge(tmp_path) -> None:
    """A DDP param outside the wrapped optimizer would never be reduced (replicas diverge); static_graph needs
    DDP's own first reduction. Both are refused at construction, before DDP is touched."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        head_only = torch.optim.SGD(model.module[0].parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"2 trainable parameter\(s\) of the DDP module are not in the wrapped"):
            fusedaccum.GradAccumulator(head_only, 2, ddp_module=model)
        assert model.require_backward_grad_sync, "a refused wrapper must leave DDP as it was"
        static = torch.nn.parallel.DistributedDataParallel(_model(), static_graph=True)
        with pytest.raises(ValueError, match="static_graph"):
            fusedaccum.GradAccumulator(_sgd(static.module), 2, ddp_module=static)
    finally:
        dist.destroy_process_group()


def test_fsdp_refusals(tmp_path) -> None:
    """What fsdp_module cannot serve is refused with a message naming it, before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        fully_shard(model, mesh=_cpu_mesh(1))
        opt = _sgd(model)
        make = fusedaccum.GradAccumulator
        with pytest.raises(TypeError, match="fsdp_module must be the module fully_shard was applied to"):
            make(opt, 2, fsdp_module=_model())
        with pytest.raises(ValueError, match="cannot be combined with process_group"):
            make(opt, 2, fsdp_module=model, process_group="default")
        with pytest.raises(ValueError, match="master_weights"):
            make(opt, 2, fsdp_module=model, master_weights=True)
        with pytest.raises(TypeError, match="fsdp_module=model"):  # sharded params, fsdp_module not given
            make(opt, 2)
        with pytest.raises(ValueError, match="plain tensor parameter of shape"):
            make(torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.randn(3))], lr=0.1), 2,
                 fsdp_module=model)
        hsdp = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), init_device_mesh("cpu", (1, 1)),
                                                    [Replicate(), Shard(0)]))
        with pytest.raises(ValueError, match="1-D device mesh"):
            make(torch.optim.SGD([hsdp], lr=0.1), 2, fsdp_module=model)

        acc = make(opt, 2, fsdp_module=model)
        F.mse_loss(model(torch.randn(4, 7)), torch.randn(4, 5)).backward()
        before = [p.grad.to_local().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="weight"):
            acc.step(weight=2.0)
        assert acc.micro_step == 0
        assert all(torch.equal(p.grad.to_local(), b) for p, b in zip(model.parameters(), before))
        acc.step()
        assert acc.micro_step == 1 and all(p.grad is None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=3),
    cap=st.integers(1, 40),
    first_cap=st.integers(1, 40),
    data=st.data(),
)
@settings(max_examples=300)
def test_bucket_plan_and_issue_order(sizes, cap, first_cap, data) -> None:
    """BucketedAllReduce without processes: the plan tiles every buffer exactly, from the end of the last buffer
    back, each bucket within its cap; with params finishing in any order, the issued buckets are always a prefix
    of the plan, and a bucket is issued only once every param overlapping it is final, and as soon as it and all
    before it are."""
    issued: list[torch.Tensor] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "all_reduce", lambda t, **kwargs: issued.append(t))
        _check_bucket_plan(sizes, cap, first_cap, data, issued)


def _check_bucket_plan(sizes, cap, first_cap, data, issued: list[torch.Tensor]) -> None:
    from fusedaccum.distributed import BucketedAllReduce

    buffers = {key: torch.zeros(n) for key, n in enumerate(sizes)}
    spans = []  # params laid out back to back with random gaps, as the wrapper's 16-byte-aligned views
    for key, n in enumerate(sizes):
        offset = 0
        while offset < n:
            numel = data.draw(st.integers(0, n - offset))
            spans.append((key, offset, numel))
            offset += numel + data.draw(st.integers(0, 3))
    reducer = BucketedAllReduce(None, cap)
    reducer.plan(buffers, spans, first_cap)
    plan = reducer._plan
    for key in reversed(range(len(sizes))):  # the plan walks each buffer from its end to its start
        cuts = [(start, stop) for k, start, stop in plan if k == key]
        assert [c[1] for c in cuts] == [sizes[key]] + [c[0] for c in cuts[:-1]] if cuts else sizes[key] == 0
        assert not cuts or cuts[-1][0] == 0
    assert [k for k, _, _ in plan] == sorted((k for k, _, _ in plan), reverse=True)
    assert all(0 < stop - start <= (first_cap if b == 0 else cap) for b, (_, start, stop) in enumerate(plan))

    def overlaps(b: int, span) -> bool:
        key, start, stop = plan[b]
        return span[0] == key and start < span[1] + span[2] and span[1] < stop

    reducer.start_final_backward()
    final: set[int] = set()
    for index in data.draw(st.permutations(range(len(spans)))):
        reducer.param_final(index)
        final.add(index)
        ready = 0
        while ready < len(plan) and all(i in final for i, s in enumerate(spans) if overlaps(ready, s)):
            ready += 1
        assert len(issued) == ready
        for b in range(ready):
            key, start, stop = plan[b]
            assert issued[b].data_ptr() == buffers[key][start:].data_ptr() and issued[b].numel() == stop - start
        assert all(reducer.param_issued(i) == any(overlaps(b, spans[i]) for b in range(ready))
                   for i in range(len(spans)))
    reducer.issue_all()
    assert len(issued) == len(plan)
