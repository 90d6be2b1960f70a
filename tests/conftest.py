"""Shared test setup.

Without a GPU, Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set before triton is
first imported, so it is set here, before torch (which may import triton) is imported.
"""

from __future__ import annotations

import os
import shutil

GPU_PRESENT = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None
if not GPU_PRESENT:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property-based test budgets: "ci" runs thousands of cases in CI; HYPOTHESIS_PROFILE=large for a long run.
settings.register_profile("ci", max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------ the CUDA kernel under CPU emulation
# Tests marked cuda_emulated run with the CPU kernel of fusedaccum::accumulate_kernel_ replaced by the CUDA
# kernel (csrc/cuda/accumulate_kernel.cu) compiled against the SIMT emulation in tests/simt/ (built with g++
# on first use, cached in build/simt/); see tests/simt/emulated.py.
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda_emulated: runs the CUDA kernel under the CPU emulation of tests/simt")


def load_emulation():
    """tests/simt/emulated.py as a module (the tests are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "fusedaccum_tests_simt_emulated"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "simt" / "emulated.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def emulation():
    """tests/simt/emulated.py, with its kernel built; the emulation's settings are restored afterwards."""
    from fusedaccum import backends

    module = load_emulation()
    reason = backends.why_unavailable("cpu", torch.device("cpu")) or module.why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    module.kernel().configure()
    yield module
    module.kernel().configure()


@pytest.fixture(autouse=True)
def _cuda_emulated(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("cuda_emulated") is None:
        yield
        return
    from fusedaccum import backends

    emulation = load_emulation()
    reason = backends.why_unavailable("cpu", torch.device("cpu")) or emulation.why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with emulation.override_cpu_kernel() as kernel:
        yield kernel
