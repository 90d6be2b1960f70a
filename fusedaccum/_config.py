"""The GradAccumulator constructor's options, checked once and frozen."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from . import backends
from .distributed import check_ddp_params_covered, check_fsdp_module, resolve_process_group

# Default all-reduce bucket size, DDP's default: large enough that per-collective latency is amortised, small enough
# that several buckets of a large model are in flight at once.
DEFAULT_BUCKET_CAP_MB = 25.0


@dataclass(frozen=True)
class Config:
    accumulation_steps: int | None  # None: the window is everything between two step() calls
    reduction: str
    master_weights: bool
    max_grad_norm: float | None
    backend: str | None
    accumulate_in_backward: bool
    distributed: bool
    group: Any  # None with distributed=True means torch.distributed's default group
    fsdp: bool
    bucket_elements: int  # float32 elements per all-reduce bucket (at least one, so a tiny cap still progresses)

    @classmethod
    def checked(
        cls, optimizer: Any, accumulation_steps: Any, *, reduction: Any, master_weights: Any, max_grad_norm: Any,
        backend: Any, scaler: Any, process_group: Any, ddp_module: Any, bucket_cap_mb: Any,
        accumulate_in_backward: Any, fsdp_module: Any, wrapper_type: type,
    ) -> Config:
        """The options, or a TypeError/ValueError naming the first bad one (nothing is created)."""
        if isinstance(optimizer, wrapper_type):
            raise TypeError(
                "fusedaccum: GradAccumulator cannot wrap another GradAccumulator (the gradients would be divided "
                "twice); wrap the inner optimizer once, with the product of the two accumulation_steps"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"fusedaccum: GradAccumulator wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("fusedaccum: LBFGS re-evaluates the loss inside step(), which accumulation cannot serve")
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise TypeError("fusedaccum: SparseAdam needs sparse gradients; GradAccumulator keeps dense fp32 masters")
        if accumulation_steps is not None and (
            isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
        ):
            raise TypeError(f"fusedaccum: accumulation_steps must be an int or None, got {accumulation_steps!r}")
        if accumulation_steps is not None and accumulation_steps < 1:
            raise ValueError(f"fusedaccum: accumulation_steps must be >= 1, got {accumulation_steps}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"fusedaccum: reduction must be 'mean' or 'sum', got {reduction!r}")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
                raise TypeError(f"fusedaccum: max_grad_norm must be a number or None, got {max_grad_norm!r}")
            if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
                raise ValueError(f"fusedaccum: max_grad_norm must be finite and > 0, got {max_grad_norm}")
        backends.check_name(backend)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"fusedaccum: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real):
            raise TypeError(f"fusedaccum: bucket_cap_mb must be a number, got {bucket_cap_mb!r}")
        if not (math.isfinite(bucket_cap_mb) and bucket_cap_mb > 0):
            raise ValueError(f"fusedaccum: bucket_cap_mb must be finite and > 0, got {bucket_cap_mb}")
        for name, flag in (("master_weights", master_weights), ("accumulate_in_backward", accumulate_in_backward)):
            if not isinstance(flag, bool):  # a truthy "no" must not mean True
                raise TypeError(f"fusedaccum: {name} must be a bool, got {flag!r}")
        if fsdp_module is not None:
            check_fsdp_module(fsdp_module, process_group, ddp_module, master_weights)
        distributed, group = resolve_process_group(process_group, ddp_module)
        return cls(
            accumulation_steps=None if accumulation_steps is None else int(accumulation_steps),
            reduction=reduction, master_weights=master_weights,
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm), backend=backend,
            # An open window (accumulation_steps=None) always accumulates during backward: step() ends it.
            accumulate_in_backward=accumulate_in_backward or accumulation_steps is None,
            distributed=distributed, group=group,
            fsdp=fsdp_module is not None, bucket_elements=max(1, int(bucket_cap_mb * 2**20) // 4),
        )

    def attached(self, ddp_module: Any, optimizer: torch.optim.Optimizer) -> Config:
        """This config with a ``DistributedDataParallel`` module attached after construction
        (``GradAccumulator.attach``), or an error naming why it cannot be."""
        if self.distributed or self.fsdp:
            raise RuntimeError("fusedaccum: attach(): this wrapper already reduces across processes")
        distributed, group = resolve_process_group(None, ddp_module)
        check_ddp_params_covered(ddp_module, optimizer)
        return dataclasses.replace(self, distributed=distributed, group=group)
