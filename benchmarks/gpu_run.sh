#!/usr/bin/env bash
# One command for a machine with a CUDA GPU, torch preinstalled and no network (fits in 10 minutes):
#   build fusedaccum in place with the CUDA kernels, run the whole test suite (CUDA and Triton tests included),
#   run the benchmarks. Results land in benchmarks/results/ (commit them); logs go to $OUT when it is set.
#
#   bash benchmarks/gpu_run.sh            # from anywhere; PYTHON=... to pick the interpreter (default python3)
#
# Budget (seconds, overridable): build BUILD_S, tests TEST_S; the benchmarks get what is left of TOTAL_S.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the GPU image has python3 (the one holding torch), maybe no plain python
TOTAL_S=${TOTAL_S:-570}
BUILD_S=${BUILD_S:-240}
TEST_S=${TEST_S:-180}
LOGS=${OUT:-benchmarks/results/logs}
mkdir -p "$LOGS" benchmarks/results
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

# The Triton interpreter is for GPU-less machines only: on a GPU it would turn the Triton tests and
# benchmarks into a CPU emulation.
unset TRITON_INTERPRET
export FUSEDACCUM_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || echo "warning: nvidia-smi failed (see $LOGS/nvidia-smi.txt)"

# Nothing can be installed there: say up front which of the Python packages the build, tests and benchmarks
# import are missing, rather than failing halfway.
"$PYTHON" - <<'PY'
import importlib.util
needed = ["torch", "triton", "numpy", "tqdm", "matplotlib", "pytest", "hypothesis", "setuptools", "ninja"]
missing = [name for name in needed if importlib.util.find_spec(name) is None]
print("preflight: all packages present" if not missing else f"preflight: MISSING {', '.join(missing)}")
PY

echo "== build (log: $LOGS/build.log)"
if ! timeout "$BUILD_S" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
        > "$LOGS/build.log" 2>&1; then
    echo "pip could not build in place; trying setup.py build_ext --inplace"
    timeout "$BUILD_S" "$PYTHON" setup.py build_ext --inplace >> "$LOGS/build.log" 2>&1 \
        || { tail -40 "$LOGS/build.log"; echo "build failed"; exit 1; }
    # Without the editable install, the in-place build is found through the source tree.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -m fusedaccum.info 2>&1 | tee "$LOGS/info.txt"
echo "build done at $(elapsed) s"

echo "== tests (log: $LOGS/pytest.log)"
timeout "$TEST_S" "$PYTHON" -m pytest -ra -q > "$LOGS/pytest.log" 2>&1
test_rc=$?
tail -25 "$LOGS/pytest.log"
echo "tests exited $test_rc at $(elapsed) s"

echo "== benchmarks (log: $LOGS/bench.log)"
left=$(( TOTAL_S - $(elapsed) ))
# Stop starting new cases 60 s before the end, so the numerics, the claims (about 2000 forward/backward passes
# of a 120K-parameter model: estimated ~10 s on a GPU), the JSON and the plots still get written; the JSON is
# also rewritten after every section, so a run cut short keeps what it measured.
timeout "$left" "$PYTHON" -m benchmarks --device cuda --time-budget $(( left > 120 ? left - 60 : 60 )) \
    2>&1 | tee "$LOGS/bench.log" | grep -v "it/s\|case/s\|s/case"
bench_rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*.json benchmarks/results/*.png "$OUT"/ 2>/dev/null || true
fi
echo "benchmarks exited $bench_rc; total $(elapsed) s"
exit $(( test_rc != 0 || bench_rc != 0 ))
