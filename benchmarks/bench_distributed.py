"""Distributed: bytes communicated and time per accumulation window, 2 processes, gloo on CPU (issue 5).

Four loops train the same model on the same per-rank data, N micro-batches per update:

* ``ddp-every-step``: plain DDP, ``(loss / N).backward()`` on every micro-step (DDP all-reduces every backward),
  ``opt.step()`` every N: the naive loop (PITFALLS row 5);
* ``ddp-no_sync``: the usual manual fix, the non-final micro-steps' backward under ``model.no_sync()``: DDP
  all-reduces the accumulated ``.grad`` once per window;
* ``fusedaccum``: ``GradAccumulator(opt, N, ddp_module=model)``: DDP reduces nothing, the wrapper all-reduces its
  fp32 master buffer (in buckets) plus a small float64 metadata tensor once per window, after the last backward;
* ``fusedaccum-in_backward``: the same with ``accumulate_in_backward=True``: grads go into the masters from
  autograd hooks, and the last backward's hooks issue each bucket's all-reduce as soon as its params are final
  (the first bucket at most 1 MiB, as DDP's), overlapping the reduction with the rest of the backward as DDP does.

Bytes: the payload of every all-reduce issued during one window (what each rank hands the collective; a ring
all-reduce moves about 2 (world - 1) / world times that per rank over the wire). They are counted in a separate
instrumented run of one window per loop: DDP gets the stock ``allreduce_hook`` as its comm hook (the same maths as
DDP's built-in reduction, but issued through ``torch.distributed.all_reduce``), and ``torch.distributed.all_reduce``
is wrapped, which also sees the wrapper's own collectives. Time: median over repeats of the slowest rank's wall
time per window, in uninstrumented runs (stock DDP, no hook, no wrapper around the collective). Every loop runs
the same number of windows on the same data; ``update_rel_diff_vs_no_sync`` = ||w - w_no_sync|| / ||w_no_sync -
w_0|| checks that they compute the same training (fp32 rounding only).

Always CPU and gloo, whatever device the rest of the suite uses: it measures communication volume and latency
between processes, which needs no GPU, and two ranks fit a 2-core machine (one thread each).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import fusedaccum

MODES = ("ddp-every-step", "ddp-no_sync", "fusedaccum", "fusedaccum-in_backward")
WORLD = 2
LR = 1e-2


def _config(tiny: bool) -> dict[str, int]:
    if tiny:
        return {"width": 64, "depth": 2, "N": 4, "rows": 4, "windows": 2, "repeats": 1}
    # ~1M parameters (4 MiB of fp32 gradient): enough that an all-reduce costs milliseconds on loopback, small
    # enough that 4 loops x 18 windows of 8 micro-steps fit the default run's budget on 2 cores.
    return {"width": 512, "depth": 4, "N": 8, "rows": 16, "windows": 3, "repeats": 5}


def _model(cfg: dict[str, int]) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every loop (DDP would broadcast rank 0's anyway)
    layers: list[nn.Module] = []
    for _ in range(cfg["depth"]):
        layers += [nn.Linear(cfg["width"], cfg["width"]), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class _AllReduceCounter:
    """Wraps torch.distributed.all_reduce (looked up at call time by DDP's Python comm hooks and by the wrapper)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._real = dist.all_reduce

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return self._real(tensor, *args, **kwargs)

    def __enter__(self) -> _AllReduceCounter:
        dist.all_reduce = self
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce = self._real


class _Loop:
    """One training loop (a mode) over a DDP model: ``window(xs, ys)`` runs the N micro-steps of one update."""

    def __init__(self, mode: str, cfg: dict[str, int], instrument: bool) -> None:
        self.mode, self.n = mode, cfg["N"]
        self.ddp = nn.parallel.DistributedDataParallel(_model(cfg))
        if instrument:
            # The stock all-reduce hook: DDP's own maths, issued through dist.all_reduce so the counter sees it.
            self.ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=LR)
        self.acc = None
        if mode.startswith("fusedaccum"):
            self.acc = fusedaccum.GradAccumulator(self.opt, self.n, ddp_module=self.ddp,
                                                  accumulate_in_backward=mode == "fusedaccum-in_backward")

    def window(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        for i in range(self.n):
            last = i + 1 == self.n
            if self.acc is not None:
                F.mse_loss(self.ddp(xs[i]), ys[i]).backward()
                self.acc.step()
                self.acc.zero_grad()
                continue
            quiet = self.mode == "ddp-no_sync" and not last
            with self.ddp.no_sync() if quiet else contextlib.nullcontext():
                (F.mse_loss(self.ddp(xs[i]), ys[i]) / self.n).backward()
            if last:
                self.opt.step()
                self.opt.zero_grad()

    def flat_weights(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.ddp.parameters()])


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _measure(rank: int, cfg: dict[str, int]) -> dict[str, Any]:
    n, windows, repeats = cfg["N"], cfg["windows"], cfg["repeats"]
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    total = 1 + windows * repeats  # one warm-up window, then the timed ones
    xs = torch.randn(total, n, cfg["rows"], cfg["width"], generator=gen)
    ys = torch.randn(total, n, cfg["rows"], cfg["width"], generator=gen)
    w0 = _model(cfg)
    w0_flat = torch.cat([p.detach().reshape(-1) for p in w0.parameters()])
    counts = {}
    for mode in MODES:
        counted = _Loop(mode, cfg, instrument=True)
        # Count the second window: DDP rebuilds its buckets after the first synchronised backward, so the first
        # window's collective count is not the steady state's.
        counted.window(xs[0], ys[0])
        dist.barrier()
        with _AllReduceCounter() as counter:
            counted.window(xs[1], ys[1])
        counts[mode] = counter
    loops = {mode: _Loop(mode, cfg, instrument=False) for mode in MODES}
    for loop in loops.values():
        loop.window(xs[0], ys[0])  # warm-up: first-touch allocations, DDP's bucket rebuild, gloo connections
    per_window: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(repeats):
        for mode, loop in loops.items():  # interleaved, so a drift of the machine's speed hits every loop alike
            dist.barrier()
            t0 = time.perf_counter()
            for k in range(1 + r * windows, 1 + (r + 1) * windows):
                loop.window(xs[k], ys[k])
            per_window[mode].append(_max_over_ranks(time.perf_counter() - t0) / windows)
    rows = [{"mode": mode, "all_reduces_per_window": counts[mode].calls, "bytes_per_window": counts[mode].bytes,
             "s_per_window": statistics.median(per_window[mode]),
             "s_per_window_all": per_window[mode]}
            for mode in MODES]
    finals = {mode: loop.flat_weights() for mode, loop in loops.items()}
    ref = finals["ddp-no_sync"]
    update = (ref - w0_flat).norm().item()
    base = rows[0]["s_per_window"]
    for row in rows:
        row["update_rel_diff_vs_no_sync"] = (finals[row["mode"]] - ref).norm().item() / update
        row["speedup_vs_every_step"] = base / row["s_per_window"]
    params = w0_flat.numel()
    return {"world": WORLD, "backend": "gloo", "device": "cpu", "threads_per_rank": 1, "params": params,
            "grad_bytes": 4 * params, "config": cfg, "rows": rows}


