"""Microbenchmark of one accumulation micro-step: fusedaccum against native PyTorch, same work on every side.

Every provider does, for bf16 grads ``g`` into fp32 masters ``m`` (DESIGN.md, "The core op"):

* ``first`` (a window's first micro-step): ``m = g * s``; ``g = 0``; inf flag.          8 B/element budget
* ``mid``   (any other micro-step):        ``m += g * s``; ``g = 0``; inf flag.         12 B/element budget
* ``last``  (a window's last micro-step):  ``mid`` + ``m *= 1/W`` + grad norm (sumsq).   12 B/element budget

Which variants run where is in :func:`plan` (flat sizes: ``last``; parameter lists: all or ``mid`` + ``last``).
GB/s is the variant's byte budget (DESIGN.md, "Byte budget") divided by the time, the same bytes for every
provider, so it is an effective bandwidth: a provider that makes extra passes shows up as lower GB/s.

Providers: ``loop`` / ``foreach`` (``fusedaccum.reference.accumulate_loop_`` / ``accumulate_foreach_``, the two
native formulations), ``compile`` (``torch.compile`` of the foreach one), ``grad_dtype`` (autograd's own fp32
accumulation, see :class:`_GradDtype`), and ``fusedaccum-<backend>`` (cpu / cuda / triton).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import fusedaccum
from fusedaccum import backends, reference

from . import common, workloads

WINDOW = 8  # accumulation steps W of the simulated window
SCALE = 1.0 / WINDOW
# The ``last`` variant's post-scale. Not 1/W: repeated timing calls on the same buffers would multiply the
# masters by 1/W again and again, into float32 denormals within ~40 calls (a slow path on x86 that would
# distort the timings), then to zero. Any value other than 1.0 costs every provider the same (the native
# ones skip the multiply only for exactly 1.0), and 1 - 2^-20 keeps the masters' magnitude for a million calls.
POST_SCALE = 1.0 - 2.0**-20
VARIANTS: dict[str, dict[str, Any]] = {
    "first": {"overwrite": True, "post_scale": 1.0, "norm": False, "bytes_per_element": 8},
    "mid": {"overwrite": False, "post_scale": 1.0, "norm": False, "bytes_per_element": 12},
    "last": {"overwrite": False, "post_scale": POST_SCALE, "norm": True, "bytes_per_element": 12},
}
NATIVE = ("loop", "foreach", "compile", "grad_dtype")
# torch.compile warm-up grows with the number of tensors in the list: on the 2-core AMD EPYC VM, 41 s for the
# 148-tensor GPT-2 list and 33 s for 128 tiny tensors, versus ~2-6 s for one flat tensor.
COMPILE_MAX_TENSORS_DEFAULT = 512


@dataclasses.dataclass
class Workload:
    name: str
    kind: str  # "flat" or "list"
    shapes: list[tuple[int, ...]]
    variants: list[str]

    @property
    def numel(self) -> int:
        return workloads.numel(self.shapes)


@dataclasses.dataclass
class Plan:
    workloads: list[Workload]
    providers: list[str]
    min_run_time: float
    compile_lists: bool  # torch.compile on parameter lists (slow warm-up on a CPU)
    compile_max_tensors: int
    compile_budget_s: float  # total compile warm-up allowed in one run; beyond it compile is skipped
    skipped_providers: dict[str, str]
    max_copies: int = common.MAX_COPIES  # rotation cap (see common.copies_to_rotate)


def providers_for(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The providers that can run on ``device`` here, and a reason for each that cannot."""
    names = ["loop", "foreach", "compile"]
    skipped: dict[str, str] = {}
    if hasattr(torch.Tensor, "grad_dtype"):
        names.append("grad_dtype")
    else:
        skipped["grad_dtype"] = f"torch {torch.__version__} has no Tensor.grad_dtype"
    for backend in ("cpu", "cuda", "triton"):
        name = f"fusedaccum-{backend}"
        if backend == "triton" and device.type != "cuda":
            skipped[name] = "triton runs only on a GPU here (its CPU interpreter is no benchmark)"
            continue
        if backend == "triton" and backends.triton_interpreted():
            skipped[name] = "TRITON_INTERPRET=1 is set: the interpreter is no benchmark (unset it on a GPU)"
            continue
        if backend != "triton" and backend != device.type:
            continue  # the other device's backend: not a skip worth reporting
        reason = backends.why_unavailable(backend, device)
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    return names, skipped


