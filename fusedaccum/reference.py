"""Plain-PyTorch implementations of the fusedaccum ops.

One implementation serves three roles:

* the ``"reference"`` backend (the fallback when no kernel can run),
* the test oracle: run on float64 copies of the inputs it gives the exact answer the kernels are checked
  against,
* the benchmark baseline: :func:`accumulate_foreach_` and :func:`accumulate_loop_` are the two native
  formulations of one accumulation micro-step (``torch._foreach_*`` and a per-tensor loop).

Every function here takes already validated arguments (``fusedaccum.ops`` validates once for all backends).
The maths is the one documented in :func:`fusedaccum.ops.accumulate_`. Scales are applied in the masters'
precision, so float32 masters see ``float32(scale)``, exactly as the kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Scale = float | int | torch.Tensor  # a number or a one-element float32 tensor


def _scale_of(scale: Scale, dtype: torch.dtype) -> Scale:
    # A device scale stays on the device (no host sync); it is cast to the masters' dtype so the product
    # is formed in the masters' precision, like the kernels do.
    return scale.to(dtype).reshape(()) if isinstance(scale, torch.Tensor) else scale


def _mark_nonfinite(grads: Sequence[torch.Tensor], found_inf: torch.Tensor) -> None:
    # One flag for the whole list, set on the device (no host sync). Never reset here.
    if grads:
        any_nonfinite = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
        found_inf.masked_fill_(any_nonfinite, 1.0)


def _add_sumsq(masters: Sequence[torch.Tensor], sumsq: torch.Tensor) -> None:
    if masters:
        total = torch.stack([torch.sum(m * m, dtype=m.dtype) for m in masters])
        sumsq.add_(total.sum().to(sumsq.dtype))


def accumulate_loop_(
    masters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: Scale = 1.0,
    *,
    overwrite: bool = False,
    post_scale: Scale = 1.0,
    zero_grads: bool = True,
    found_inf: torch.Tensor | None = None,
    sumsq: torch.Tensor | None = None,
) -> None:
    """One accumulation micro-step, one tensor at a time: what a hand-written training loop does."""
    if found_inf is not None:
        _mark_nonfinite(grads, found_inf)
    for master, grad in zip(masters, grads):
        s = _scale_of(scale, master.dtype)
        ps = _scale_of(post_scale, master.dtype)
        if overwrite:
            torch.mul(grad.to(master.dtype), s, out=master)
        elif isinstance(s, torch.Tensor):
            master.addcmul_(grad, s)
        else:
            master.add_(grad, alpha=s)
        if isinstance(ps, torch.Tensor) or ps != 1.0:
            master.mul_(ps)
        if zero_grads:
            grad.zero_()
    if sumsq is not None:
        _add_sumsq(masters, sumsq)


def accumulate_foreach_(
    masters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: Scale = 1.0,
    *,
    overwrite: bool = False,
    post_scale: Scale = 1.0,
    zero_grads: bool = True,
    found_inf: torch.Tensor | None = None,
    sumsq: torch.Tensor | None = None,
) -> None:
    """One accumulation micro-step with ``torch._foreach_*`` ops: the fastest native formulation.

    This is the ``"reference"`` backend. ``torch._foreach_*`` takes its multi-tensor fast path only when
    the lists share a dtype, so mixed bf16/fp32 lists run per tensor inside PyTorch (still exact).
    """
    masters = list(masters)
    grads = list(grads)
    if not masters:
        return
    nonempty_grads = [g for g in grads if g.numel() > 0]
    if found_inf is not None and nonempty_grads:
        # One fused native pass over the grads: max |g| per tensor (inf/nan propagate through max).
        norms = torch._foreach_norm(nonempty_grads, float("inf"))
        found_inf.masked_fill_(~torch.isfinite(torch.stack(norms)).all(), 1.0)
    dtype = masters[0].dtype
    s = _scale_of(scale, dtype)
    ps = _scale_of(post_scale, dtype)
    if overwrite:
        torch._foreach_copy_(masters, grads)
        torch._foreach_mul_(masters, s)
    elif isinstance(s, torch.Tensor):
        torch._foreach_add_(masters, torch._foreach_mul([g.to(dtype) for g in grads], s))
    else:
        torch._foreach_add_(masters, grads, alpha=s)
    if isinstance(ps, torch.Tensor) or ps != 1.0:
        torch._foreach_mul_(masters, ps)
    if zero_grads:
        torch._foreach_zero_(grads)
    if sumsq is not None:
        norms = torch._foreach_norm(masters, 2)
        sumsq.add_(torch.stack(norms).square().sum().to(sumsq.dtype))


accumulate_ = accumulate_foreach_


def copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """Cast-copy ``srcs[i]`` into ``dsts[i]`` for every i.

    ``torch._foreach_copy_`` is already one multi-tensor launch on CUDA when all sources share one dtype and
    all destinations share one dtype (ATen ``ForeachBinaryOpList.cu``, ``foreach_tensor_copy_list_kernel_cuda_``:
    the fast path checks device, per-list dtype and sizes/strides, and casts inside the kernel), on every
    torch from 2.1 on. So every backend uses it, grouped by dtype pair: one launch per group.
    """
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for dst, src in zip(dsts, srcs):
        d, s = groups.setdefault((dst.dtype, src.dtype), ([], []))
        d.append(dst)
        s.append(src)
    for d, s in groups.values():
        torch._foreach_copy_(d, s)
