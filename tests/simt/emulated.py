"""The CUDA kernel run on the CPU: tests/simt/emulated_kernel.cpp (the real csrc/cuda/accumulate_kernel.cu under
the SIMT emulation of tests/simt/simt.h) built with g++ and loaded with ctypes, plus the host glue of
csrc/cuda/accumulate_cuda.cpp redone in Python for CPU tensors, with guard bytes around every buffer.

``override_cpu_kernel()`` makes it the CPU kernel of ``fusedaccum::accumulate_kernel_`` while active, so every
call through ``fusedaccum.ops`` with ``backend="cpu"`` (validation, backend choice, the custom op) runs the CUDA
code: the launch-table packing, workspace sizing, memset and launches of ``launch_accumulate``. Test-only.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SIMT = ROOT / "tests" / "simt"
KERNEL = ROOT / "csrc" / "cuda" / "accumulate_kernel.cu"
BUILD = ROOT / "build" / "simt"
SOURCES = [SIMT / "simt.h", SIMT / "emulated_kernel.cpp", SIMT / "include" / "cuda_runtime.h",
           SIMT / "include" / "cuda_runtime_api.h", KERNEL, ROOT / "csrc" / "cuda" / "accumulate_cuda.h",
           ROOT / "csrc" / "accumulate_math.h"]
# -fno-strict-aliasing: the kernel moves 16-byte packs through uint4 pointers, as CUDA code does; host C++'s
# aliasing rules would let g++ drop those stores.
FLAGS = ["-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-parentheses"]
GRAD_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
GUARD = 64  # bytes of guard on each side of every buffer


class TensorPair(ctypes.Structure):
    _fields_ = [("master", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("numel", ctypes.c_int64),
                ("grad_dtype", ctypes.c_int32)]


class AccumulateOptions(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("scale_ptr", ctypes.c_void_p), ("post_scale", ctypes.c_float),
                ("post_scale_ptr", ctypes.c_void_p), ("overwrite", ctypes.c_bool), ("zero_grads", ctypes.c_bool),
                ("found_inf", ctypes.c_void_p), ("sumsq", ctypes.c_void_p)]


# fusedaccum::cuda::WorkspaceAllocator::allocate: void* (int64_t bytes, void* context)
ALLOCATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)


class EmulationError(RuntimeError):
    """The emulation found a bug in the kernel (divergent barrier, bad shuffle mask, deadlock, ...)."""


def build(kernel_source: Path | None = None, defines: dict[str, str] | None = None,
          extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles the emulated kernel (cached by the content of its sources and flags); returns the .so."""
    kernel_source = Path(kernel_source or KERNEL).resolve()
    defines = dict(defines or {})
    defines["FUSEDACCUM_KERNEL_SOURCE"] = f'"{kernel_source}"'
    command = [os.environ.get("CXX", "g++"), *FLAGS, *extra_flags, f"-I{SIMT / 'include'}",
               *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    digest = hashlib.sha256(" ".join(command).encode())
    for path in [*SOURCES, kernel_source]:
        digest.update(path.read_bytes())
    target = BUILD / f"libsimt_accumulate-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    BUILD.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([*command, "-o", str(out), str(SIMT / "emulated_kernel.cpp"), "-lpthread"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernel failed:\n{result.stderr[-4000:]}")
        os.replace(out, target)  # atomic: concurrent builders never see half a file
    return target