def plan(mode: str, device: torch.device) -> Plan:
    """What to run: ``tiny`` (seconds, for the test), ``default`` (CPU: under 3 minutes on 2 cores) or ``full``.

    On a GPU everything is fast except compile warm-ups, so ``default`` is close to ``full`` there.
    """
    providers, skipped = providers_for(device)
    gpu = device.type == "cuda"
    if mode == "tiny":
        flat_exponents, flat_variants = [10, 14], ["mid", "last"]
        lists = [Workload("tiny-64", "list", workloads.many_tiny(16), ["first", "mid", "last"])]
        min_run_time, compile_lists = 0.01, False
    elif mode == "full" or gpu:
        step = 1 if mode == "full" else 2
        flat_exponents = list(range(10, 29, step))
        flat_variants = ["mid", "last"] if mode == "full" else ["last"]
        lists = [
            Workload("gpt2-124m", "list", workloads.gpt2_124m(), ["first", "mid", "last"]),
            Workload("llama-1b", "list", workloads.llama_1b(), ["mid", "last"] if mode == "full" else ["last"]),
            Workload("many-tiny", "list", workloads.many_tiny(), ["first", "mid", "last"]),
        ]
        min_run_time, compile_lists = (0.3 if gpu else 1.0), True
    else:  # default on a CPU: sized for the 3-minute budget on 2 cores
        flat_exponents, flat_variants = [10, 14, 18, 22, 24], ["last"]
        lists = [
            Workload("gpt2-124m", "list", workloads.gpt2_124m(), ["mid", "last"]),
            Workload("many-tiny", "list", workloads.many_tiny(), ["first", "mid", "last"]),
        ]
        min_run_time, compile_lists = 0.3, False
    flats = [Workload(f"flat-2^{e}", "flat", workloads.flat(e), list(flat_variants)) for e in flat_exponents]
    return Plan(
        workloads=flats + lists,
        providers=providers,
        min_run_time=min_run_time,
        compile_lists=compile_lists,
        compile_max_tensors=10**9 if mode == "full" else COMPILE_MAX_TENSORS_DEFAULT,
        compile_budget_s=600.0 if mode == "full" else 180.0,
        skipped_providers=skipped,
        max_copies=4 if mode == "tiny" else common.MAX_COPIES,  # tiny checks the plumbing, not the numbers
    )


# ------------------------------------------------------------------------------------------ buffers
@dataclasses.dataclass
class Buffers:
    masters: list[torch.Tensor]
    grads: list[torch.Tensor]
    found_inf: torch.Tensor
    sumsq: torch.Tensor


def make_buffers(shapes: list[tuple[int, ...]], device: torch.device, generator: torch.Generator) -> Buffers:
    # Fresh random data (never zeros); uniform_ because randn is several times slower to fill 1e9 elements.
    masters = [torch.empty(s, device=device).uniform_(-1, 1, generator=generator) for s in shapes]
    grads = [torch.empty(s, device=device).uniform_(-1, 1, generator=generator).bfloat16() for s in shapes]
    return Buffers(masters, grads, torch.zeros(1, device=device), torch.zeros(1, device=device))


def clone_buffers(b: Buffers) -> Buffers:
    """A fresh copy of ``b``'s data, with zeroed flags: the same inputs for the next provider, at memcpy speed
    (GPT-2's 124M elements on the 2-core CI CPU: 0.3 s instead of 1.8 s to draw them again)."""
    device = b.found_inf.device
    return Buffers([m.clone() for m in b.masters], [g.clone() for g in b.grads], torch.zeros(1, device=device),
                   torch.zeros(1, device=device))


def _kwargs(variant: dict[str, Any], b: Buffers) -> dict[str, Any]:
    return {"overwrite": variant["overwrite"], "post_scale": variant["post_scale"], "zero_grads": True,
            "found_inf": b.found_inf, "sumsq": b.sumsq if variant["norm"] else None}


