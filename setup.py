"""Build fusedaccum from source: ``pip install --no-build-isolation .`` (or ``-e .``).

One extension, ``fusedaccum._C``: the C++ CPU kernels always, the CUDA kernels whenever the installed torch
is a CUDA build and a CUDA toolkit is found (a visible GPU is not needed). Options, from the environment:

* ``FUSEDACCUM_BUILD_CUDA=auto|1|0`` (default auto). ``1`` stops at once if the CUDA kernels cannot be built.
* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit to use. Otherwise it is found from ``nvcc`` on PATH, through
  the ``_HERE_`` line of ``nvcc --dryrun`` (so a wrapper script named nvcc still leads to the real toolkit).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures; default: the visible GPUs, or without one ``DEFAULT_ARCH_LIST``
  (Ampere, Hopper, and PTX that any newer GPU compiles at load time), plus Blackwell's 10.0 and 12.0 when the
  toolkit can compile for them (CUDA >= 12.8: ``nvcc --list-gpu-code`` lists sm_100 and sm_120). The build
  prints the list it used and why.
* ``MAX_JOBS``: parallel compile jobs (honoured by torch's ninja build).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# The one place the version is written is fusedaccum/__init__.py (pyproject.toml reads it from there too).
VERSION = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "fusedaccum" / "__init__.py").read_text(), re.M).group(1)
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Added to the default when the toolkit compiles for Blackwell (sm_100: B200/GB200, sm_120: RTX 50xx / RTX PRO):
# native code there instead of a JIT compile of the 9.0 PTX at load time (which still serves every other newer GPU).
BLACKWELL_ARCHS = ("10.0", "12.0")


def say(message: str) -> None:
    print(f"fusedaccum setup: {message}", file=sys.stderr, flush=True)


def stop(message: str) -> None:
    sys.exit(f"fusedaccum setup: error: {message}")


try:
    import torch
except ImportError:
    stop("PyTorch is not installed: install torch first (pip install torch), then build with "
         "pip install --no-build-isolation .")


def toolkit_from_nvcc() -> Path | None:
    """The real toolkit behind ``nvcc`` on PATH, even when that nvcc is a wrapper script."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.cu")
        source.write_text("")
        try:
            run = subprocess.run([nvcc, "--dryrun", "-c", str(source)], capture_output=True, text=True,
                                 cwd=tmp, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (run.stdout + run.stderr).splitlines():
        # e.g. "#$ _HERE_=/usr/local/cuda-13.0/bin"
        if "_HERE_=" in line:
            bin_dir = Path(line.split("_HERE_=", 1)[1].strip())
            if (bin_dir / "nvcc").exists():
                return bin_dir.parent
    return Path(nvcc).resolve().parent.parent


def find_cuda_toolkit() -> tuple[Path | None, str]:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            return Path(value), f"${variable}"
    toolkit = toolkit_from_nvcc()
    return toolkit, "nvcc on PATH (its _HERE_ folder)"


def decide_cuda() -> tuple[bool, Path | None]:
    request = os.environ.get("FUSEDACCUM_BUILD_CUDA", "auto").strip().lower()
    if request not in ("auto", "1", "0"):
        stop(f"FUSEDACCUM_BUILD_CUDA must be auto, 1 or 0, not {request!r}")
    if request == "0":
        say("CUDA kernels not built (FUSEDACCUM_BUILD_CUDA=0)")
        return False, None
    if torch.version.cuda is None:
        if request == "1":
            stop(f"FUSEDACCUM_BUILD_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build")
        say(f"CUDA kernels skipped: torch {torch.__version__} is a CPU-only build")
        return False, None
    toolkit, source = find_cuda_toolkit()
    if toolkit is None or not (toolkit / "bin" / "nvcc").exists():
        if request == "1":
            stop("FUSEDACCUM_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
        say("CUDA kernels skipped: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        return False, None
    if not (toolkit / "include" / "cuda_runtime_api.h").exists():
        stop(f"the CUDA toolkit at {toolkit} (from {source}) has no include/cuda_runtime_api.h")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ["CUDA_HOME"] = str(toolkit)
    say(f"CUDA toolkit: {toolkit} (from {source})")
    return True, toolkit


def openmp_flags() -> list[str]:
    # at::parallel_for expands to OpenMP pragmas in its header: without -fopenmp the CPU kernel runs on one
    # thread. Only when torch itself uses OpenMP (not on macOS builds with the native thread pool).
    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin" else []


def default_arch_list(toolkit: Path) -> tuple[str, str]:
    """The arch list for a build without a visible GPU, and why: Blackwell is added when this toolkit's nvcc can
    compile for it (``--list-gpu-code``; an nvcc too old to have that option predates Blackwell too)."""
    try:
        run = subprocess.run([str(toolkit / "bin" / "nvcc"), "--list-gpu-code"], capture_output=True, text=True,
                             timeout=60)
        codes = set(run.stdout.split()) if run.returncode == 0 else set()
    except (OSError, subprocess.SubprocessError):
        codes = set()
    wanted = {"sm_" + arch.replace(".", "") for arch in BLACKWELL_ARCHS}
    if wanted <= codes:
        return (";".join([DEFAULT_ARCH_LIST, *BLACKWELL_ARCHS]),
                f"default; {' and '.join(sorted(wanted))} included: nvcc --list-gpu-code lists them")
    return DEFAULT_ARCH_LIST, (f"default; Blackwell ({', '.join(BLACKWELL_ARCHS)}) left out: this nvcc cannot compile "
                               "for it (CUDA 12.8 or newer can)")


def write_build_info(with_cuda: bool, toolkit: Path | None, arch_list: str | None) -> None:
    backends = ["cpu", "cuda"] if with_cuda else ["cpu"]
    text = (
        "# Written by setup.py at build time: what fusedaccum._C was built with.\n"
        f"FUSEDACCUM_VERSION = {VERSION!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"CUDA_TOOLKIT = {str(toolkit) if toolkit else None!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"COMPILED_BACKENDS = {tuple(backends)!r}\n"
    )
    path = ROOT / "fusedaccum" / "_build_info.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def extensions() -> list:
    with_cuda, toolkit = decide_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # No -std flag: torch's cpp_extension passes the standard the installed torch needs (C++20 from 2.13 on).
    cxx_flags = ["-O3", *openmp_flags()]
    sources = ["csrc/ops.cpp", "csrc/cpu/accumulate_cpu.cpp"]
    arch_list = None
    if not with_cuda:
        write_build_info(False, None, None)
        return [CppExtension("fusedaccum._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=openmp_flags())]
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        why = "from TORCH_CUDA_ARCH_LIST"
    elif torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in caps)
        why = "the visible GPUs"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"], why = default_arch_list(toolkit)
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    say(f"CUDA architectures: {arch_list} ({why})")
    write_build_info(True, toolkit, arch_list)
    return [
        CUDAExtension(
            "fusedaccum._C",
            [*sources, "csrc/cuda/accumulate_cuda.cpp", "csrc/cuda/accumulate_kernel.cu"],
            define_macros=[("FUSEDACCUM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=openmp_flags(),
        )
    ]


def main() -> None:
    ext_modules = extensions()  # first: it sets CUDA_HOME, which cpp_extension reads when imported
    from torch.utils.cpp_extension import BuildExtension

    # Name, version, dependencies, extras and packages: pyproject.toml ([project], [tool.setuptools]).
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    )


if __name__ == "__main__":
    main()