class EmulatedKernel:
    """ctypes handle on one build of tests/simt/emulated_kernel.cpp."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.simt_last_error.restype = ctypes.c_char_p
        self.lib.simt_configure.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.fa_launch.argtypes = [ctypes.POINTER(TensorPair), ctypes.c_int64,
                                       ctypes.POINTER(AccumulateOptions), ALLOCATE, ctypes.c_void_p]
        self.lib.simt_selftest.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        self.configure()

    def configure(self, seed: int = 1, workers: int = 2, shuffle_threads: bool = True, driver_version: int = 13000,
                  compute_major: int = 9) -> None:
        self.lib.simt_configure(seed, workers, int(shuffle_threads), driver_version, compute_major)

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_int64 * 6)()
        self.lib.simt_stats(out)
        return dict(zip(["launches", "blocks", "memsets", "max_param_bytes", "max_grid", "threads"], out))

    def reset_stats(self) -> None:
        self.lib.simt_reset_stats()

    def error(self) -> str:
        return self.lib.simt_last_error().decode()

    def selftest(self, name: str, threads: int = 64) -> tuple[int, list[int]]:
        out = (ctypes.c_int * 128)()
        status = self.lib.simt_selftest(name.encode(), threads, out)
        return status, list(out)

    # ---------------------------------------------------------------- the op, as accumulate_cuda.cpp does it
    def accumulate(self, masters, grads, scale, scale_tensor, overwrite, post_scale, post_scale_tensor, zero_grads,
                   found_inf, sumsq) -> None:
        if len(masters) != len(grads):
            raise RuntimeError("fusedaccum: masters and grads differ in length")
        if not masters:
            return
        with GuardedBuffers() as guarded:
            pairs = (TensorPair * len(masters))()
            for i, (m, g) in enumerate(zip(masters, grads)):
                if not (m.dtype == torch.float32 and m.is_contiguous() and g.is_contiguous()
                        and m.numel() == g.numel()):
                    raise RuntimeError(f"fusedaccum: invalid tensor pair at index {i}")
                pairs[i] = TensorPair(guarded.stage(m), guarded.stage(g), m.numel(), GRAD_CODES[g.dtype])
            options = AccumulateOptions(
                float(torch.tensor(scale, dtype=torch.float32)), guarded.stage_optional(scale_tensor),
                float(torch.tensor(post_scale, dtype=torch.float32)), guarded.stage_optional(post_scale_tensor),
                bool(overwrite), bool(zero_grads), guarded.stage_optional(found_inf), guarded.stage_optional(sumsq))
            requests = []

            def allocate(nbytes, _context):
                # Uninitialised device memory: poisoned (the launcher must zero what it relies on).
                requests.append(nbytes)
                return guarded.scratch(nbytes)

            status = self.lib.fa_launch(pairs, len(masters), ctypes.byref(options), ALLOCATE(allocate), None)
            if status < 0:
                raise EmulationError(self.error())
            if status != 0:
                raise RuntimeError(f"fusedaccum: CUDA launch failed: cudaError {status}")
            if len(requests) > 1:
                raise EmulationError(f"the launcher asked for scratch {len(requests)} times in one call")


class GuardedBuffers:
    """Copies of tensors in fresh buffers with random guard bytes on both sides, at the same address modulo 16
    (the kernel picks its vector or scalar path from that); on exit checks every guard and copies the tensors
    back. An out-of-bounds write fails the test; an out-of-bounds read sees the guard pattern."""

    def __init__(self):
        self.staged: list[tuple[torch.Tensor | None, torch.Tensor, int, int, torch.Tensor]] = []

    def __enter__(self) -> GuardedBuffers:
        return self

    def _buffer(self, nbytes: int, alignment: int) -> tuple[torch.Tensor, int]:
        buffer = torch.randint(0, 256, (nbytes + 2 * GUARD + 16,), dtype=torch.uint8)
        offset = GUARD + (alignment - buffer.data_ptr() - GUARD) % 16
        return buffer, offset

    def stage(self, t: torch.Tensor) -> int:
        nbytes = t.numel() * t.element_size()
        buffer, offset = self._buffer(nbytes, t.data_ptr() % 16)
        if nbytes:
            buffer[offset:offset + nbytes] = t.detach().reshape(-1).view(torch.uint8)
        self.staged.append((t, buffer, offset, nbytes, buffer.clone()))
        return buffer.data_ptr() + offset

    def stage_optional(self, t: torch.Tensor | None) -> int | None:
        return None if t is None else self.stage(t)

    def scratch(self, nbytes: int) -> int:
        buffer, offset = self._buffer(nbytes, 0)
        buffer[offset:offset + nbytes] = 0xA5
        self.staged.append((None, buffer, offset, nbytes, buffer.clone()))
        return buffer.data_ptr() + offset

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            return
        for _, buffer, offset, nbytes, before in self.staged:
            end = offset + nbytes
            if not (torch.equal(buffer[:offset], before[:offset]) and torch.equal(buffer[end:], before[end:])):
                raise AssertionError(f"the kernel wrote outside a buffer of {nbytes} bytes (guard bytes changed)")
        for t, buffer, offset, nbytes, _ in self.staged:
            if t is not None and nbytes:
                t.detach().reshape(-1).view(torch.uint8).copy_(buffer[offset:offset + nbytes])


_kernel: EmulatedKernel | None = None


def kernel() -> EmulatedKernel:
    """The emulated kernel built from the tree's sources (FUSEDACCUM_EMULATED_KERNEL=path: from that copy)."""
    global _kernel
    if _kernel is None:
        _kernel = EmulatedKernel(build(os.environ.get("FUSEDACCUM_EMULATED_KERNEL") or None))
    return _kernel


def why_unavailable() -> str | None:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) to build the emulated CUDA kernel"
    return None


@contextlib.contextmanager
def override_cpu_kernel(emulated: EmulatedKernel | None = None):
    """While active, the CPU kernel of fusedaccum::accumulate_kernel_ is the emulated CUDA kernel."""
    emulated = emulated or kernel()
    library = torch.library.Library("fusedaccum", "IMPL")
    try:
        with _quiet_override():
            library.impl("accumulate_kernel_", emulated.accumulate, "CPU")
        yield emulated
    finally:
        library._destroy()


@contextlib.contextmanager
def _quiet_override():
    import warnings

    with warnings.catch_warnings():
        # The point of the override (torch 2.13 words it "... other operators may also be overridden").
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        yield