class _GradDtype:
    """Autograd's own fp32 accumulation: bf16 leaves with ``grad_dtype = float32``, fed by ``backward``.

    ``torch.autograd.backward(params, grads)`` runs the engine's AccumulateGrad for every leaf, which casts the
    incoming bf16 grad to fp32 and adds it into ``param.grad`` in place: exactly what a real backward does
    at its leaves, minus the GEMMs. The incoming grad is a temporary in real training (freed, never zeroed),
    and the 1/W scale is folded into the loss upstream, so neither costs anything here. The inf check waits
    for the window's end (non-finite values survive fp32 accumulation). So:

    * ``first``: ``param.grad = None`` (``zero_grad(set_to_none=True)``) then backward (allocates the grads);
    * ``mid``: backward;
    * ``last``: backward, then native foreach: ``*= post_scale``, norm, inf flag from the norm.

    No other reference to ``param.grad`` is kept: AccumulateGrad adds in place only when it holds the last one.
    """

    def __init__(self, b: Buffers) -> None:
        self.params = []
        for master in b.masters:
            p = torch.empty(master.shape, dtype=torch.bfloat16, device=master.device, requires_grad=True)
            p.grad_dtype = torch.float32
            p.grad = master
            self.params.append(p)
        self.grads = b.grads
        self.found_inf, self.sumsq = b.found_inf, b.sumsq
        b.masters.clear()  # the params own the masters now (see the class docstring)

    def __call__(self, variant: dict[str, Any]) -> None:
        if variant["overwrite"]:
            for p in self.params:
                p.grad = None
        torch.autograd.backward(self.params, self.grads)
        if variant["norm"]:
            masters = [p.grad for p in self.params]
            torch._foreach_mul_(masters, variant["post_scale"])
            total = torch.stack(torch._foreach_norm(masters, 2)).square().sum()
            self.sumsq.add_(total)
            self.found_inf.masked_fill_(~torch.isfinite(total), 1.0)


def _provider_call(provider: str, variant: dict[str, Any], compiled: Callable[..., None] | None):
    """A function of one Buffers set that runs one micro-step, and a per-set preparation step."""
    if provider == "grad_dtype":
        return (lambda state: state(variant)), _GradDtype
    if provider == "loop":
        fn = reference.accumulate_loop_
    elif provider == "foreach":
        fn = reference.accumulate_foreach_
    elif provider == "compile":
        fn = compiled
    else:
        backend = provider.removeprefix("fusedaccum-")

        def fn(masters, grads, scale, **kw):
            fusedaccum.ops.accumulate_(masters, grads, scale, backend=backend, **kw)

    return (lambda b: fn(b.masters, b.grads, SCALE, **_kwargs(variant, b))), (lambda b: b)


# ------------------------------------------------------------------------------------------ runner
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _compile_skip_reason(w: Workload, p: Plan, compile_spent: float) -> str | None:
    if w.kind == "list" and not p.compile_lists:
        return ("torch.compile of a parameter list warms up for tens of seconds on a CPU (inductor emits C++ per "
                "tensor): not in the default run's budget; run --full")
    if len(w.shapes) > p.compile_max_tensors:
        return f"{len(w.shapes)} tensors: compile warm-up would take minutes; run --full"
    if compile_spent > p.compile_budget_s:
        return f"compile warm-ups already took {compile_spent:.0f} s, over this run's {p.compile_budget_s:.0f} s"
    return None


