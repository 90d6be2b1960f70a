"""Shared benchmark machinery: timers, rotating buffers, copy bandwidth, launch counts, machine metadata.

Timing rules, the same for every provider so their ratios mean something:

* CPU: ``torch.utils.benchmark.Timer`` with all intra-op threads (its default is one thread, which would
  cripple every parallel kernel), median of the measured blocks, at least ``MIN_SAMPLES`` samples.
* GPU: CUDA events around batches of back-to-back calls, median per-call time over the batches. Calls are
  queued back to back (no cache flush between them, unlike ``triton.testing.do_bench``, whose flush kernel
  hides the host-side launch cost of a per-tensor loop behind GPU work), so host overhead is counted.
* Both: when one copy of a workload fits in the last-level cache, calls rotate over enough copies to
  exceed it twice, so every call reads its data from memory as a real micro-step does.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import benchmark as torch_benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent
# Slow native providers (hundreds of ms per call on a 2-core CPU) vary run to run by 2x and more (autograd's
# grad_dtype accumulation measured 116-335 ms for the same GPT-2 'last' case in separate runs on the AMD EPYC VM):
# a median of 3 was not enough to quote; 10 samples plus the spread in the JSON are.
MIN_SAMPLES = 10
# Rotation is capped so that tiny workloads do not build millions of tensors; beyond the cap they stay
# partly cache-resident, which the JSON records (``copies``).
MAX_COPIES = 64
MAX_ROTATED_TENSORS = 20_000


# --------------------------------------------------------------------------------------------- devices
def cuda_usable() -> bool:
    return torch.cuda.is_available()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 on a GPU, the largest CPU cache level sysfs reports on the host (32 MiB if it reports none)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes, default=32 << 20)


def copies_to_rotate(bytes_per_copy: int, tensors_per_copy: int, device: torch.device) -> int:
    """How many copies of a workload to cycle through so that the data touched between two uses of one copy
    is at least twice the last-level cache."""
    if bytes_per_copy <= 0:
        return 1
    wanted = math.ceil(2 * last_level_cache_bytes(device) / bytes_per_copy)
    return max(1, min(wanted, MAX_COPIES, max(1, MAX_ROTATED_TENSORS // max(1, tensors_per_copy))))


class Rotating:
    """A zero-argument callable that calls ``fn(*args[i])`` with i cycling over the prepared argument sets."""

    def __init__(self, fn: Callable[..., Any], arg_sets: Sequence[tuple]) -> None:
        self.fn = fn
        self.arg_sets = list(arg_sets)
        self.index = 0

    def __call__(self) -> None:
        args = self.arg_sets[self.index]
        self.index = (self.index + 1) % len(self.arg_sets)
        self.fn(*args)


# ------------------------------------------------------------------------------------- native loops
def native_optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], fp32_grads: bool) -> None:
    """``opt.step()`` and ``zero_grad`` for a native accumulation loop. With autograd's fp32 accumulation
    (``Tensor.grad_dtype = float32``) the grads are cast to the params' dtype first (AdamW refuses fp32 grads on
    bf16 params), and fp32 accumulation is re-armed for the next window."""
    if fp32_grads:
        for p in params:
            grad, p.grad = p.grad, None
            p.grad_dtype = None
            p.grad = grad.to(p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if fp32_grads:
        for p in params:
            p.grad_dtype = torch.float32


# --------------------------------------------------------------------------------------------- timers
def time_call(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> dict[str, Any]:
    """Median seconds per call of ``fn`` (already warmed up by the caller) and the samples behind it."""
    if device.type == "cuda":
        return _time_cuda(fn, device, min_run_time)
    return _time_cpu(fn, min_run_time)


def spread(times: list[float]) -> dict[str, float]:
    """Minimum and interquartile range of the samples: how far a median can be trusted."""
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"min_s": ordered[0], "iqr_s": quartiles[2] - quartiles[0]}


def _time_cpu(fn: Callable[[], Any], min_run_time: float) -> dict[str, Any]:
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)
    # blocked_autorange stops after min_run_time, which for a slow provider (a second per call) can be one
    # sample: top up so every median rests on a few.
    while len(times) < MIN_SAMPLES:
        times.extend(timer.timeit(number=1).times)
    return {"median_s": statistics.median(times), "samples": len(times), "times_s": times, **spread(times)}


def _time_cuda(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> dict[str, Any]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end) / 1e3, 1e-6)
    # Batches of at least ~1 ms, so event resolution (about 0.5 us) and per-batch overhead are negligible.
    per_batch = max(1, min(1000, int(1e-3 / estimate)))
    batches = max(MIN_SAMPLES, min(200, int(min_run_time / (estimate * per_batch))))
    times = []
    for _ in range(batches):
        start.record()
        for _ in range(per_batch):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3 / per_batch)
    return {"median_s": statistics.median(times), "samples": len(times), "times_s": times,
            "calls_per_sample": per_batch, **spread(times)}


def count_gpu_launches(fn: Callable[[], Any], device: torch.device, calls: int = 3) -> dict[str, float] | None:
    """Device activities per call of ``fn`` seen by ``torch.profiler``: kernels, and kernels + memcpy/memset.

    None on a CPU (there is no launch to count) or when the profiler sees no device activity at all.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    kernels = other = 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if re.search(r"memcpy|memset", event.name, re.IGNORECASE):
            other += 1
        else:
            kernels += 1
    if kernels + other == 0:
        return None
    return {"kernels": kernels / calls, "kernels_and_copies": (kernels + other) / calls}


