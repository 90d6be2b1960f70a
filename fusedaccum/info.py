"""``python -m fusedaccum.info``: versions, what was built, which backends can run here and why not."""

from __future__ import annotations

import platform

import torch

import fusedaccum
from fusedaccum import backends


def report() -> str:
    lines = [
        f"fusedaccum {fusedaccum.__version__}",
        f"python     {platform.python_version()} ({platform.machine()})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
    ]
    triton_module, triton_reason = backends.triton_kernels()
    if triton_module is not None:
        import triton

        interp = " (interpreter: TRITON_INTERPRET=1)" if backends.triton_interpreted() else ""
        lines.append(f"triton     {triton.__version__}{interp}")
    else:
        lines.append(f"triton     not available: {triton_reason}")
    try:
        from fusedaccum import _build_info as build

        lines.append(
            f"built      backends {', '.join(build.COMPILED_BACKENDS)}; for torch {build.TORCH_VERSION} "
            f"(CUDA {build.TORCH_CUDA_VERSION or 'none'}); "
            f"CUDA toolkit {build.CUDA_TOOLKIT or '-'}; archs {build.CUDA_ARCH_LIST or '-'}"
        )
    except ImportError:
        lines.append("built      nothing: fusedaccum._C was never built")
    extension, reason = backends.compiled_extension()
    lines.append(f"_C         {'loaded' if extension is not None else 'unavailable: ' + str(reason)}")
    gpu = torch.cuda.is_available()
    lines.append(f"GPU        {torch.cuda.get_device_name(0) if gpu else 'none visible'}")
    for device in ["cpu"] + (["cuda"] if gpu else []):
        lines.append(f"backends for {device} tensors (auto picks {backends.resolve(None, torch.device(device))!r}):")
        lines.append(backends.describe(torch.device(device)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