def run(p: Plan, device: torch.device, copy_GBps: float, deadline: float | None = None,
        limit_GBps: dict[str, float] | None = None) -> dict[str, Any]:
    """Runs the plan; returns ``{"results": [...], "skipped": [...]}`` (one result per workload/variant/provider)."""
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = [
        {"provider": name, "workload": "*", "variant": "*", "reason": why} for name, why in p.skipped_providers.items()
    ]
    for name, why in p.skipped_providers.items():
        tqdm.write(f"skip {name}: {why}")
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    compiled = None
    compile_spent = 0.0
    cases = [(w, v, prov) for w in p.workloads for v in w.variants for prov in p.providers]
    generator = torch.Generator(device=device)
    # Every case of a workload starts from the same data (seed 0): drawn once per workload and cloned per case
    # when a second set fits in memory, else drawn again each time.
    drawn_for: str | None = None
    drawn: list[Buffers] | None = None
    for w, vname, provider in tqdm(cases, desc="accumulate", unit="case", dynamic_ncols=True):
        variant = VARIANTS[vname]
        case = {"workload": w.name, "kind": w.kind, "variant": vname, "provider": provider}

        def skip(reason: str, case: dict[str, Any] = case) -> None:
            skipped.append({**case, "reason": reason})
            tqdm.write(f"skip {case['provider']} on {case['workload']}/{case['variant']}: {reason}")

        if deadline is not None and time.monotonic() > deadline:
            skip("the run's time budget (--time-budget) is spent")
            continue
        bytes_per_copy = w.numel * 6
        copies = min(p.max_copies, common.copies_to_rotate(bytes_per_copy, len(w.shapes), device))
        # The loop provider's temporaries (fp32 copy of the largest grad, m*m) and the grad_dtype provider's
        # bf16 params add up to about half a copy more.
        needed = int(bytes_per_copy * (copies + 0.6))
        if needed > 0.85 * _free_bytes(device):
            skip(f"needs ~{needed / 1e9:.1f} GB, more than this machine has free")
            continue
        if provider == "compile":
            reason = _compile_skip_reason(w, p, compile_spent)
            if reason:
                skip(reason)
                continue
            torch._dynamo.reset()  # a fresh, shape-specialised compile per workload and variant
            compiled = torch.compile(reference.accumulate_foreach_, dynamic=False)
        call, prepare = _provider_call(provider, variant, compiled)
        if drawn_for != w.name:
            drawn_for, drawn = w.name, None  # the last workload's sets are freed before the next are drawn
            if 2 * needed < 0.85 * _free_bytes(device):
                generator.manual_seed(0)
                drawn = [make_buffers(w.shapes, device, generator) for _ in range(copies)]
        if drawn is not None:
            states = [prepare(clone_buffers(b)) for b in drawn]
        else:
            generator.manual_seed(0)
            states = [prepare(make_buffers(w.shapes, device, generator)) for _ in range(copies)]
        fn = common.Rotating(call, [(s,) for s in states])
        try:
            started = time.perf_counter()
            fn()
            common.synchronize(device)
            warmup_s = time.perf_counter() - started
            if provider == "compile":
                compile_spent += warmup_s
            # First touches of the other copies and allocator warm-up; slow providers get two more calls too
            # (their first calls were measurably slower than the rest on the CPU).
            for _ in range(max(min(copies, 3), 2) if warmup_s < 0.5 else 2):
                fn()
            timing = common.time_call(fn, device, p.min_run_time)
            launches = common.count_gpu_launches(fn, device)
        except Exception as error:  # a provider that fails is reported, never fatal to the suite
            skip(f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
            del states, fn
            continue
        moved = variant["bytes_per_element"] * w.numel
        results.append({
            **case, "numel": w.numel, "tensors": len(w.shapes), "copies": copies,
            "median_s": timing["median_s"], "min_s": timing["min_s"], "iqr_s": timing["iqr_s"],
            "samples": timing["samples"], "warmup_s": warmup_s,
            "bytes": moved, "bytes_per_element": variant["bytes_per_element"],
            "GBps": moved / timing["median_s"] / 1e9,
            "pct_copy_bw": 100.0 * moved / timing["median_s"] / 1e9 / copy_GBps,
            # % of the CPU's limit for this variant's own pattern (common.same_pattern_limit); None on a GPU.
            "pct_limit": (100.0 * moved / timing["median_s"] / 1e9 / limit_GBps[common.limit_pattern(vname)]
                          if limit_GBps else None),
            "launches_per_call": launches["kernels"] if launches else None,
            "gpu_ops_per_call": launches["kernels_and_copies"] if launches else None,
            "native": provider in NATIVE,
        })
        del states, fn  # frees the buffers now (plain refcounting; gc.collect costs 0.2 s a case here)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_speedups(results)
    return {"results": results, "skipped": skipped, "window": WINDOW, "scale": SCALE, "post_scale": POST_SCALE,
            "variants": VARIANTS,
            "providers": p.providers, "native_providers": list(NATIVE)}


def _add_speedups(results: list[dict[str, Any]]) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["workload"], r["variant"]), []).append(r)
    for rows in groups.values():
        native = [r for r in rows if r["native"]]
        best = min(native, key=lambda r: r["median_s"]) if native else None
        loop = next((r for r in rows if r["provider"] == "loop"), None)
        for r in rows:
            r["best_native"] = best["provider"] if best else None
            r["speedup_vs_best_native"] = best["median_s"] / r["median_s"] if best else None
            r["speedup_vs_loop"] = loop["median_s"] / r["median_s"] if loop else None


