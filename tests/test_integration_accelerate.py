"""accelerate's ``Accelerator(gradient_accumulation_steps=N)`` with ``fusedaccum.integrations.accelerate.prepare``,
against accelerate's own accumulation (``accelerator.prepare``) run in the same process on the same fresh random
tokens: a tiny next-token model (embedding, tanh, linear), AdamW, a LambdaLR schedule, CPU.

Each comparison asserts the number of updates (including the short last window accelerate steps at the end of its
prepared dataloader) and of scheduler steps, the learning rates, the parameters after every update (float32,
relative error <= 1e-6), and the norm ``accelerator.clip_grad_norm_`` returned for each window, with windows that
clip hard (max_norm 1e-3, below every norm), windows that do not call it, and windows whose max_norm (1e3) does
not bind. Also: ``save_state``/``load_state`` mid-window and at a window boundary resume bit-identically; fp16
through accelerate's own GradScaler path (its GPU path, given its GradScaler on CPU) with a skipped window; the
refusals. The MULTI_CPU (DDP) case runs this file under ``torchrun --nproc_per_node 2`` (gloo, CPU), see
:func:`_ddp_worker`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from fusedaccum import GradAccumulator  # noqa: E402
from fusedaccum.integrations.accelerate import prepare  # noqa: E402

V, D, T, ROWS = 32, 16, 8, 2  # vocabulary, width, tokens per sequence (+1 target), sequences per micro-batch
N = 3  # gradient_accumulation_steps
LR = 0.01
REL = 1e-6
# max_norm of each window's clip_grad_norm_ call, cycled: clips hard (every norm here is ~0.1-1), no call, a call
# that does not bind. Window 3 (the short last one of a 10-batch run) clips again.
MAX_NORMS = (1e-3, None, 1e3)


def _reset_accelerate() -> None:
    """accelerate's state is a per-process singleton (an Accelerator with other settings is refused once one
    exists); this is what accelerate's own tests do between tests (AccelerateTestCase.tearDown)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    _reset_accelerate()
    yield
    _reset_accelerate()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every run (and on every rank)
    return torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Tanh(), torch.nn.Linear(D, V))


def _tokens(batches: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (batches * ROWS, T + 1), generator=torch.Generator().manual_seed(seed))


@dataclass
class Run:
    weights: list[list[torch.Tensor]]  # the parameters after each update of the wrapped optimizer
    norms: dict[int, float]  # window -> what clip_grad_norm_ returned, read after optimizer.step()
    lrs: list[float]  # the learning rate after each update
    scheduler_steps: int
    skipped: list[int]  # windows accelerate reported as skipped (optimizer_step_was_skipped)
    grads_left: int  # backwards after which a p.grad was not None
    ddp_synced: int  # accumulate() blocks after which DDP's require_backward_grad_sync was on
    model: torch.nn.Module


def _train(
    accelerator: Accelerator, fused: bool, tokens: torch.Tensor, *, skip: int = 0, load: Path | None = None,
    save_after: int | None = None, save: Path | None = None, poison: Callable[[int], bool] = lambda i: False,
) -> Run:
    """accelerate's documented accumulation loop over ``tokens`` (``skip`` batches already done and saved in
    ``load``); with ``fused``, prepared by fusedaccum's ``prepare`` instead of ``accelerator.prepare``. Stops
    after ``save_after`` batches with ``accelerator.save_state(save)``. ``poison(i)``: batch i's loss is scaled
    to overflow fp16."""
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: 1 / (1 + step))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=ROWS)
    objects = (model, inner, loader, schedule)
    model, optimizer, loader, scheduler = prepare(accelerator, *objects) if fused else accelerator.prepare(*objects)
    if load is not None:
        accelerator.load_state(str(load))
        loader = accelerator.skip_first_batches(loader, skip)
    run = Run([], {}, [], 0, [], 0, 0, model)

    def updated(*_: object) -> None:
        run.weights.append([p.detach().clone() for p in model.parameters()])

    inner.register_step_post_hook(updated)
    for i, (batch,) in enumerate(loader, start=skip):
        with accelerator.accumulate(model):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V).float(), batch[:, 1:].reshape(-1))
            accelerator.backward(loss * 2.0**40 if poison(i) else loss)
            run.grads_left += any(p.grad is not None for p in model.parameters())
            window = i // N  # this rank's loader: windows of N micro-batches, the last one may be short
            max_norm = MAX_NORMS[window % len(MAX_NORMS)]
            norm = None
            if accelerator.sync_gradients and max_norm is not None:
                norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if norm is not None:
                run.norms[window] = norm.item()
            if accelerator.sync_gradients:
                run.lrs.append(scheduler.get_last_lr()[0])
                if accelerator.optimizer_step_was_skipped:
                    run.skipped.append(window)
        run.ddp_synced += bool(getattr(model, "require_backward_grad_sync", False))
        if save_after is not None and i + 1 == save_after:
            accelerator.save_state(str(save))
            break
    run.scheduler_steps = schedule.last_epoch
    return run


