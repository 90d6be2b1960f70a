"""make check-cuda-emulated: the CUDA kernel under the SIMT emulation with sanitizers, and a mutation check.

1. ThreadSanitizer: tests/simt/driver.cpp + the emulated kernel built with -fsanitize=thread, 64 threads per block
   (FUSEDACCUM_THREADS_PER_BLOCK=64: every emulated thread is a TSan fiber, and TSan tracks a limited number of
   threads; 2-3 workers x 64 stay well within it), the --quick matrix. No suppressions: every report fails.
2. AddressSanitizer + UndefinedBehaviorSanitizer: the same driver at the real 512 threads per block, --quick,
   guard bytes poisoned so out-of-bounds reads are reported too.
3. Mutation check: classic bugs injected into a COPY of csrc/cuda/accumulate_kernel.cu; each must make the
   emulated suite fail. First the plain driver; a mutant it misses must be caught by the TSan driver (up to
   three runs: TSan sees only the interleavings that happen). With
   --pytest, the plain mutants also run the emulated pytest cases (test_cuda_emulated.py, test_ops.py -k
   cuda-emulated) and the first failing test is reported. The unmutated copy must pass the same way.

Exit status 0 only if the sanitizer runs are clean and every mutant is caught. Needs g++ (and, with --pytest,
the project's venv with fusedaccum built).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIMT = ROOT / "tests" / "simt"
BUILD = ROOT / "build" / "simt"
CXX = os.environ.get("CXX", "g++")
COMMON = ["-std=c++17", "-g", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-Wno-parentheses",
          "-Wno-tsan", f"-I{SIMT / 'include'}"]
VARIANTS = {
    "plain": ["-O1"],
    "tsan": ["-O1", "-fsanitize=thread", "-DFUSEDACCUM_THREADS_PER_BLOCK=64"],
    "asan+ubsan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}
RUN_ARGS = {"plain": [], "tsan": ["--quick"], "asan+ubsan": ["--quick"]}
ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66", "ASAN_OPTIONS": "detect_leaks=0",
       "UBSAN_OPTIONS": "print_stacktrace=1"}

# (name, text in the kernel, replacement). Each text must occur exactly once, so a mutant never silently
# becomes the original kernel.
MUTANTS = [
    ("drop the __syncthreads between the warp sums' write and read (block_sum)",
     "  if (lane == 0) shared[warp] = value;\n  __syncthreads();\n",
     "  if (lane == 0) shared[warp] = value;\n"),
    ("drop the __syncthreads before reading is_last_block",
     "    is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;\n  }\n  __syncthreads();\n",
     "    is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;\n  }\n"),
    ("drop the __threadfence that publishes a block's partial",
     "    __threadfence();  // publish the partial before counting this block as done\n",
     ""),
    ("drop the __threadfence before the last block reads the partials",
     "  if (!is_last_block) return;\n  __threadfence();\n",
     "  if (!is_last_block) return;\n"),
    ("off-by-one in the tensor-per-launch limit",
     "if (tensors == Table::kMaxTensors) flush();",
     "if (tensors == Table::kMaxTensors + 1) flush();"),
    ("vector-loop overrun (<= instead of <)",
     "i < vec_end; i += int64_t(blockDim.x) * kVec) {\n      const Pack<G> g = load_pack(grad + i);",
     "i <= vec_end; i += int64_t(blockDim.x) * kVec) {\n      const Pack<G> g = load_pack(grad + i);"),
    ("half-warp shuffle tree (offsets from 8)",
     "  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);\n"
     "  const int warp",
     "  for (int offset = 8; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);\n"
     "  const int warp"),
    ("shuffle mask naming half the warp",
     "  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);\n"
     "  const int warp",
     "  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0x0000ffffu, value, offset);\n"
     "  const int warp"),
    ("skip zeroing the grads in the vector path",
     "      if (zero_grads) store_pack(grad + i, Pack<G>{});\n",
     ""),
]


def kernel_copy(directory: Path, mutation: tuple[str, str] | None) -> Path:
    """csrc's kernel, its headers and maths header copied under `directory`, optionally mutated."""
    (directory / "csrc" / "cuda").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "accumulate_math.h", directory / "csrc")
    shutil.copy(ROOT / "csrc" / "cuda" / "accumulate_cuda.h", directory / "csrc" / "cuda")
    source = (ROOT / "csrc" / "cuda" / "accumulate_kernel.cu").read_text()
    if mutation is not None:
        text, replacement = mutation
        if source.count(text) != 1:
            raise SystemExit(f"mutation target found {source.count(text)} times in the kernel:\n{text}")
        source = source.replace(text, replacement)
    kernel = directory / "csrc" / "cuda" / "accumulate_kernel.cu"
    kernel.write_text(source)
    return kernel