# ------------------------------------------------------------------------------------------ reporting
def summary_table(section: dict[str, Any]) -> str:
    """A text table: one block per workload/variant, one row per provider."""
    lines = []
    header = f"{'workload':<12} {'variant':<6} {'provider':<16} {'median':>10} {'GB/s':>8} {'%copy':>6} " \
             f"{'%limit':>6} {'launch':>6} {'vs best native':>15}"
    lines.append(header)
    lines.append("-" * len(header))
    last_key = None
    for r in section["results"]:
        key = (r["workload"], r["variant"])
        if last_key is not None and key != last_key:
            lines.append("")
        last_key = key
        launches = "-" if r["launches_per_call"] is None else f"{r['launches_per_call']:.0f}"
        speedup = r["speedup_vs_best_native"]
        speed = "-" if speedup is None else f"{speedup:.2f}x ({r['best_native']})"
        limit = "-" if r.get("pct_limit") is None else f"{r['pct_limit']:.1f}"
        lines.append(f"{r['workload']:<12} {r['variant']:<6} {r['provider']:<16} {_fmt_time(r['median_s']):>10} "
                     f"{r['GBps']:>8.2f} {r['pct_copy_bw']:>6.1f} {limit:>6} {launches:>6} {speed:>15}")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def targets(section: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """The targets of issues 2 and 4, evaluated on this run's numbers (printed, never asserted)."""
    out: list[dict[str, Any]] = []
    rows = section["results"]
    fused = f"fusedaccum-{device.type}"

    def find(workload: str, variant: str, provider: str) -> dict[str, Any] | None:
        return next((r for r in rows if (r["workload"], r["variant"], r["provider"]) == (workload, variant, provider)),
                    None)

    def add(name: str, value: float | None, threshold: float, unit: str) -> None:
        out.append({"target": name, "value": value, "threshold": threshold, "unit": unit,
                    "met": None if value is None else bool(value >= threshold)})

    gpt2_variants = [v for v in ("last", "mid", "first") if find("gpt2-124m", v, fused)]
    if device.type == "cpu":
        for v in gpt2_variants[:2]:
            r = find("gpt2-124m", v, fused)
            add(f"cpu: {fused} vs best native, gpt2-124m/{v}", r["speedup_vs_best_native"], 1.5, "x")
            add(f"cpu: {fused} % of copy bandwidth, gpt2-124m/{v}", r["pct_copy_bw"], 75.0, "%")
            if r.get("pct_limit") is not None:
                # A limit, not a goal: above 100% the limit loop would not be one (an upper bound, like launches).
                out.append({"target": f"cpu: {fused} % of the same-pattern limit, gpt2-124m/{v}",
                            "value": r["pct_limit"], "threshold": 100.0, "unit": "%", "bound": "<=",
                            "met": bool(r["pct_limit"] <= 100.0)})
        return out
    for provider in [p for p in section["providers"] if p.startswith("fusedaccum-")]:
        big = [r for r in rows if r["provider"] == provider and r["kind"] == "flat" and r["numel"] >= 1 << 24]
        if big:
            add(f"gpu: {provider} min % of copy bandwidth, flat >= 2^24", min(r["pct_copy_bw"] for r in big), 90.0, "%")
        r = find("gpt2-124m", "last", provider)
        if r:
            add(f"gpu: {provider} vs loop, gpt2-124m/last", r["speedup_vs_loop"], 3.0, "x")
            comp = find("gpt2-124m", "last", "compile")
            if comp:
                add(f"gpu: {provider} vs compile, gpt2-124m/last", comp["median_s"] / r["median_s"], 1.2, "x")
        mine = [r for r in rows if r["provider"] == provider and r["speedup_vs_best_native"] is not None]
        if mine:
            add(f"gpu: {provider} never slower than best native (min speedup)",
                min(r["speedup_vs_best_native"] for r in mine), 1.0, "x")
        launches = [r["launches_per_call"] for r in rows if r["provider"] == provider and r["launches_per_call"]]
        if launches:
            # One launch per call is the aim (issue 2): an upper bound, unlike the other targets.
            out.append({"target": f"gpu: {provider} kernel launches per call (max)", "value": max(launches),
                        "threshold": 1.0, "unit": "launches", "met": bool(max(launches) <= 1.0)})
    return out


def bytes_summary() -> str:
    return ", ".join(f"{k}: {v['bytes_per_element']} B/element" for k, v in VARIANTS.items())