def _worker(rank: int, world: int, cfg: dict[str, int], store: str, out: str) -> None:
    # Loopback and a file store, as in tests/test_distributed.py: no host-name lookup, no race for a free port.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)  # two ranks on a 2-core machine: one core each
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = _measure(rank, cfg)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # As in tests/test_distributed.py: no interpreter shutdown with gloo's threads still alive (see the example).
    sys.stdout.flush()
    os._exit(0)


def run(tiny: bool = False) -> dict[str, Any]:
    cfg = _config(tiny)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(_worker, args=(WORLD, cfg, str(Path(tmp) / "store"), str(out)), nprocs=WORLD, join=True)
        return json.loads(out.read_text())


def summary_table(section: dict[str, Any]) -> str:
    cfg = section["config"]
    lines = [f"{section['world']} processes, {section['backend']} on CPU, {section['params']:,} params "
             f"({section['grad_bytes'] / 2**20:.2f} MiB fp32 grads), N = {cfg['N']} micro-batches of "
             f"{cfg['rows']} rows; bytes = all-reduce payload per rank",
             f"{'mode':<22} {'all-reduces':>11} {'MiB/window':>11} {'ms/window':>10} {'speedup':>8} "
             f"{'update diff':>12}"]
    for r in section["rows"]:
        lines.append(f"{r['mode']:<22} {r['all_reduces_per_window']:>11} {r['bytes_per_window'] / 2**20:>11.3f} "
                     f"{r['s_per_window'] * 1e3:>10.1f} {r['speedup_vs_every_step']:>7.2f}x "
                     f"{r['update_rel_diff_vs_no_sync']:>12.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary_table(run()))
