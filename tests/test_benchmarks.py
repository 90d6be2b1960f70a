"""The benchmark suite runs end to end in its tiny configuration, so it cannot rot.

It runs ``python -m benchmarks --tiny`` in a subprocess (as a user would, from the repository root) into a
temporary folder and checks the results file's structure and that its numbers are finite and positive.
Timings are never asserted: they belong to the machine, not to the code.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
META_FIELDS = ("date", "device", "device_name", "cpu_model", "torch", "triton", "fusedaccum", "git_commit", "backends")
RESULT_FIELDS = ("workload", "variant", "provider", "numel", "median_s", "GBps", "pct_copy_bw", "bytes",
                 "speedup_vs_best_native", "best_native", "launches_per_call")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out), "--name", "tiny"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "tiny.json").read_text()), out, proc.stdout


def test_metadata(tiny_run: tuple[dict, Path, str]) -> None:
    data, _, _ = tiny_run
    assert data["config"]["mode"] == "tiny"
    for field in META_FIELDS:
        assert field in data["meta"], field
    assert data["meta"]["torch"] and data["meta"]["fusedaccum"] and data["meta"]["date"]
    assert _positive(data["elapsed_s"])


def test_copy_bandwidth(tiny_run: tuple[dict, Path, str]) -> None:
    copy = tiny_run[0]["copy_bandwidth"]
    assert _positive(copy["GBps"]) and copy["method"] in copy["candidates_GBps"]


def test_same_pattern_limit(tiny_run: tuple[dict, Path, str]) -> None:
    """On a CPU the run measures the limit for the fused pass's own pattern and reports % of it on every row."""
    data = tiny_run[0]
    if not data["meta"]["device"].startswith("cpu"):
        pytest.skip("a GPU run: the device copy stays the reference")
    limit = data["stream_limit"]
    if limit["GBps"] is None:
        pytest.skip(limit["why"])
    assert set(limit["GBps"]) == {"read_both_write_both", "read_grads_write_both"}
    assert all(_positive(v) for v in limit["GBps"].values())
    for r in data["accumulate"]["results"]:
        pattern = "read_grads_write_both" if r["variant"] == "first" else "read_both_write_both"
        assert r["pct_limit"] == pytest.approx(100 * r["GBps"] / limit["GBps"][pattern]), r


def test_accumulate_results(tiny_run: tuple[dict, Path, str]) -> None:
    acc = tiny_run[0]["accumulate"]
    rows = acc["results"]
    providers = {r["provider"] for r in rows}
    # The two native baselines always run; fusedaccum's backend for this device runs when it was built.
    assert {"loop", "foreach"} <= providers
    assert any(p.startswith("fusedaccum-") for p in providers) or any(
        s["provider"].startswith("fusedaccum-") for s in acc["skipped"]
    )
    assert {r["variant"] for r in rows} == {"first", "mid", "last"}
    assert {r["kind"] for r in rows} == {"flat", "list"}
    for r in rows:
        for field in RESULT_FIELDS:
            assert field in r, (field, r)
        for field in ("median_s", "GBps", "pct_copy_bw", "bytes", "speedup_vs_best_native"):
            assert _positive(r[field]), (field, r)
        assert r["bytes"] == r["bytes_per_element"] * r["numel"]
    for s in acc["skipped"]:
        assert s["reason"], s  # every skip says why


