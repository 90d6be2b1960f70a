"""Numerics: how far an accumulated gradient drifts from the exact large-batch gradient as N grows.

N micro-batch gradients ``g_i`` (bf16, as autograd produces them for bf16 parameters) are accumulated into the
mean ``(1/N) Σ g_i`` two ways:

* native bf16: ``grad += g_i / N`` in bf16 (``loss / N`` then ``backward()`` into a bf16 ``param.grad``);
* fp32 masters: ``fusedaccum.ops.accumulate_(m, g_i, scale=1/N)`` into a float32 master (overwrite on i = 0).

The reference is the same mean computed in float64 from the same bf16 ``g_i``, so only the accumulation's
rounding is measured. Each ``g_i`` is a fixed per-element signal plus unit noise (signal-to-noise 1 per
micro-batch), as for a real gradient: the running sum grows like i while each addend stays the same size,
which is what makes bf16's 8-bit significand swamp the late micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch

import fusedaccum

DEFAULT_NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact).norm() / exact.norm())


def run(device: torch.device, ns: list[int] | None = None, numel: int = 1 << 16, seed: int = 0) -> dict[str, Any]:
    """Relative error (L2, against float64) of native bf16 and of fp32-master accumulation for each N."""
    ns = ns or DEFAULT_NS
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    signal = torch.randn(numel, device=device, generator=generator)
    rows = []
    for n in ns:
        exact = torch.zeros(numel, dtype=torch.float64, device=device)
        native = torch.zeros(numel, dtype=torch.bfloat16, device=device)
        master = torch.empty(numel, dtype=torch.float32, device=device)
        for i in range(n):
            g = (signal + torch.randn(numel, device=device, generator=generator)).bfloat16()
            exact += g.double() / n
            # What autograd does with loss / N: the bf16 grad arrives already divided, then adds in bf16.
            native += g / n
            fusedaccum.ops.accumulate_([master], [g], 1.0 / n, overwrite=(i == 0), zero_grads=False)
        rows.append(
            {"N": n, "native_bf16": relative_error(native, exact), "fp32_master": relative_error(master, exact)}
        )
    return {
        "rows": rows,
        "numel": numel,
        "seed": seed,
        "grad_model": "g_i = signal + N(0,1) noise, signal ~ N(0,1) per element, cast to bf16",
        "metric": "||accumulated - exact||_2 / ||exact||_2, exact = float64 mean of the same bf16 g_i",
        "backend": fusedaccum.backends.resolve(None, device),
        "bf16_unit_roundoff": BF16_UNIT_ROUNDOFF,
        "fp32_unit_roundoff": FP32_UNIT_ROUNDOFF,
    }


def summary_table(section: dict[str, Any]) -> str:
    lines = [f"{'N':>5} {'native bf16':>12} {'fp32 master':>12} {'ratio':>8}"]
    for r in section["rows"]:
        ratio = r["native_bf16"] / r["fp32_master"] if r["fp32_master"] > 0 else float("inf")
        lines.append(f"{r['N']:>5} {r['native_bf16']:>12.2e} {r['fp32_master']:>12.2e} {ratio:>8.0f}")
    return "\n".join(lines)
