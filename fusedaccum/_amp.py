"""The link to a ``torch.amp.GradScaler``: the only code that touches GradScaler's private state.

The wrapper unscales inside its fused pass with the scaler's inverse scale read on the device (no host sync),
hands the scaler the window's inf flag the way ``GradScaler.step`` would record it, and calls ``scaler.update()``
once per window. ``scaler.step(acc)`` and ``scaler.unscale_(acc)`` would change the scale per micro-batch (or
unscale twice), so they are refused.
"""

from __future__ import annotations

from typing import Any

import torch


class ScalerLink:
    """One wrapper's GradScaler (or none: every method is then a no-op or the identity)."""

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self._hook_scale: float | torch.Tensor | None = None  # accumulate_in_backward: this micro-step's scale

    @property
    def active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def called_by_scaler_step(self, wrapper_attrs: dict[str, Any], open_window: bool) -> bool:
        """Whether this step() is GradScaler.step(acc)'s call, which hands the optimizer grad_scale/found_inf
        attributes right before (and deletes them only after a successful step). With a fixed window that call is
        refused, the attributes removed: the scale would change per micro-batch. With ``accumulation_steps=None`` it
        is one call per window, as frameworks make it: accepted when this link has that scaler (the hooks unscale
        with it), and the scaler's update() is then the caller's."""
        if "grad_scale" not in wrapper_attrs and "found_inf" not in wrapper_attrs:
            return False
        if open_window:
            if self.scaler is None:
                wrapper_attrs.pop("grad_scale", None)
                wrapper_attrs.pop("found_inf", None)
                raise RuntimeError(
                    "fusedaccum: scaler.step(acc) was called, but the wrapper was not given that scaler: pass it, "
                    "GradAccumulator(opt, None, scaler=scaler), so that its fused passes unscale the gradients"
                )
            return True
        wrapper_attrs.pop("grad_scale", None)
        wrapper_attrs.pop("found_inf", None)
        raise RuntimeError(
            "fusedaccum: do not call scaler.step(acc) / scaler.update() on a GradAccumulator: the scale must "
            "change once per window, not per micro-batch. Pass the scaler to the wrapper, "
            "GradAccumulator(opt, N, scaler=scaler), and call scaler.scale(loss).backward(); acc.step() on "
            "every micro-batch; the wrapper unscales in its fused pass and calls scaler.update() per window"
        )

    def check_ready(self, optimizer_id: int) -> None:
        if not self.active:
            return
        scaler = self.scaler
        if scaler._scale is None:
            raise RuntimeError(
                "fusedaccum: the GradScaler has no scale yet: call scaler.scale(loss).backward() before acc.step()"
            )
        stage = scaler._per_optimizer_states.get(optimizer_id, {}).get("stage")
        if stage is not None and stage is not torch.amp.grad_scaler.OptState.READY:
            raise RuntimeError(
                "fusedaccum: scaler.unscale_(acc) was called; the wrapper unscales in its fused pass (unscaling "
                "twice would be wrong). Use GradAccumulator(max_grad_norm=...) to clip"
            )

    def scale(self, w: float) -> float | torch.Tensor:
        """What a micro-step's grads are multiplied by: ``w`` over the loss scale, kept on the device."""
        if not self.active:
            return w
        # Same reciprocal as GradScaler.unscale_ (in float64, then float32), kept on the device: no host sync.
        inv_scale = self.scaler._scale.double().reciprocal().float().reshape(1)
        return inv_scale * w if w != 1.0 else inv_scale

    def hooked_scale(self) -> float | torch.Tensor:
        """accumulate_in_backward: the scale is read once per micro-step (at its first hook), on the device."""
        if self._hook_scale is None:
            if self.active and self.scaler._scale is None:
                raise RuntimeError(
                    "fusedaccum: a gradient arrived but the GradScaler has no scale yet: call "
                    "scaler.scale(loss).backward(), not loss.backward()"
                )
            self._hook_scale = self.scale(1.0)
        return self._hook_scale

    def micro_step_counted(self) -> None:
        self._hook_scale = None  # the scaler may be updated (end of window) or reloaded before the next backward

    def update(self, optimizer_id: int, found: torch.Tensor, by_caller: bool = False) -> None:
        """Once per window: the window's inf flag, recorded as GradScaler.step would, then its growth/backoff
        (``by_caller``: GradScaler.step(acc) called this step and its caller updates the scaler)."""
        if not self.active:
            return
        scaler = self.scaler
        state = scaler._per_optimizer_states[optimizer_id]
        state["found_inf_per_device"] = {found.device: found.to(scaler._scale.device).reshape(())}
        if by_caller:
            return  # GradScaler.step marks the stage itself when this step returns
        state["stage"] = torch.amp.grad_scaler.OptState.STEPPED
        scaler.update()

    def __getstate__(self) -> dict[str, Any]:
        return {"scaler": self.scaler, "_hook_scale": None}