# ------------------------------------------------------------------------------------- copy bandwidth
def copy_bandwidth(device: torch.device, numel: int, min_run_time: float) -> dict[str, Any]:
    """The device's achievable copy bandwidth in GB/s (bytes read + bytes written), measured now.

    A float32 copy of ``numel`` elements (pick several times the last-level cache). On a CPU two copies are
    timed and the faster one counts: ATen's ``copy_`` uses ordinary stores (the memory system then also reads
    every destination line before writing it, a stream the figure does not count), while ``numpy.copyto``
    (glibc memcpy) may use non-temporal stores for large copies. A memcpy per thread is the third candidate.
    On the 2-core AMD EPYC VM all three measured 26-28 GB/s, below the 42-47 GB/s the fused pass reaches by
    its byte budget: there a plain copy is not the memory system's ceiling, and "% of copy" above 100 says so.
    """
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    candidates = {}

    def torch_copy() -> None:
        dst.copy_(src)

    torch_copy()
    synchronize(device)
    candidates["torch_copy_"] = moved / time_call(torch_copy, device, min_run_time)["median_s"] / 1e9
    if device.type == "cpu":
        src_np, dst_np = src.numpy(), dst.numpy()

        def numpy_copy() -> None:
            np.copyto(dst_np, src_np)

        numpy_copy()
        candidates["numpy_copyto"] = moved / time_call(numpy_copy, device, min_run_time)["median_s"] / 1e9
        threads = torch.get_num_threads()
        if threads > 1:
            # One memcpy per thread on its slice (numpy releases the GIL while copying): a single core may not
            # saturate the memory system, and the kernels under test use every thread.
            from concurrent.futures import ThreadPoolExecutor

            slices = [slice(i * numel // threads, (i + 1) * numel // threads) for i in range(threads)]
            with ThreadPoolExecutor(threads) as pool:

                def threaded_copy() -> None:
                    list(pool.map(lambda s: np.copyto(dst_np[s], src_np[s]), slices))

                threaded_copy()
                candidates["numpy_copyto_threaded"] = (
                    moved / time_call(threaded_copy, device, min_run_time)["median_s"] / 1e9
                )
    best = max(candidates, key=candidates.get)
    return {"GBps": candidates[best], "method": best, "candidates_GBps": candidates, "numel": numel,
            "dtype": "float32", "bytes_per_call": moved}


# ------------------------------------------------------------------------------ same-pattern CPU limit
LIMIT_PATTERNS = {"read_both_write_both": 0, "read_grads_write_both": 1}
LIMIT_BYTES = {"read_both_write_both": 12, "read_grads_write_both": 8}


def same_pattern_limit(numel: int, min_run_time: float) -> dict[str, Any]:
    """The CPU's bandwidth limit for the fused pass's own pattern, measured now, in GB/s by pattern.

    A C++ loop (benchmarks/stream_limit.cpp, g++ -O3 -march=native, loaded with ctypes) over ``numel`` float32
    masters and bf16 grads, on torch's intra-op thread count in contiguous slices, as the CPU kernel runs:
    ``read_both_write_both`` (a later micro-step: read 2 + 4 bytes, write both, 12 B/element) and
    ``read_grads_write_both`` (a window's first: read 2, write 4 + 2, 8 B/element), with no arithmetic worth the
    name. Unlike a copy, nothing the fused pass does can beat it. ``{"GBps": None, "why": ...}`` when the loop
    cannot be built here (no g++).
    """
    import ctypes
    import hashlib
    import shutil
    import tempfile

    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return {"GBps": None, "why": f"no C++ compiler ({compiler}) to build benchmarks/stream_limit.cpp"}
    source = Path(__file__).with_name("stream_limit.cpp")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    digest = hashlib.sha256((" ".join(command) + platform.node()).encode() + source.read_bytes()).hexdigest()[:16]
    build = Path(__file__).resolve().parents[1] / "build" / "bench"
    library = build / f"stream_limit-{digest}.so"
    if not library.exists():
        build.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=build) as tmp:
            out = Path(tmp) / library.name
            result = subprocess.run([*command, "-o", str(out), str(source)], capture_output=True, text=True)
            if result.returncode != 0:
                return {"GBps": None, "why": f"building stream_limit.cpp failed: {result.stderr[-500:]}"}
            os.replace(out, library)
    lib = ctypes.CDLL(str(library))
    lib.stream_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    # Constant values: drawing a billion random numbers took 25 s here, and the loop's speed does not depend on them.
    masters = torch.empty(numel).fill_(0.5)
    grads = torch.empty(numel, dtype=torch.bfloat16).fill_(0.25)
    threads = torch.get_num_threads()
    out: dict[str, float] = {}
    for name, pattern in LIMIT_PATTERNS.items():

        def call(pattern: int = pattern) -> None:
            lib.stream_pass(pattern, masters.data_ptr(), grads.data_ptr(), numel, threads)

        call()
        out[name] = LIMIT_BYTES[name] * numel / time_call(call, torch.device("cpu"), min_run_time)["median_s"] / 1e9
    return {"GBps": out, "threads": threads, "numel": numel, "method": "benchmarks/stream_limit.cpp"}


def limit_pattern(variant: str) -> str:
    """The same-pattern limit that bounds an accumulate variant ("first" does not read the masters)."""
    return "read_grads_write_both" if variant == "first" else "read_both_write_both"


# ------------------------------------------------------------------------------------------ metadata
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def metadata(device: torch.device) -> dict[str, Any]:
    """Machine and version facts recorded in every results file."""
    import fusedaccum
    from fusedaccum import backends

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from fusedaccum import _build_info

        build = {k: v for k, v in vars(_build_info).items() if k.isupper()}
    except ImportError:
        build = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "fusedaccum": fusedaccum.__version__,
        "fusedaccum_build": build,
        "backends": {name: backends.why_unavailable(name, device) or "available" for name in backends.BACKENDS},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_bytes"] = props.total_memory
        meta["gpu_sm_count"] = props.multi_processor_count
    return meta


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
