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