def _rel_err(ours: torch.Tensor, want: torch.Tensor) -> float:
    return ((ours.double() - want.double()).norm() / want.double().norm()).item()


def _assert_same_training(native: Run, fused: Run, updates: int, world: int = 1) -> None:
    """fused reproduces native: updates, scheduler steps and LRs exactly, weights and norms within float32
    rounding; clipping happened where it should (so the norms compared are real ones)."""
    assert len(native.weights) == updates, f"native accelerate made {len(native.weights)} updates, not {updates}"
    assert len(fused.weights) == updates, f"fused made {len(fused.weights)} updates, native {updates}"
    # accelerate steps the scheduler once per process per update, not for a skipped window.
    assert fused.scheduler_steps == native.scheduler_steps == updates * world, (fused.scheduler_steps,
                                                                                native.scheduler_steps)
    assert fused.lrs == native.lrs and fused.skipped == native.skipped
    for k, (ours, want) in enumerate(zip(fused.weights, native.weights)):
        for p, q in zip(ours, want):
            err = _rel_err(p, q)
            assert err <= REL, f"update {k}: weights relative error {err:.3g} > {REL}"
    assert fused.norms.keys() == native.norms.keys() and native.norms
    for window, want in native.norms.items():
        ours = fused.norms[window]
        if window in native.skipped:
            assert not math.isfinite(want) and math.isnan(ours), f"window {window}: norms {ours}, native {want}"
            continue
        assert abs(ours - want) <= REL * want, f"window {window}: clip_grad_norm_ returned {ours}, native {want}"
        max_norm = MAX_NORMS[window % len(MAX_NORMS)]
        assert want > max_norm if max_norm < 1 else want < max_norm, f"window {window}: norm {want}, max {max_norm}"
    assert fused.grads_left == 0, "p.grad was set after a backward: the gradients did not go into the masters"
    assert native.grads_left > 0


def test_matches_native_accumulation() -> None:
    """10 micro-batches, N = 3: windows of 3, 3, 3 and the short last 1 (accelerate steps it at the end of its
    dataloader, with the loss still divided by 3: the wrapper's sum reproduces that)."""
    tokens = _tokens(10, seed=1)
    native = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), False, tokens)
    fused = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), True, tokens)
    _assert_same_training(native, fused, updates=4)
    assert sorted(native.norms) == [0, 2, 3]


def test_one_micro_batch_per_window() -> None:
    """gradient_accumulation_steps=1 (the default): every batch is a window."""
    tokens = _tokens(4, seed=2)
    native = _train(Accelerator(cpu=True), False, tokens)
    fused = _train(Accelerator(cpu=True), True, tokens)
    _assert_same_training(native, fused, updates=4)


@pytest.mark.parametrize("cut", [4, 6], ids=["mid-window", "window-boundary"])
def test_save_state_load_state_resumes_bitwise(tmp_path: Path, cut: int) -> None:
    """accelerator.save_state after ``cut`` of 10 micro-batches (4: one micro-step into window 1, whose partial sum
    is in the wrapper's state dict; 6: after window 1), then a fresh model, optimizer, scheduler, Accelerator and
    prepare(), load_state and skip_first_batches: the same updates, norms and weights, bit for bit, as the run
    that never stopped (accelerate's optimizer.bin is loaded with torch.load(weights_only=True))."""
    tokens = _tokens(10, seed=3)
    whole = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), True, tokens)
    first = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), True, tokens, save_after=cut, save=tmp_path)
    _reset_accelerate()
    rest = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), True, tokens, skip=cut, load=tmp_path)
    done = len(first.weights)
    assert done == cut // N and len(rest.weights) == len(whole.weights) - done
    for k, (ours, want) in enumerate(zip(rest.weights, whole.weights[done:])):
        assert all(torch.equal(p, q) for p, q in zip(ours, want)), f"update {done + k} differs after the resume"
    assert rest.norms == {w: v for w, v in whole.norms.items() if w >= done}
    assert rest.lrs == whole.lrs[done:] and rest.scheduler_steps == whole.scheduler_steps


