"""The accumulation window: where it stands, what it weighs, and what the last one did.

``micro_step`` counts the micro-steps of the current window; the weights give the window's gradient
``sum(w_i g_i) / sum(w_i)`` (``reduction="mean"``) or the sum; ``stepped``, ``skipped_windows`` and
``grad_norm`` report the last window. The phase says what the wrapper is in the middle of, so that every call that
must not happen there is refused by name (as GradScaler's OptState does).
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any

import torch

_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# Distributed weighted windows add the ranks' raw sums of w * grad: weights are kept where those products stay normal.
_DISTRIBUTED_WEIGHT_MIN, _DISTRIBUTED_WEIGHT_MAX = 2.0**-40, 2.0**40


class Phase(enum.Enum):
    ACCUMULATING = "between micro-steps"
    # accumulate_in_backward: a backward's grads are in the masters, its step() has not counted it yet.
    BACKWARD_NOT_COUNTED = "after backward() but before acc.step()"
    # accumulate_in_backward, distributed: the last backward issues the masters' all-reduce; step() finishes it.
    REDUCING = "between a window's last backward and its step(), the all-reduce of the masters under way"


class Window:
    """The current window's position and weights, and the results of the last one."""

    def __init__(self, accumulation_steps: int | None, reduction: str, distributed: bool) -> None:
        self.accumulation_steps = accumulation_steps
        self.reduction = reduction
        self.distributed = distributed
        self.phase = Phase.ACCUMULATING
        self.micro_step = 0
        self.weight_sum = 0.0  # the true sum of this window's weights (float64)
        self.weight_ref = 1.0  # the window's reference weight: see weight_ref_for
        self.weighted: bool | None = None  # whether this window's micro-steps pass weight= (all or none)
        self.stepped = False
        self.skipped_windows = 0
        self.grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------- phase
    def enter(self, phase: Phase) -> None:
        self.phase = phase

    def refuse_uncounted(self, what: str) -> None:
        """Refuses ``what`` while a backward's grads are in the masters but not counted (nothing has changed)."""
        if self.phase is not Phase.ACCUMULATING:
            raise RuntimeError(
                f"fusedaccum: {what} was called after backward() but before acc.step(): with "
                "accumulate_in_backward=True that micro-batch's gradient is already in the masters but not yet "
                "counted as a micro-step. Call acc.step() first (nothing was changed)"
            )

    def refuse_reducing(self, what: str, undo: bool) -> None:
        """Refuses ``what`` while the window's reduction is under way: from its last backward until its step() the
        master buffers belong to the collectives in flight and to a layout the ranks agreed on."""
        if self.phase is Phase.REDUCING:
            advice = (
                "undo that change, call acc.step() to finish the window, then make it"
                if undo else "call acc.step() first (nothing was changed)"
            )
            raise RuntimeError(
                f"fusedaccum: {what} between a window's last backward and its step(), while the all-reduce of the "
                f"master buffers is under way (accumulate_in_backward with process_group/ddp_module); {advice}"
            )

    # ----------------------------------------------------------------------------------------- weights
    @property
    def is_last(self) -> bool:
        """Whether the next micro-step counted is the window's last (never known ahead in an open window)."""
        return self.accumulation_steps is not None and self.micro_step + 1 == self.accumulation_steps

    @staticmethod
    def check_weight(weight: float | torch.Tensor | None) -> float:
        if weight is None:
            return 1.0
        if isinstance(weight, torch.Tensor):
            if weight.numel() != 1 or weight.dtype == torch.bool or weight.is_complex():
                raise TypeError(f"fusedaccum: weight must be a number or a one-element tensor, got {weight!r}")
            value = float(weight.item())
        elif isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"fusedaccum: weight must be a positive number, got {weight!r}")
        else:
            value = float(weight)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"fusedaccum: weight must be finite and > 0, got {value}")
        # Weights scale float32 masters: one that is inf or 0 in float32 would poison the window unseen.
        if not _FLOAT32_TINY <= value <= _FLOAT32_MAX:
            raise ValueError(
                f"fusedaccum: weight {value} is outside float32's normal range [{_FLOAT32_TINY}, {_FLOAT32_MAX}]"
            )
        return value

    def check_weighting(self, weighted: bool) -> None:
        if self.micro_step > 0 and self.weighted is not None and self.weighted != weighted:
            raise ValueError(
                "fusedaccum: step(weight=...) must be given on every micro-step of a window or on none; this window "
                f"started {'with' if self.weighted else 'without'} weights"
            )

    def weight_ref_for(self, w: float, weighted: bool) -> float:
        """The window's reference weight: the masters accumulate (w_i / ref) g_i, so that weights anywhere in
        float32's normal range give float32 products that neither underflow nor overflow (1.2e-38 * g would be
        subnormal, 1e38 * g inf). A power of two, 2**floor(log2(w_1)) of the window's first weight: dividing by it
        is exact, and the update's bits are those of the unnormalised sum wherever that one neither under- nor
        overflows. 1 for unweighted windows, and distributed (the ranks' raw sums are added: they must share one
        unit, so the weights are limited instead). Raises before anything changes."""
        if self.micro_step > 0:
            ref = self.weight_ref
        elif not weighted or self.distributed:
            ref = 1.0
        else:
            ref = math.ldexp(1.0, math.frexp(w)[1] - 1)
        if self.distributed and weighted and not _DISTRIBUTED_WEIGHT_MIN <= w <= _DISTRIBUTED_WEIGHT_MAX:
            raise ValueError(
                f"fusedaccum: weight {w} is outside [2**-40, 2**40], which distributed windows accept (the ranks' "
                "weighted sums are added unnormalised, so w * grad must stay well inside float32's range); rescale "
                "the weights (only their ratios matter with reduction='mean')"
            )
        if not _FLOAT32_TINY <= w / ref <= _FLOAT32_MAX:
            raise ValueError(
                f"fusedaccum: weight {w} is more than float32's range apart from this window's first weight (about "
                f"{ref:g}); the weighted masters cannot hold both"
            )
        return ref

    def post_scale(self, pending: float = 0.0, ref: float | None = None) -> float:
        """What the window's masters are multiplied by at its end. ``pending``: the current micro-step's weight when
        it is not yet counted (hooks run before step()). The masters hold sum(w_i / ref * g_i): the mean is
        ref / sum(w_i) times that, the sum ref times it."""
        ref = self.weight_ref if ref is None else ref
        return ref / (self.weight_sum + pending) if self.reduction == "mean" else ref

    # --------------------------------------------------------------------------------------- transitions
    def count(self, w: float, weighted: bool, ref: float) -> None:
        """A micro-step is in the masters: count it."""
        self.stepped = False
        self.weighted = weighted
        self.weight_sum += w
        self.weight_ref = ref
        self.micro_step += 1
        self.phase = Phase.ACCUMULATING

    def reset(self) -> None:
        """A new window (after an update, a skip, a drop or a plain optimizer state dict)."""
        self.micro_step = 0
        self.weight_sum = 0.0
        self.weight_ref = 1.0
        self.weighted = None
        self.phase = Phase.ACCUMULATING

    def skipped(self) -> None:
        self.skipped_windows += 1
        self.stepped = False

    def judge(self, found: torch.Tensor, sumsq: torch.Tensor, max_grad_norm: float | None) -> tuple[
            torch.Tensor, bool, torch.Tensor | None]:
        """The end of a window's decision, with its one host sync: skip or step, and whether to clip.

        ``found`` is the window's inf/NaN flag and ``sumsq`` its squared 2-norm (both on the device, all ranks'
        agreed). Returns the flag with a non-finite norm counted (finite grads can still sum past float32's range;
        GradScaler must see that too), whether to skip, and the clipping coefficient when it is below 1. Records
        ``grad_norm`` (before clipping) for a window that steps.
        """
        norm = sumsq.sqrt()
        found = torch.maximum(found, (~torch.isfinite(sumsq)).to(found.dtype))
        coef = None
        if max_grad_norm is not None:  # clip_grad_norm_'s arithmetic, on the device: min(max_norm / (norm + 1e-6), 1)
            coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        host = (found if coef is None else torch.cat([found, coef])).tolist()
        if host[0] != 0.0:
            return found, True, None
        self.grad_norm = norm.reshape(())
        return found, False, coef if coef is not None and host[1] < 1.0 else None

    @staticmethod
    def no_grads_message(where: str) -> str:
        return (
            f"fusedaccum: the update is due ({where}) but no parameter received a gradient in the whole window; "
            "call loss.backward() before acc.step(). Refusing to apply an all-zero update (nothing was changed)"
        )

    # ------------------------------------------------------------------------------------ state dicts
    def saved(self) -> dict[str, Any]:
        return {
            "accumulation_steps": self.accumulation_steps,
            "reduction": self.reduction,
            "micro_step": self.micro_step,
            "weight_sum": self.weight_sum,
            "weight_ref": self.weight_ref,
            "weighted": self.weighted,
            "stepped": self.stepped,
            "skipped_windows": self.skipped_windows,
            "grad_norm": self.grad_norm,
        }

    def check_saved(self, saved: dict[str, Any]) -> None:
        """The window's fields of a saved entry (types already checked): ranges and consistency with each other
        and with this window's settings."""
        micro_step, steps, weight_sum, weighted = (
            saved["micro_step"], saved["accumulation_steps"], saved["weight_sum"], saved["weighted"]
        )

        def refuse(what: str) -> None:
            raise ValueError(f"fusedaccum: the state dict's 'fusedaccum' entry is inconsistent: {what}")

        if steps is not None and steps < 1:
            refuse(f"accumulation_steps={steps} (must be >= 1)")
        if micro_step < 0 or (steps is not None and micro_step >= steps):
            refuse(f"micro_step={micro_step} with accumulation_steps={steps} (0 <= micro_step < accumulation_steps)")
        if saved["reduction"] not in ("mean", "sum"):
            refuse(f"reduction={saved['reduction']!r}")
        if saved["skipped_windows"] < 0:
            refuse(f"skipped_windows={saved['skipped_windows']}")
        if not (math.isfinite(weight_sum) and weight_sum >= 0):
            refuse(f"weight_sum={weight_sum} (must be finite and >= 0)")
        if micro_step == 0 and weight_sum != 0:
            refuse(f"weight_sum={weight_sum} at micro_step 0")
        if micro_step > 0 and weighted is None:
            refuse(f"weighted=None at micro_step {micro_step}")
        if micro_step > 0 and weighted is False and weight_sum != micro_step:
            refuse(f"weight_sum={weight_sum} after {micro_step} unweighted micro-steps")
        if micro_step > 0 and weighted and weight_sum <= 0:
            refuse(f"weight_sum={weight_sum} after {micro_step} weighted micro-steps")
        ref = saved.get("weight_ref", 1.0)  # optional: absent from state dicts written before it existed
        if isinstance(ref, bool) or not isinstance(ref, (float, int)) or not (
            math.isfinite(ref) and ref > 0 and math.frexp(ref)[0] == 0.5
        ):
            refuse(f"weight_ref={ref!r} (must be a power of two)")
        if ref != 1.0 and not (micro_step > 0 and weighted):
            refuse(f"weight_ref={ref} outside a weighted window")
        norm = saved["grad_norm"]
        if norm is not None and (not norm.is_floating_point() or norm.numel() != 1):
            refuse(f"grad_norm must be a one-element float tensor, got {norm.dtype} of shape {tuple(norm.shape)}")
        if micro_step and (steps != self.accumulation_steps or saved["reduction"] != self.reduction):
            raise ValueError(
                f"fusedaccum: the state dict holds a half-finished window of accumulation_steps="
                f"{steps}, reduction={saved['reduction']!r}; this wrapper has "
                f"{self.accumulation_steps}, {self.reduction!r}. Load it at a window boundary or with equal settings"
            )

    def load(self, saved: dict[str, Any]) -> None:
        self.micro_step = int(saved["micro_step"])
        self.weight_sum = float(saved["weight_sum"])
        self.weight_ref = float(saved.get("weight_ref", 1.0))  # absent before it existed: unnormalised masters
        self.weighted = saved["weighted"]
        self.stepped = bool(saved["stepped"])
        self.skipped_windows = int(saved["skipped_windows"])
        norm = saved["grad_norm"]
        self.grad_norm = None if norm is None else norm.detach().clone()
        self.phase = Phase.ACCUMULATING