def build_driver(variant: str, output: Path, kernel: Path | None = None) -> None:
    defines = [f'-DFUSEDACCUM_KERNEL_SOURCE="{kernel}"'] if kernel else []
    command = [CXX, *COMMON, *VARIANTS[variant], *defines, "-o", str(output), str(SIMT / "emulated_kernel.cpp"),
               str(SIMT / "driver.cpp"), "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"building the {variant} driver failed:\n{result.stderr[-4000:]}")


def run_driver(variant: str, binary: Path) -> tuple[int, str]:
    env = {**os.environ, **ENV}
    result = subprocess.run([str(binary), *RUN_ARGS[variant]], capture_output=True, text=True, env=env)
    return result.returncode, result.stdout + result.stderr


def first_finding(output: str, status: int = 0) -> str:
    if status < 0:
        return f"crashed (signal {-status})"
    for marker in ("EMULATION ERROR", "WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error", "FAIL "):
        for line in output.splitlines():
            if marker in line:
                if marker == "WARNING: ThreadSanitizer":
                    lines = output.splitlines()
                    i = lines.index(line)
                    where = next((x.strip() for x in lines[i + 1:i + 4] if "accumulate_kernel" in x), "")
                    return f"{line.strip()} {where}"
                return line.strip()[:300]
    return output.strip().splitlines()[-1][:300] if output.strip() else "(no output)"


def pytest_finding(kernel: Path) -> tuple[int, str]:
    env = {**os.environ, "FUSEDACCUM_EMULATED_KERNEL": str(kernel)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_cuda_emulated.py",
               "tests/test_ops.py", "-k", "cuda-emulated or cuda_emulated or emulat"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if result.returncode < 0:
        return result.returncode, f"pytest crashed (signal {-result.returncode})"
    return result.returncode, (failed[0][:300] if failed else result.stdout.strip().splitlines()[-1][:200])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pytest", action="store_true", help="also run the emulated pytest cases on each mutant")
    parser.add_argument("--skip-sanitizers", action="store_true")
    args = parser.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    problems = []

    if not args.skip_sanitizers:
        for variant in ("tsan", "asan+ubsan"):
            start = time.time()
            binary = BUILD / f"driver-{variant.replace('+', '-')}"
            build_driver(variant, binary)
            status, output = run_driver(variant, binary)
            summary = output.strip().splitlines()[-1] if output.strip() else ""
            print(f"[{variant}] exit {status} in {time.time() - start:.0f} s: {summary}", flush=True)
            if status != 0:
                print(output[-6000:])
                problems.append(f"{variant}: {first_finding(output)}")

    with tempfile.TemporaryDirectory(prefix="fusedaccum-mutants-") as tmp:
        tmp = Path(tmp)
        # The unmutated copy must pass, or the mutants prove nothing.
        kernel = kernel_copy(tmp / "original", None)
        build_driver("plain", tmp / "original" / "driver", kernel)
        status, output = run_driver("plain", tmp / "original" / "driver")
        print(f"[mutation] unmutated copy: exit {status}", flush=True)
        if status != 0:
            problems.append(f"the unmutated copy fails: {first_finding(output)}")
        for index, (name, text, replacement) in enumerate(MUTANTS):
            start = time.time()
            directory = tmp / f"mutant{index}"
            kernel = kernel_copy(directory, (text, replacement))
            caught = []
            for variant in ("plain", "tsan"):
                binary = directory / f"driver-{variant}"
                build_driver(variant, binary, kernel)
                # TSan sees a race only in the interleavings that happen (widened by the emulation's sleeps
                # before atomics); a mutant gets up to three runs there.
                for attempt in range(1 if variant == "plain" else 3):
                    status, output = run_driver(variant, binary)
                    if status != 0:
                        caught.append(f"{variant} driver (exit {status}, run {attempt + 1}): "
                                      f"{first_finding(output, status)}")
                        break
                if caught:
                    break
            if args.pytest and not caught or args.pytest and caught[0].startswith("plain"):
                status, finding = pytest_finding(kernel)
                if status != 0:
                    caught.append(f"pytest: {finding}")
            verdict = "CAUGHT" if caught else "MISSED"
            print(f"[mutation] {verdict} in {time.time() - start:.0f} s: {name}", flush=True)
            for line in caught:
                print(f"    by {line}")
            if not caught:
                problems.append(f"mutant not caught: {name}")

    if problems:
        print("check-cuda-emulated FAILED:\n  " + "\n  ".join(problems))
        return 1
    sanitizers = "sanitizers skipped" if args.skip_sanitizers else "TSan and ASan+UBSan clean"
    print(f"check-cuda-emulated passed: {sanitizers}, every mutant caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
