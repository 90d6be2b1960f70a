"""PNG plots from a results JSON: ``python -m benchmarks.plots benchmarks/results/<run>.json``.

Writes ``<run>_flat.png`` (GB/s against size), ``<run>_lists.png`` (GB/s on real parameter lists) and
``<run>_numerics.png`` (error against N) beside the JSON. Reads only the JSON, so old runs can be re-plotted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or GPU machines
import matplotlib.pyplot as plt  # noqa: E402

# Fixed colours per provider, so every plot of every run reads the same way.
COLORS = {
    "loop": "#9e9e9e",
    "foreach": "#616161",
    "compile": "#8d6e63",
    "grad_dtype": "#7e57c2",
    "fusedaccum-cpu": "#e65100",
    "fusedaccum-cuda": "#e65100",
    "fusedaccum-triton": "#1565c0",
}
LABELS = {
    "loop": "native loop",
    "foreach": "native foreach",
    "compile": "torch.compile(foreach)",
    "grad_dtype": "autograd grad_dtype=fp32",
}


def _title(data: dict[str, Any], what: str) -> str:
    m = data["meta"]
    return f"{what}\n{m['device_name']} · torch {m['torch']} · fusedaccum {m['fusedaccum']} · {m['date'][:10]}"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_flat(data: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in data["accumulate"]["results"] if r["kind"] == "flat"]
    if not rows:
        return None
    variant = "last" if any(r["variant"] == "last" for r in rows) else rows[0]["variant"]
    rows = [r for r in rows if r["variant"] == variant]
    fig, ax = plt.subplots(figsize=(8, 5))
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["numel"])
        fused = provider.startswith("fusedaccum")
        ax.plot([r["numel"] for r in mine], [r["GBps"] for r in mine], marker="o", color=COLORS.get(provider),
                linewidth=2.5 if fused else 1.5, label=LABELS.get(provider, provider))
    copy = data["copy_bandwidth"]["GBps"]
    ax.axhline(copy, color="black", linestyle="--", linewidth=1)
    ax.annotate(f"copy bandwidth {copy:.1f} GB/s", (0.01, copy), xycoords=("axes fraction", "data"),
                textcoords="offset points", xytext=(0, 4), fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("elements in one tensor (bf16 grad into fp32 master)")
    ax.set_ylabel("effective GB/s (byte budget / time, higher is better)")
    ax.set_title(_title(data, f"One accumulation micro-step ({variant}: scale, zero grads, inf flag"
                              f"{', norm' if variant == 'last' else ''})"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_lists(data: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in data["accumulate"]["results"] if r["kind"] == "list"]
    if not rows:
        return None
    groups = list(dict.fromkeys((r["workload"], r["variant"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for g, key in enumerate(groups):
            r = next((r for r in rows if (r["workload"], r["variant"]) == key and r["provider"] == provider), None)
            if r:
                xs.append(g + (i - (len(providers) - 1) / 2) * width)
                ys.append(r["GBps"])
        bars = ax.bar(xs, ys, width, color=COLORS.get(provider), label=LABELS.get(provider, provider))
        if provider.startswith("fusedaccum"):
            for bar in bars:
                ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    copy = data["copy_bandwidth"]["GBps"]
    ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"copy bandwidth ({copy:.1f} GB/s)")
    ax.set_xticks(range(len(groups)), [f"{w}\n{v}" for w, v in groups])
    ax.set_yscale("log")
    ax.set_ylabel("effective GB/s (byte budget / time, higher is better)")
    ax.set_title(_title(data, "One micro-step on real parameter lists"), fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_numerics(data: dict[str, Any], path: Path) -> Path | None:
    section = data.get("numerics")
    if not section or "rows" not in section:
        return None
    rows = section["rows"]
    # Exact results (N = 1 in both; N = 2 in fp32): a zero has no place on a log axis, so zeros sit on a floor.
    nonzero = [r[k] for r in rows for k in ("native_bf16", "fp32_master") if r[k] > 0]
    floor = min(nonzero, default=section["fp32_unit_roundoff"]) / 10
    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, label, color in (("native_bf16", "native: bf16 param.grad += g/N", COLORS["grad_dtype"]),
                              ("fp32_master", "fusedaccum: fp32 master += g/N", COLORS["fusedaccum-cpu"])):
        ax.plot(ns, [max(r[key], floor) for r in rows], marker="o", linewidth=2.5, color=color, label=label)
    ax.axhline(section["bf16_unit_roundoff"], color="gray", linestyle=":", linewidth=1)
    ax.annotate("bf16 unit roundoff 2^-8", (ns[0], section["bf16_unit_roundoff"]), textcoords="offset points",
                xytext=(2, 4), fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xlabel("micro-batches accumulated (N)")
    ax.set_ylabel("relative error vs float64 large batch (lower is better)")
    ax.set_title(_title(data, "Gradient accumulation error as N grows"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title=f"(exact results, error 0, plotted at {floor:.0e})", title_fontsize=8, fontsize=9)
    return _save(fig, path)


def plot_all(json_path: Path) -> list[Path]:
    """Every plot the results file has data for; returns the PNG paths written."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    written = []
    for suffix, fn in (("flat", plot_flat), ("lists", plot_lists), ("numerics", plot_numerics)):
        if "accumulate" not in data and suffix != "numerics":
            continue
        out = fn(data, Path(f"{stem}_{suffix}.png"))
        if out:
            written.append(out)
    return written


def remove_other_runs_plots(json_path: Path | str) -> list[Path]:
    """The PNGs of the other runs beside ``json_path``: only the latest run's plots are kept (every run's JSON is,
    and ``python -m benchmarks.plots <run>.json`` redraws its plots). Returns what was removed."""
    json_path = Path(json_path)
    own = json_path.with_suffix("").name + "_"
    removed = []
    for png in json_path.parent.glob("*.png"):
        if not png.name.startswith(own) and png.with_name(png.name.rsplit("_", 1)[0] + ".json").exists():
            png.unlink()
            removed.append(png)
    return removed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    for p in parser.parse_args().json:
        for png in plot_all(p):
            print(png)