def _fp16_accelerator() -> Accelerator:
    """accelerate's fp16 path as it runs off-CPU: on CPU accelerate builds no GradScaler and no fp16 autocast
    (Accelerator.__init__ turns both on only for non-CPU devices), so they are given here, as accelerate would
    build them (accelerate.utils.get_grad_scaler), before prepare(). Everything after is accelerate's own code:
    backward scales the loss, AcceleratedOptimizer.step calls scaler.step(optimizer) + scaler.update(), the
    scheduler does not step when the GradScaler skipped."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=N)
    # growth_interval=1: the scale doubles after each good window, so the scale schedule is exercised too.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    accelerator.native_amp = True
    return accelerator


def test_fp16_through_accelerates_grad_scaler() -> None:
    """fp16 autocast, accelerate's GradScaler driving the wrapper (scaler.step(acc) + scaler.update() once per
    window), batch 7 (in window 2, which calls clip_grad_norm_) scaled to overflow: native and fused skip that
    window, neither steps the scheduler for it, the scale follows the same schedule, the other windows match."""
    tokens = _tokens(10, seed=4)

    def poison(i: int) -> bool:
        return i == 7

    runs = []
    for fused in (False, True):
        _reset_accelerate()
        accelerator = _fp16_accelerator()
        runs.append((_train(accelerator, fused, tokens, poison=poison), accelerator.scaler.get_scale()))
    (native, native_scale), (fused, fused_scale) = runs
    assert native.skipped == [2], f"native accelerate skipped windows {native.skipped}, expected [2]"
    _assert_same_training(native, fused, updates=3)
    assert fused_scale == native_scale == 2.0**10 * 2**3 / 2  # 3 good windows double it, the bad one halves it


def test_refusals() -> None:
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=N)
    with pytest.raises(TypeError, match="prepare\\(\\) takes the Accelerator first"):
        prepare(model, inner)
    with pytest.raises(TypeError, match="accumulate a second time"):
        prepare(accelerator, model, GradAccumulator(inner, N))
    with pytest.raises(ValueError, match="exactly one optimizer, got 0"):
        prepare(accelerator, model)
    with pytest.raises(ValueError, match="exactly one optimizer, got 2"):
        prepare(accelerator, model, inner, torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="device_placement has 1 entries for 2 objects"):
        prepare(accelerator, model, inner, device_placement=[True])
    with pytest.raises(TypeError, match="already prepared"):
        prepare(accelerator, accelerator.prepare(torch.optim.SGD(model.parameters(), lr=LR)))

    model, optimizer = prepare(accelerator, model, inner, device_placement=[True, False])
    other = torch.nn.Linear(3, 2)
    F.cross_entropy(model(_tokens(1, seed=5)[:, :-1]).reshape(-1, V), _tokens(1, seed=6)[:, 1:].reshape(-1)).backward()
    other(torch.randn(4, 3)).square().sum().backward()
    with pytest.raises(ValueError, match="given 2 trainable parameter\\(s\\), 2 of the GradAccumulator's 3"):
        accelerator.clip_grad_norm_(list(model.parameters())[1:], 1.0)
    with pytest.raises(ValueError, match="given 5 trainable parameter\\(s\\), 3 of the GradAccumulator's 3"):
        accelerator.clip_grad_norm_([*model.parameters(), *other.parameters()], 1.0)
    with pytest.raises(ValueError, match="2-norm only"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0, norm_type=1)
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="max_norm must be a number > 0"):
            accelerator.clip_grad_norm_(model.parameters(), bad)
    with pytest.raises(RuntimeError, match="clip_grad_value_ cannot reach"):
        accelerator.clip_grad_value_(model.parameters(), 0.1)
    # Parameters the wrapper does not hold go to accelerate's own methods.
    want = torch.nn.utils.get_total_norm([p.grad for p in other.parameters()]).item()
    assert want > 1e-3 and abs(accelerator.clip_grad_norm_(other.parameters(), 1e-3).item() - want) <= REL * want
    assert abs(torch.nn.utils.get_total_norm([p.grad for p in other.parameters()]).item() - 1e-3) < 1e-8
    accelerator.clip_grad_value_(other.parameters(), 1e-4)
    assert max(p.grad.abs().max().item() for p in other.parameters()) <= 1e-4
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()
    assert optimizer.optimizer.stepped


# ------------------------------------------------------------------------------------------ MULTI_CPU (DDP)
DDP_BATCHES = 14  # 7 micro-batches per rank: windows of 3, 3 and a short 1


def _ddp_worker(folder: Path) -> None:
    """One rank of ``torchrun --nproc_per_node 2`` (see test_multi_cpu_ddp_matches_native): accelerate's MULTI_CPU
    mode (gloo), native DDP accumulation against prepare(); replicas identical; the refusals that need processes.
    Writes rank<r>.ok, or rank<r>.failed with the traceback."""
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        # Without cpu=True, accelerate 1.16 (not 1.0, which picks MULTI_CPU itself) runs each torchrun process
        # alone on CPUs (distributed_type NO) while torch.distributed has 2: refused before anything is prepared.
        alone = Accelerator(gradient_accumulation_steps=N)
        if alone.num_processes == 1:
            assert torch.distributed.get_world_size() == 2
            with pytest.raises(RuntimeError, match="build the Accelerator with cpu=True"):
                prepare(alone, _model(), torch.optim.AdamW(_model().parameters(), lr=LR))
        else:
            assert alone.distributed_type == "MULTI_CPU" and alone.num_processes == 2
        _reset_accelerate()

        tokens = _tokens(DDP_BATCHES, seed=7)
        native = _train(Accelerator(cpu=True, gradient_accumulation_steps=N), False, tokens)
        _reset_accelerate()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=N)
        assert accelerator.distributed_type == "MULTI_CPU" and accelerator.num_processes == 2
        fused = _train(accelerator, True, tokens)
        _assert_same_training(native, fused, updates=3, world=2)
        assert native.ddp_synced > 0 and fused.ddp_synced == 0, "DDP's own reduction must stay off under the wrapper"
        for run in (native, fused):
            for p in run.model.parameters():
                copies = [torch.empty_like(p) for _ in range(2)]
                torch.distributed.all_gather(copies, p.detach().contiguous())
                assert torch.equal(copies[0], copies[1]), "replicas differ"
        with pytest.raises(RuntimeError, match="trigger_sync_in_backward would make DDP all-reduce"):
            with accelerator.trigger_sync_in_backward(fused.model):
                pass
        assert not fused.model.require_backward_grad_sync
        torch.distributed.barrier()
    except BaseException:
        (folder / f"rank{rank}.failed").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        sys.stdout.flush()
        os._exit(1)
    (folder / f"rank{rank}.ok").touch()
    # Skip the interpreter's shutdown: gloo's worker threads can abort a finished process there (the process group
    # outlives destroy_process_group() under DDP; docs/distributed.md, "Rules").
    sys.stdout.flush()
    os._exit(0)


def test_multi_cpu_ddp_matches_native(tmp_path: Path) -> None:
    """accelerate's MULTI_CPU mode under torchrun, 2 processes (gloo, loopback, CPU): 7 micro-batches per rank,
    N = 3 (windows 3, 3, 1). The wrapper all-reduces its fp32 masters once per window and divides by the 2
    processes as DDP averages them: updates, scheduler steps (accelerate steps it once per process per update),
    LRs, weights and norms as native accelerate's DDP accumulation; DDP's require_backward_grad_sync stays off
    (accelerate's no_sync restores it to off); replicas identical."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    failures = [f.read_text() for f in sorted(tmp_path.glob("rank*.failed"))]
    assert not failures, "\n".join(failures)
    assert done.returncode == 0, f"torchrun exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert sorted(f.name for f in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
