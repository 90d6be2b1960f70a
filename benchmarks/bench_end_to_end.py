"""End to end: training a small GPT-style model with N micro-batches per update (issue 4, "End to end").

Written against the documented wrapper API (DESIGN.md, "The wrapper contract")::

    acc = fusedaccum.GradAccumulator(opt, accumulation_steps=N)
    loss.backward(); acc.step(); acc.zero_grad()

and skipped, with the reason printed, while ``fusedaccum.GradAccumulator`` does not exist. Modes, for N in
{1, 4, 8} micro-batches of one size (the effective batch is N times larger), bf16 parameters, AdamW:

* ``large-batch``: no accumulation, one batch N times larger (the memory that accumulation saves);
* ``native-bf16``: ``(loss / N).backward()`` into bf16 ``param.grad``, ``opt.step()`` every N;
* ``native-fp32-grad_dtype``: the same with ``param.grad_dtype = float32`` (autograd accumulates in fp32); the
  grads are cast to bf16 just before ``opt.step()``, which refuses fp32 grads on bf16 parameters;
* ``fusedaccum``: the wrapper above.

Measured: median seconds per optimizer update, and peak memory during the updates: CUDA
``max_memory_allocated``; on a CPU the process's resident high-water mark (``VmHWM``), reset before each
configuration through ``/proc/self/clear_refs`` (reported as the rise over the resident size at the reset).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fusedaccum

from . import common

MODES = ("large-batch", "native-bf16", "native-fp32-grad_dtype", "fusedaccum")


def unavailable_reason() -> str | None:
    if not hasattr(fusedaccum, "GradAccumulator"):
        return "fusedaccum.GradAccumulator does not exist yet (the wrapper is being written)"
    return None


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T  # tied head


def _config(device: torch.device, tiny: bool) -> dict[str, int]:
    if tiny:
        return {"vocab": 256, "d": 64, "layers": 2, "heads": 4, "context": 32, "batch": 2, "updates": 1}
    if device.type == "cuda":
        return {"vocab": 50257, "d": 768, "layers": 12, "heads": 12, "context": 512, "batch": 8, "updates": 5}
    return {"vocab": 2048, "d": 128, "layers": 2, "heads": 4, "context": 64, "batch": 4, "updates": 2}


def _status_kib(field: str) -> int | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_cpu_peak() -> int | None:
    """Resets the process's resident high-water mark (Linux); returns the resident KiB now, None if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return None


def run_one(mode: str, n: int, device: torch.device, cfg: dict[str, int]) -> dict[str, Any]:
    """One (mode, N) configuration: seconds per update and peak memory."""
    torch.manual_seed(0)
    model = TinyGPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["context"]).to(device, torch.bfloat16)
    params = list(model.parameters())
    if mode == "native-fp32-grad_dtype":
        for p in params:
            p.grad_dtype = torch.float32
    opt = torch.optim.AdamW(params, lr=1e-4)
    acc = fusedaccum.GradAccumulator(opt, accumulation_steps=n) if mode == "fusedaccum" else None
    micro_batches = 1 if mode == "large-batch" else n
    batch = cfg["batch"] * (n if mode == "large-batch" else 1)
    tokens = torch.randint(0, cfg["vocab"], (batch, cfg["context"] + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base_kib = _reset_cpu_peak()
    times = []
    for update in range(cfg["updates"] + 1):  # the first update is warm-up (and allocates the optimizer state)
        started = time.perf_counter()
        for _ in range(micro_batches):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            if acc is not None:
                loss.backward()
                acc.step()
                acc.zero_grad()
            else:
                (loss / micro_batches).backward()
        if acc is None:
            common.native_optimizer_step(opt, params, fp32_grads=mode == "native-fp32-grad_dtype")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if update:
            times.append(time.perf_counter() - started)
    row: dict[str, Any] = {"mode": mode, "N": n, "s_per_update": statistics.median(times),
                           "tokens_per_update": n * cfg["batch"] * cfg["context"]}
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
        row["peak_memory_kind"] = "cuda max_memory_allocated above the model's resting allocation"
    elif base_kib is not None:
        row["peak_memory_bytes"] = ((_status_kib("VmHWM") or 0) - base_kib) * 1024
        row["peak_memory_kind"] = "process VmHWM rise after clear_refs reset"
    else:
        row["peak_memory_bytes"] = None
        row["peak_memory_kind"] = "unavailable (no /proc/self/clear_refs)"
    return row


def _run_isolated(mode: str, n: int, tiny: bool) -> dict[str, Any]:
    # A fresh process per CPU configuration: in one process the allocator keeps freed memory resident, so a
    # later configuration's high-water mark would not rise above the reset point.
    cmd = [sys.executable, "-m", "benchmarks.bench_end_to_end", "--worker", mode, str(n)] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError((out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device: torch.device, tiny: bool = False) -> dict[str, Any]:
    """Every mode and N; a mode that fails is recorded and the others still run.

    On a CPU each configuration runs in its own process (a real high-water mark), except under ``tiny``,
    which checks the plumbing in-process in seconds (its memory figures are then not isolated).
    """
    reason = unavailable_reason()
    if reason:
        return {"skipped": reason}
    cfg = _config(device, tiny)
    ns = (1, 2) if tiny else (1, 4, 8)
    rows, failures = [], []
    for mode in MODES:
        for n in ns:
            try:
                isolated = device.type == "cpu" and not tiny
                rows.append(_run_isolated(mode, n, tiny) if isolated else run_one(mode, n, device, cfg))
            except Exception as error:
                failures.append({"mode": mode, "N": n, "error": f"{type(error).__name__}: {error}"[:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"config": cfg, "rows": rows, "failures": failures}


def summary_table(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    lines = [f"{'mode':<24} {'N':>3} {'s/update':>10} {'peak MB':>10}"]
    for r in section["rows"]:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(f"{r['mode']:<24} {r['N']:>3} {r['s_per_update']:>10.3f} {peak:>10}")
    lines += [f"failed: {f['mode']} N={f['N']}: {f['error']}" for f in section["failures"]]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one CPU end-to-end configuration in this process (used by run())")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(json.dumps(run_one(args.worker[0], int(args.worker[1]), cpu, _config(cpu, args.tiny))))