def test_numerics(tiny_run: tuple[dict, Path, str]) -> None:
    rows = tiny_run[0]["numerics"]["rows"]
    assert [r["N"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("native_bf16", "fp32_master"))
    # Not a timing: the point of fp32 masters. At N = 8 bf16 accumulation has rounded, fp32 barely.
    assert rows[-1]["fp32_master"] < rows[-1]["native_bf16"]


def test_end_to_end_ran_or_said_why(tiny_run: tuple[dict, Path, str]) -> None:
    section = tiny_run[0]["end_to_end"]
    if "skipped" in section:
        assert section["skipped"]
        return
    for r in section["rows"]:
        assert _positive(r["s_per_update"])


def test_claims(tiny_run: tuple[dict, Path, str]) -> None:
    section = tiny_run[0]["claims"]
    if "rows" not in section:  # only without GradAccumulator, and then it says why
        assert section["skipped"]
        return
    assert not section["failures"], section["failures"]
    assert section["config"]["ns"] == [2, 4] and section["config"]["updates"] >= 1
    rows = section["rows"]
    methods = {(r["model_dtype"], r["method"]) for r in rows}
    bf16_methods = ("large-batch", "native-bf16", "fusedaccum", "fusedaccum-master_weights")
    assert {("bfloat16", m) for m in bf16_methods} <= methods
    assert {("float32", m) for m in ("large-batch", "native-fp32", "fusedaccum")} <= methods
    assert ("bfloat16", "native-fp32-grad_dtype") in methods or "native-fp32-grad_dtype" in section["skipped"]
    for r in rows:
        assert r["N"] in (2, 4)
        for ref in ("large_batch", "float64"):
            for metric in ("max_abs", "l2_rel_to_param", "l2_rel_to_update"):
                value = r[f"{metric}_vs_{ref}"]
                assert math.isfinite(value) and value >= 0, (metric, ref, r)
        if r["method"] == "large-batch":  # the reference against itself: the comparison's plumbing
            assert r["max_abs_vs_large_batch"] == 0, r
        # Every run really trained: nothing equals the float64 run bit for bit.
        assert r["max_abs_vs_float64"] > 0, r
    assert "classic claims" in tiny_run[2]


def test_distributed(tiny_run: tuple[dict, Path, str]) -> None:
    section, stdout = tiny_run[0]["distributed"], tiny_run[2]
    assert section["world"] == 2 and section["backend"] == "gloo"
    rows = {r["mode"]: r for r in section["rows"]}
    assert list(rows) == ["ddp-every-step", "ddp-no_sync", "fusedaccum", "fusedaccum-in_backward"]
    for r in rows.values():
        for field in ("s_per_window", "bytes_per_window", "all_reduces_per_window", "speedup_vs_every_step"):
            assert _positive(r[field]), (field, r)
        assert r["s_per_window_all"] and all(_positive(t) for t in r["s_per_window_all"])
        # Counts, not timings: the loops train alike (fp32 rounding apart; a missing 1/N would be O(1)).
        assert 0 <= r["update_rel_diff_vs_no_sync"] < 1e-4, r
    n, grad_bytes = section["config"]["N"], section["grad_bytes"]
    # The naive loop all-reduces every micro-step's gradients; no_sync once per window; the wrapper once per
    # window too (one bucket at this size) plus its small float64 metadata tensor.
    assert rows["ddp-every-step"]["bytes_per_window"] == n * grad_bytes
    assert rows["ddp-every-step"]["all_reduces_per_window"] >= n
    assert rows["ddp-no_sync"]["bytes_per_window"] == grad_bytes
    for mode in ("fusedaccum", "fusedaccum-in_backward"):  # the tiny buffer is one bucket, plus the metadata
        assert rows[mode]["all_reduces_per_window"] == 2, mode
        assert 0 < rows[mode]["bytes_per_window"] - grad_bytes <= 1024, mode
    assert "distributed: one accumulation window" in stdout and "fusedaccum" in stdout


def test_outputs(tiny_run: tuple[dict, Path, str]) -> None:
    data, out, stdout = tiny_run
    for suffix in ("flat", "lists", "numerics"):
        png = out / f"tiny_{suffix}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "one accumulation micro-step" in stdout and "numerics" in stdout


def test_plots_module_replots(tiny_run: tuple[dict, Path, str], tmp_path: Path) -> None:
    # A subprocess from the repository root: pytest's importlib mode keeps the root off sys.path.
    copy = tmp_path / "again.json"
    copy.write_text(json.dumps(tiny_run[0]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plots", str(copy)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.split()) == 3 and all(Path(p).exists() for p in proc.stdout.split())


def test_time_budget_skips_the_cases_left_and_says_so() -> None:
    """A spent budget starts no further case; each one left is reported as skipped, none silently dropped (the
    default CPU run keeps its 3 minutes this way)."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import torch

        from benchmarks import bench_accumulate
    finally:
        sys.path.remove(str(REPO_ROOT))
    device = torch.device("cpu")
    plan = bench_accumulate.plan("tiny", device)
    section = bench_accumulate.run(plan, device, copy_GBps=1.0, deadline=0.0)
    assert section["results"] == []
    budget_skips = [s for s in section["skipped"] if "time budget" in s["reason"]]
    cases = sum(len(w.variants) for w in plan.workloads) * len(plan.providers)
    assert len(budget_skips) == cases > 0


def test_only_the_latest_runs_plots_are_kept(tmp_path: Path) -> None:
    """Every run's JSON stays; the PNGs of older runs go (they can be redrawn from their JSON)."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from benchmarks import plots
    finally:
        sys.path.remove(str(REPO_ROOT))

    for stem in ("old", "new"):
        (tmp_path / f"{stem}.json").write_text("{}")
        (tmp_path / f"{stem}_flat.png").write_bytes(b"png")
    (tmp_path / "unrelated.png").write_bytes(b"png")  # no JSON of its own: not a run's plot
    removed = plots.remove_other_runs_plots(tmp_path / "new.json")
    assert removed == [tmp_path / "old_flat.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "new_flat.png", "old.json", "unrelated.png"]
