"""``python -m benchmarks``: the benchmark suite. ``--tiny``: seconds (the test runs it); ``--full``: every sweep.

Picks the device (CUDA if present, else CPU), shows progress, prints a summary table and the targets, writes
``<out>/<device>-<date>.json`` and PNG plots beside it. The JSON is rewritten after every section, so a run
cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import bench_accumulate, bench_claims, bench_distributed, bench_end_to_end, bench_numerics, common

SECTIONS = ("accumulate", "numerics", "end_to_end", "claims", "distributed")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# The default CPU run ends within 3 minutes on 2 cores: no accumulate case starts after this many seconds (what
# follows it took 21 s on the 2-core AMD EPYC CI machine, the plots ~3 s, the slowest case ~11 s; whole default
# runs there took 134-173 s, so the guard cuts only a slow run's last cases, each reported as skipped).
DEFAULT_CPU_BUDGET_S = 140.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration (used by the tests)")
    size.add_argument("--full", action="store_true", help="every size 2^10..2^28, Llama-1B, compile on every list")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--name", help="results file stem (default <device>-<date>)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--time-budget", type=float,
                        help="seconds after which no new accumulate case starts (default CPU run: "
                             f"{DEFAULT_CPU_BUDGET_S:.0f})")
    return parser.parse_args(argv)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the suite; returns the results dictionary also written to JSON."""
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if common.cuda_usable() else "cpu"))
    if device.type == "cuda" and not common.cuda_usable():
        sys.exit("--device cuda: no CUDA GPU is usable here")
    mode = "tiny" if args.tiny else "full" if args.full else "default"
    budget = args.time_budget or (DEFAULT_CPU_BUDGET_S if device.type == "cpu" and mode == "default" else None)
    deadline = started + budget if budget else None
    sections = args.only or list(SECTIONS)
    meta = common.metadata(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or common.slug(device.type + '-' + meta['device_name']) + '-' + stamp}.json"
    data: dict[str, Any] = {"schema": 1, "meta": meta, "config": {"mode": mode, "sections": sections}}
    print(f"fusedaccum benchmarks ({mode}) on {meta['device_name']} [{device}], torch {meta['torch']}, "
          f"triton {meta['triton']}, fusedaccum {meta['fusedaccum']}, commit {(meta['git_commit'] or '?')[:10]}"
          f"{' (dirty)' if meta['git_dirty'] else ''}", flush=True)

    if "accumulate" in sections:
        # Several times the last-level cache, so the copy runs at memory (not cache) bandwidth.
        copy_numel = (1 << 22) if mode == "tiny" else max(1 << 26, 2 * common.last_level_cache_bytes(device))
        data["copy_bandwidth"] = common.copy_bandwidth(device, copy_numel, 0.05 if mode == "tiny" else 1.0)
        print(f"copy bandwidth: {data['copy_bandwidth']['GBps']:.2f} GB/s ({data['copy_bandwidth']['method']}, "
              f"all: { {k: round(v, 2) for k, v in data['copy_bandwidth']['candidates_GBps'].items()} })", flush=True)
        limit = None
        if device.type == "cpu":
            # Masters + grads (6 B/element) four times the last-level cache: memory, not cache, bandwidth.
            limit_numel = (1 << 22) if mode == "tiny" else max(1 << 26, 4 * common.last_level_cache_bytes(device) // 6)
            data["stream_limit"] = common.same_pattern_limit(limit_numel, 0.05 if mode == "tiny" else 0.5)
            limit = data["stream_limit"]["GBps"]
            print("same-pattern CPU limit: " + (", ".join(f"{k} {v:.2f} GB/s" for k, v in limit.items()) if limit
                  else data["stream_limit"]["why"]), flush=True)
        plan = bench_accumulate.plan(mode, device)
        data["accumulate"] = bench_accumulate.run(plan, device, data["copy_bandwidth"]["GBps"], deadline, limit)
        data["targets"] = bench_accumulate.targets(data["accumulate"], device)
        _write(path, data)
    if "numerics" in sections:
        data["numerics"] = bench_numerics.run(device, ns=[1, 2, 4, 8] if mode == "tiny" else None,
                                              numel=1 << 12 if mode == "tiny" else 1 << 16)
        _write(path, data)
    if "claims" in sections:
        # Before the end-to-end section: it is short, and on a GPU run that section can use up the time left.
        data["claims"] = bench_claims.run(device, mode)
        _write(path, data)
    if "distributed" in sections:
        # 2 processes, gloo, CPU whatever the device (communication volume and latency; see bench_distributed).
        data["distributed"] = bench_distributed.run(tiny=mode == "tiny")
        _write(path, data)
    if "end_to_end" in sections and device.type == "cpu" and mode == "default" and not args.only:
        # 12 training configurations, each in its own process, do not fit the default CPU run's 3 minutes.
        data["end_to_end"] = {"skipped": "not in the default CPU run (12 isolated training runs do not fit its "
                                         "3-minute budget): run --full or --only end_to_end"}
        print(f"skip end-to-end: {data['end_to_end']['skipped']}", flush=True)
    elif "end_to_end" in sections:
        data["end_to_end"] = bench_end_to_end.run(device, tiny=mode == "tiny")
        if "skipped" in data["end_to_end"]:
            print(f"skip end-to-end: {data['end_to_end']['skipped']}", flush=True)
        _write(path, data)
    data["elapsed_s"] = time.monotonic() - started
    _write(path, data)

    pngs = []
    if not args.no_plots:
        from . import plots

        pngs = plots.plot_all(path)
        plots.remove_other_runs_plots(path)
    print_summary(data)
    print(f"\nresults: {path}" + "".join(f"\nplot:    {p}" for p in pngs))
    print(f"elapsed: {data['elapsed_s']:.0f} s")
    return data


def print_summary(data: dict[str, Any]) -> None:
    if "accumulate" in data:
        acc = data["accumulate"]
        print(f"\n== one accumulation micro-step: bf16 grads into fp32 masters, scale 1/{acc['window']}, grads zeroed, "
              f"inf flag; 'last' adds post-scale and norm ==")
        print(f"GB/s = byte budget / time ({bench_accumulate.bytes_summary()}); %copy against "
              f"{data['copy_bandwidth']['GBps']:.2f} GB/s measured copy; native = {', '.join(acc['native_providers'])}")
        print(bench_accumulate.summary_table(acc))
        reasons = list(dict.fromkeys(f"{s['provider']}: {s['reason']}" for s in acc["skipped"]))
        if reasons:
            print("skipped:\n  " + "\n  ".join(reasons))
    if "numerics" in data:
        print("\n== numerics: relative error of the accumulated gradient against float64 ==")
        print(bench_numerics.summary_table(data["numerics"]))
    if "end_to_end" in data:
        print("\n== end to end ==")
        print(bench_end_to_end.summary_table(data["end_to_end"]))
    if "claims" in data:
        print("\n== the classic claims, measured ==")
        print(bench_claims.summary_table(data["claims"], data.get("end_to_end")))
    if "distributed" in data:
        print("\n== distributed: one accumulation window under DDP, per rank ==")
        print(bench_distributed.summary_table(data["distributed"]))
    if data.get("targets"):
        print("\n== targets (read from this run, never asserted) ==")
        for t in data["targets"]:
            status = "n/a" if t["met"] is None else "MET" if t["met"] else "MISSED"
            bound = t.get("bound") or ("<=" if "launches" in t["unit"] else ">=")
            print(f"  [{status:>6}] {t['target']}: {t['value']:.2f}{t['unit']} (target {bound} {t['threshold']}"
                  f"{t['unit']})")


if __name__ == "__main__":
    main()
