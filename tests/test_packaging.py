"""Packaging: one version everywhere, the declared torch range covers the torches the Makefile builds against,
and setup.py's default CUDA arch list adds Blackwell exactly when the toolkit's nvcc can compile for it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import fusedaccum

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    """setup.py as a module: importing it defines its helpers; only running it as __main__ builds."""
    spec = importlib.util.spec_from_file_location("fusedaccum_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _makefile_var(name: str) -> str:
    return re.search(rf"^{name} \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_one_version_everywhere() -> None:
    from fusedaccum import _build_info

    assert importlib.metadata.version("fusedaccum") == fusedaccum.__version__
    assert _build_info.FUSEDACCUM_VERSION == fusedaccum.__version__
    assert _setup_module().VERSION == fusedaccum.__version__
    # pyproject.toml does not write it a second time: it reads fusedaccum.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "fusedaccum.__version__"' in pyproject
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M)


def test_declared_torch_range_covers_the_tested_torches() -> None:
    requires = [Requirement(r) for r in importlib.metadata.requires("fusedaccum")]
    torch_req = next(r for r in requires if r.name == "torch" and r.marker is None)
    for variable in ("TORCH_VERSION", "CPU_TORCH_VERSION", "OLDEST_TORCH_VERSION"):
        assert torch_req.specifier.contains(_makefile_var(variable)), (variable, str(torch_req))
    assert not torch_req.specifier.contains("2.10.0") and not torch_req.specifier.contains("2.15.0")
    extras = {r.name: r for r in requires if r.marker is not None and r.marker.evaluate({"extra": "triton"})}
    assert extras["triton"].specifier.contains("3.6.0"), "the oldest triton (make check-oldest-torch) is supported"
    declared = set(importlib.metadata.metadata("fusedaccum").get_all("Provides-Extra"))
    assert {"triton", "test", "bench", "integrations"} <= declared
    assert importlib.metadata.metadata("fusedaccum")["License-Expression"] == "BSD-3-Clause"


@pytest.mark.parametrize(
    ("listed", "expected"),
    [
        ("sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_103 sm_120 sm_121", "8.0;9.0+PTX;10.0;12.0"),  # CUDA 13.0
        ("sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_89 sm_90", "8.0;9.0+PTX"),  # CUDA 12.4: no Blackwell
        ("sm_80 sm_90 sm_100", "8.0;9.0+PTX"),  # only half of it: not claimed
        (None, "8.0;9.0+PTX"),  # an nvcc that fails (or lacks --list-gpu-code)
    ],
)
def test_default_arch_list_follows_the_toolkit(listed: str | None, expected: str, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    body = f"printf '%s\\n' {listed}" if listed is not None else "echo 'nvcc fatal: Unknown option' >&2; exit 1"
    nvcc.write_text(f'#!/bin/sh\n[ "$1" = --list-gpu-code ] || exit 2\n{body}\n')
    nvcc.chmod(0o755)
    arch_list, why = _setup_module().default_arch_list(tmp_path)
    assert arch_list == expected
    assert ("included" in why) == ("10.0" in expected)


def test_default_arch_list_of_this_toolkit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real toolkit, when there is one: torch turns the default list into nvcc flags (it knows every
    entry), and Blackwell code is in them exactly when this nvcc lists sm_100 and sm_120."""
    setup = _setup_module()
    toolkit, _ = setup.find_cuda_toolkit()
    if toolkit is None or not (toolkit / "bin" / "nvcc").exists():
        pytest.skip("no CUDA toolkit here")
    from torch.utils import cpp_extension

    arch_list, why = setup.default_arch_list(toolkit)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_90,code=compute_90" in flags, flags  # the PTX every newer GPU can JIT
    listed = subprocess.run([str(toolkit / "bin" / "nvcc"), "--list-gpu-code"], capture_output=True, text=True)
    blackwell = {"sm_100", "sm_120"} <= set(listed.stdout.split())
    for sm in ("100", "120"):
        assert (f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags) == blackwell, (why, flags)
