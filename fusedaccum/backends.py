"""Which kernel backends exist, which can run here, and which one serves a call.

Backends: ``"cpu"`` (C++ kernels in ``fusedaccum._C``), ``"cuda"`` (CUDA kernels in ``fusedaccum._C``),
``"triton"`` (``fusedaccum.tritonkernels``) and ``"reference"`` (plain PyTorch, always available).

Choice: an explicit ``backend=`` argument, else the ``FUSEDACCUM_BACKEND`` environment variable, else auto:
CPU tensors use ``cpu``; CUDA tensors use ``cuda`` if it was built, else ``triton``, else ``reference``.
A missing or stale ``_C`` never breaks ``import fusedaccum``: it warns once and its backends report why
they are unavailable.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
ENV_VARIABLE = "FUSEDACCUM_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot serve a call; the message says why for every backend."""


@functools.cache
def compiled_extension() -> tuple[ModuleType | None, str | None]:
    """``(fusedaccum._C, None)`` when the compiled kernels are loaded, else ``(None, why not)``."""
    try:
        from fusedaccum import _build_info
    except ImportError:
        return None, _warn("fusedaccum._C was never built (no _build_info): pip install --no-build-isolation .")
    if _build_info.TORCH_VERSION != torch.__version__:
        # Loading a binary built against another torch can crash instead of raising: refuse it up front.
        return None, _warn(
            f"fusedaccum._C was built for torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            "installed: rebuild with pip install --no-build-isolation ."
        )
    try:
        module = importlib.import_module("fusedaccum._C")
    except ImportError as error:
        return None, _warn(f"fusedaccum._C failed to load ({error}): rebuild with pip install --no-build-isolation .")
    return module, None


def _warn(reason: str) -> str:
    warnings.warn(f"{reason}; the cpu/cuda backends are unavailable", RuntimeWarning, stacklevel=3)
    return reason


@functools.cache
def triton_kernels() -> tuple[ModuleType | None, str | None]:
    """``(fusedaccum.tritonkernels, None)`` when triton imports, else ``(None, why not)``."""
    try:
        return importlib.import_module("fusedaccum.tritonkernels"), None
    except ImportError as error:
        return None, f"triton is not importable ({error})"


def triton_interpreted() -> bool:
    """Whether triton imported here runs its kernels under the interpreter (``TRITON_INTERPRET=1`` at its import)."""
    module, _ = triton_kernels()
    return module is not None and module.INTERPRETED


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on tensors of ``device`` here, else a one-line reason."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        module, reason = compiled_extension()
        if module is None:
            return reason
        if backend == "cuda" and not module.built_with_cuda:
            return "fusedaccum._C was built without CUDA kernels"
        if device.type != backend:
            return f"it runs {backend} tensors, these are on {device}"
        return None
    if backend == "triton":
        module, reason = triton_kernels()
        if module is None:
            return reason
        if device.type == "cpu" and not triton_interpreted():
            return "on CPU tensors triton runs only under its interpreter (TRITON_INTERPRET=1 before import)"
        if device.type not in ("cpu", "cuda"):
            return f"it runs CUDA tensors, these are on {device}"
        return None
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def describe(device: torch.device) -> str:
    """One line per backend: available on ``device``, or why not."""
    return "\n".join(f"  {name}: {why_unavailable(name, device) or 'available'}" for name in BACKENDS)


@functools.cache
def _auto_backend(device_type: str) -> str:
    """The fastest backend for the device type. Cached: it depends only on what imported, which is cached too
    (resolve() costs about 2 us on the 2-core AMD EPYC CI machine, most of it reading $FUSEDACCUM_BACKEND)."""
    order = ("cpu",) if device_type == "cpu" else ("cuda", "triton")
    # "reference" always serves: it ends every auto order.
    return next((name for name in order if why_unavailable(name, torch.device(device_type)) is None), "reference")


def check_name(backend: str | None, source: str | None = None) -> None:
    """Refuses a backend name that is not one of BACKENDS (None: the default, always fine)."""
    if backend is not None and backend not in BACKENDS:
        where = f" (from {source})" if source else ""
        raise ValueError(f"fusedaccum: unknown backend {backend!r}{where}; choose one of {BACKENDS}")


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend that serves a call on ``device``: explicit > $FUSEDACCUM_BACKEND > auto."""
    requested = backend or os.environ.get(ENV_VARIABLE) or None
    if requested is None:
        return _auto_backend(device.type)
    check_name(requested, "backend=" if backend else f"${ENV_VARIABLE}")
    reason = why_unavailable(requested, device)
    if reason is not None:
        raise BackendUnavailableError(
            f"fusedaccum: backend {requested!r} cannot serve tensors on {device}: {reason}.\n"
            f"Backends for {device} tensors:\n{describe(device)}"
        )
    return requested
