"""The default accumulation mode: ``step()`` reads every ``.grad`` into the masters in one fused pass per device.

Its counterpart, ``accumulate_in_backward=True``, is :class:`fusedaccum._hooks.BackwardHooks`; both offer the same
verbs, so the facade picks one in its constructor and never asks which it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._amp import ScalerLink
from ._master_grads import Entry, MasterGrads
from ._window import Window
from .distributed import LocalReduction


class AtStep:
    """Accumulation at step(): the grads wait in ``.grad`` until the micro-step is counted."""

    in_backward = False
    open_window = False  # the window has accumulation_steps micro-steps

    def __init__(self) -> None:
        self.held_back: dict[int, torch.Tensor] = {}  # the hooks' late grads held back; never any here

    def refuse_weight(self, weight: Any) -> None:
        """Weights are known at step(), before the grads are added: any is fine."""

    @staticmethod
    def ends_window(window: Window, grads: list[tuple[Entry, torch.Tensor]]) -> bool:
        """Whether this step() ends the window: its last micro-step."""
        return window.is_last

    def register(self, params: list[torch.Tensor], callback: Callable[[torch.Tensor], None]) -> None:
        """No hooks in this mode."""

    def reset(self) -> None:
        """Nothing of a window is kept here."""

    def micro_step(
        self, grads: list[tuple[Entry, torch.Tensor]], w: float, ref: float, masters: MasterGrads, window: Window,
        scaler: ScalerLink, reduction: LocalReduction, groups: list[dict[str, Any]], weighted: bool,
    ) -> None:
        """This micro-step's grads into the masters (weight ``w``, the window's reference weight ``ref``); on the
        window's last one, in the same pass, the 1/W and the norm (unless the reduction applies them later). The
        grads are consumed: set to None, so the next backward writes fresh ones, with no zeroing pass."""
        local_last = window.is_last and reduction.scales_locally
        post_scale = window.post_scale(w, ref)  # w is not counted yet
        if local_last:
            masters.zero_sumsq()  # scratch for this pass: a refused call below leaves nothing that matters
        masters.accumulate_(groups, grads, scaler.scale(w / ref), post_scale if local_last else 1.0, local_last)
        for entry, _ in grads:
            entry.param.grad = None
        if local_last:
            # Params that got a grad earlier in the window but not now still need the 1/W and the norm.
            now = {id(entry) for entry, _ in grads}
            masters.scale_only_([e for e in masters.touched_entries() if id(e) not in now], post_scale)
        window.count(w, weighted, ref)
