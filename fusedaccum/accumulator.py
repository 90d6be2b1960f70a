"""GradAccumulator: wrap any ``torch.optim.Optimizer`` so that the large-batch loop does exact gradient accumulation
(``loss.backward(); acc.step(); acc.zero_grad()`` on every micro-batch; README "Gradient accumulation").

This class is the facade: it wires the parts (_config, _master_grads, _window, _master_weights, _amp, the mode
in _accumulation or _hooks, the reduction in distributed, _checkpoint; README "Layout"), each owning one concern
and its state, and orchestrates a micro-step, a window's end and the state dict. The parts never call each other:
what one needs of another is handed to it here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _checkpoint
from ._accumulation import AtStep
from ._amp import ScalerLink
from ._config import DEFAULT_BUCKET_CAP_MB, Config
from ._hooks import BackwardHooks, OpenWindowHooks, weak_callback
from ._master_grads import MasterGradBuffer, MasterGrads, Params
from ._master_weights import MasterWeights
from ._optimizer_view import OPTIMIZER_HOOKS, OptimizerView
from ._window import Window
from .distributed import (
    AllReduceReduction,
    LocalReduction,
    ShardAgreement,
    check_ddp_params_covered,
)

__all__ = ["DEFAULT_BUCKET_CAP_MB", "GradAccumulator", "MasterGradBuffer"]

# What a copy (pickle, deepcopy) of the wrapper carries over; everything else is rebuilt by __setstate__.
_KEPT_ON_COPY = ("_inner", "_config", "_masters", "_weights", "_window", "_scaler", "_mode", "_reduction",
                 "_opt_called", *OPTIMIZER_HOOKS)


class GradAccumulator(OptimizerView):
    """Turns ``accumulation_steps`` micro-batches into one exact large-batch update of ``optimizer``.

    An Optimizer to the ecosystem (its ``param_groups``, ``state``, ``defaults`` are the wrapped optimizer's). Call
    ``loss.backward(); acc.step(); acc.zero_grad()`` on every micro-batch. The README says each option's semantics
    and cost in full; docs/distributed.md the distributed ones.

    Args:
        optimizer: the optimizer to wrap (not LBFGS, which re-evaluates the loss, nor SparseAdam).
        accumulation_steps: micro-batches per update (an int >= 1), or None: the window is everything between two
            :meth:`step` calls (each backward counted as a micro-step), for loops and frameworks that step once
            per window.
        reduction: ``"mean"`` (default): the mean of the window's micro-batch gradients, or ``sum(w_i g_i) /
            sum(w_i)`` with ``step(weight=w_i)``; ``"sum"``: the (weighted) sum.
        master_weights: the wrapped optimizer steps float32 copies of bf16/fp16 params, written back after each
            update. Without it, they get their float32 window gradient rounded once to their dtype.
        max_grad_norm: clip the window's gradient to this 2-norm (``clip_grad_norm_`` semantics), fused norm.
        backend: the :mod:`fusedaccum.ops` backend; default ``$FUSEDACCUM_BACKEND``, else the fastest.
        scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` made the gradients: unscaled in the fused pass
            (no host sync), a window with an overflow skipped, ``scaler.update()`` once per window by the wrapper.
        process_group: ``"default"`` or a ``ProcessGroup``: data parallel; one bucketed all-reduce of the float32
            masters per window, the global mean, skip and norm. Every rank calls :meth:`step` and :meth:`flush`
            equally often.
        ddp_module: the ``DistributedDataParallel`` around the model: its per-backward all-reduce is switched off
            for good (the wrapper's per-window one replaces it); or :meth:`attach` it later.
        bucket_cap_mb: distributed: all-reduce slices of at most this many MiB (default 25).
        accumulate_in_backward: each grad goes into its master the moment autograd finishes it and is freed
            (peak 4 B/param instead of masters + grads); distributed, the reduction overlaps the last backward.
        fsdp_module: the ``fully_shard`` root (FSDP2): accumulate each rank's float32 shards; agree on skip/norm.

    Raises:
        TypeError / ValueError: bad arguments; nothing is created.
    """

    # GradScaler.step(opt) checks this and then hands the optimizer grad_scale/found_inf attributes instead of
    # unscaling the grads in place: refused with a window of fixed length (the scale must change once per window),
    # accepted once per open window (accumulation_steps=None), as frameworks drive it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int,
        *,
        reduction: str = "mean",
        master_weights: bool = False,
        max_grad_norm: float | None = None,
        backend: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        ddp_module: torch.nn.Module | None = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        accumulate_in_backward: bool = False,
        fsdp_module: torch.nn.Module | None = None,
    ) -> None:
        config = Config.checked(
            optimizer, accumulation_steps, reduction=reduction, master_weights=master_weights,
            max_grad_norm=max_grad_norm, backend=backend, scaler=scaler, process_group=process_group,
            ddp_module=ddp_module, bucket_cap_mb=bucket_cap_mb, accumulate_in_backward=accumulate_in_backward,
            fsdp_module=fsdp_module, wrapper_type=GradAccumulator,
        )
        self._view(optimizer)
        self._config = config
        self._masters = MasterGrads(config.backend, config.fsdp)
        self._weights = MasterWeights(config.master_weights)
        self._window = Window(config.accumulation_steps, config.reduction, config.distributed)
        self._scaler = ScalerLink(scaler)
        self._mode = (
            OpenWindowHooks() if config.accumulation_steps is None
            else BackwardHooks() if config.accumulate_in_backward else AtStep()
        )
        if ddp_module is not None:
            check_ddp_params_covered(ddp_module, self._inner)
        self._reduction = (
            AllReduceReduction(config.group, config.bucket_elements, ddp_module) if config.distributed
            else ShardAgreement() if config.fsdp else LocalReduction()
        )
        self._hook_callback = weak_callback(self, "_on_grad_accumulated")
        self._sync_layout(force=True)  # the last check: what follows cannot fail, and changes what others hold
        self._wire()
        self._reduction.take_over()

    def _wire(self) -> None:
        """What others hold of this object: the step wrapper, the wrapped optimizer's state-dict hooks (on a copy
        too, whose originals point at the original)."""
        self._patch_step_function()
        self._weights.hook_state_dicts(self._inner)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per update."""
        return self._config.accumulation_steps

    @property
    def stepped(self) -> bool:
        """Whether the last :meth:`step` (or :meth:`flush`) applied an update: step LR schedulers when it is True."""
        return self._window.stepped

    @property
    def micro_step(self) -> int:
        """Micro-steps accumulated in the current window (0 right after an update)."""
        return self._window.micro_step

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total 2-norm of the last applied window's gradient, before clipping: a device tensor (no host sync)."""
        return self._window.grad_norm

    @property
    def skipped_windows(self) -> int:
        """How many windows were dropped because a gradient was inf or nan."""
        return self._window.skipped_windows

    def master_grad_buffers(self) -> list[MasterGradBuffer]:
        """The flat float32 master-gradient buffers, one per (device, param dtype), parameters in order; only the
        regions of parameters that received a gradient in the current window are meaningful."""
        return self._masters.buffer_list()

    def release_masters(self) -> None:
        """Free the float32 master gradients' memory (4 B per trainable param) at a window boundary, e.g. for eval,
        or after every update (``if acc.stepped: acc.release_masters()``); the next micro-step re-allocates them."""
        self._refuse_mid_window("release_masters()", "its partial sums would be lost")
        self._masters.release()

    def _refuse_mid_window(self, call: str, why: str) -> None:
        if self._window.micro_step or self._masters.any_touched():
            raise RuntimeError(f"fusedaccum: {call} in the middle of a window: {why}; call it before the first "
                               "micro-step or right after an update (nothing was changed)")

    def __getstate__(self) -> dict[str, Any]:
        # What is listed (copy.deepcopy / pickle of the model and the wrapper together keeps a half-finished
        # window), not a step wrapper an LR scheduler put on this instance (it points at the original object).
        return {name: self.__dict__[name] for name in _KEPT_ON_COPY if name in self.__dict__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._masters.rekey(self.param_groups)
        self._weights.rekey()
        self._hook_callback = weak_callback(self, "_on_grad_accumulated")
        self._wire()
        self._register_hooks()

    def __repr__(self) -> str:
        shown = ("accumulation_steps", "reduction", "master_weights", "max_grad_norm", "backend", "distributed",
                 "accumulate_in_backward")
        return f"GradAccumulator({self._inner!r}, {', '.join(f'{k}={getattr(self._config, k)!r}' for k in shown)})"

    def attach(self, *, ddp_module: torch.nn.Module) -> None:
        """Attach the ``DistributedDataParallel`` module after construction, as ``ddp_module=`` would have: for
        scripts that build the optimizer (and this wrapper) before wrapping the model in DDP. At a window boundary."""
        config = self._config.attached(ddp_module, self._inner)
        self._refuse_mid_window("attach()", "a partial window of local sums cannot join a global one")
        self._config = config
        self._window.distributed = True
        self._reduction = AllReduceReduction(config.group, config.bucket_elements, ddp_module)
        self._reduction.plan(self._masters, self._mode.in_backward)
        self._reduction.take_over()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; works mid-window (new params join from now on)."""
        self._window.refuse_reducing("add_param_group() was called", undo=False)
        groups = self._inner.param_groups
        count = len(groups)
        self._inner.add_param_group(param_group)
        try:
            self._sync_layout()
        except BaseException:
            del groups[count:]  # refused (e.g. float64 params): the wrapped optimizer must not keep the group
            raise

    # ------------------------------------------------------------------------------------------------ step
    @torch.compiler.disable  # a graph break in a compiled train step: the window's state lives on the host
    def step(self, closure: Callable[[], Any] | None = None, *, weight: float | torch.Tensor | None = None) -> Any:
        """Accumulate this micro-batch's gradients; apply the update when the window is full.

        Reads every ``.grad`` into its float32 master in one fused pass and sets it to None. On the window's last
        micro-step: the inf/NaN check (one host sync), clipping, and the wrapped optimizer's step on the window's
        mean (or sum, or weighted mean).

        Args:
            closure: optional; called with grad enabled before accumulating: this micro-batch's forward and
                backward, returning its loss.
            weight: this micro-batch's weight ``w_i`` (e.g. its token count), on every micro-step of a window or
                on none: the window's gradient is then ``sum(w_i g_i) / sum(w_i)``. A tensor costs a host sync.

        Returns:
            The closure's loss if one was given; else the wrapped optimizer's ``step()`` result on an update, None
            otherwise.

        Raises:
            ValueError / TypeError: bad weight or closure, bad gradients; RuntimeError: no gradient in the whole
                window when the update is due, a refused scaler call. Nothing has changed then (README).
        """
        window, masters = self._window, self._masters
        by_scaler_step = self._scaler.called_by_scaler_step(self.__dict__, self._mode.open_window)
        if closure is not None and not callable(closure):
            raise TypeError(f"fusedaccum: closure must be a callable or None, got {closure!r}")
        self._mode.refuse_weight(weight)
        self._reduction.refuse_weight(weight)
        self._reduction.check_step()
        w = window.check_weight(weight)
        window.check_weighting(weight is not None)
        ref = window.weight_ref_for(w, weight is not None)
        self._scaler.check_ready(id(self))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = masters.collect(self.param_groups, self._sync_layout)
        last = self._mode.ends_window(window, grads)
        # Distributed: whether any rank got a gradient is only known after the reduction (a local raise here would
        # leave the other ranks waiting in it); the reduction raises on every rank instead.
        if last and self._reduction.scales_locally and not grads and not masters.any_touched():
            where = f"micro-step {window.micro_step + 1} of {window.accumulation_steps}"
            raise RuntimeError(window.no_grads_message(where))
        self._mode.micro_step(grads, w, ref, masters, window, self._scaler, self._reduction, self.param_groups,
                              weight is not None)
        result = self._finish_window(by_scaler_step) if last else None
        return loss if closure is not None else result

    @torch.compiler.disable
    def flush(self) -> bool:
        """Apply the current short window now, with its true count (or weight sum); e.g. at the end of an epoch.

        Costs one extra pass over the window's masters (the last micro-step did not know it was the last).
        Distributed: every rank must call it together (ranks with an empty window too); the update uses the
        global weight sum, and no update is applied if every rank's window is empty (the reduction still runs).

        Returns:
            Whether an update was applied (False if the window was empty or skipped for non-finite gradients).

        Raises:
            RuntimeError: the window has micro-steps but no parameter received a gradient in it (nothing changes).
        """
        self._scaler.called_by_scaler_step(self.__dict__, open_window=False)  # refused: flush is not a step
        window, masters = self._window, self._masters
        window.refuse_uncounted("flush()")
        if self._reduction.scales_locally:
            if window.micro_step == 0:
                window.stepped = False
                return False
            self._sync_layout()
            if not masters.any_touched():
                raise RuntimeError(window.no_grads_message(f"flush() after {window.micro_step} micro-steps"))
            masters.zero_sumsq()
            masters.scale_only_(masters.touched_entries(), window.post_scale())
        else:
            self._sync_layout()  # collective: a rank with an empty window still takes part (zeros, weight 0)
        window.stepped = False
        self._finish_window()
        if window.stepped:
            # An LR scheduler built on this wrapper warns "lr_scheduler.step() before optimizer.step()" unless its
            # wrapper around step() has set _opt_called; an update applied here (the first after a resume, say)
            # counts too.
            self._opt_called = True
        return window.stepped

    def _finish_window(self, by_scaler_step: bool = False) -> Any:
        """The end of a window whose micro-steps are all counted: reduce, decide skip or step (the one host sync),
        clip, step the wrapped optimizer, start a new window. If anything raises, the window is dropped (its
        masters were scaled for this update and the grads consumed, so it cannot be replayed) and the error says
        so; a window left at its last micro-step would never update again."""
        window, masters = self._window, self._masters
        try:
            if not self._reduction.reduce(masters, window, self._mode):
                return None  # flush() with every rank's window empty
            found, sumsq = self._reduction.agree(masters, masters.found(), masters.norm_squared())
            found, skip, coef = window.judge(found, sumsq, self._config.max_grad_norm)
            self._scaler.update(id(self), found, by_caller=by_scaler_step)
            if skip:
                window.skipped()
                return None
            if coef is not None:
                masters.scale_all_(coef)
            result = self._weights.step_optimizer(self._inner, masters.touched_entries())
            window.stepped = True
            return result
        except BaseException as error:
            if window.micro_step and hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note("fusedaccum: the update failed; the window was dropped (the next step() starts a "
                               "new one)")
            raise
        finally:
            self._reset_window()

    def _reset_window(self) -> None:
        self._window.reset()
        self._masters.reset()
        self._mode.reset()
        if self._masters.holds_frozen():
            # A param frozen during the window leaves the layout now, as its window ends (not at the next call that
            # looks: unfrozen before then, it would keep its copy and state, and a checkpoint in between would not).
            self._sync_layout()

    # --------------------------------------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"fusedaccum"`` entry: the window position, the weights
        so far, the float32 master gradients (and master weights), the skipped-window count.

        Like ``Optimizer.state_dict``, tensors are references: ``torch.save`` it (or deep-copy it) before training
        on. Reading the window's inf flag costs one host sync.
        """
        self._through_hooks(self._optimizer_state_dict_pre_hooks)
        self._window.refuse_uncounted("state_dict()")
        self._sync_layout()
        self._weights.refresh()  # a param changed since the last update must be saved as it is now
        state = self._inner.state_dict()  # with master_weights, its hooks show it the float32 master weights
        state[_checkpoint.STATE_KEY] = _checkpoint.assemble(self._window, self._masters, self._weights,
                                                         self.param_groups)
        return self._through_hooks(self._optimizer_state_dict_post_hooks, state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a plain state dict of the wrapped optimizer's type, which starts a fresh
        window). Saved at any micro-step, training continues bit-identically.

        Raises:
            ValueError: the state dict comes from another parameter layout (shapes, dtypes, which params are
                trainable, group sizes), or mid-window from another accumulation_steps/reduction, or from another
                master_weights setting, or its ``"fusedaccum"`` entry is malformed or inconsistent. Nothing changes.
        """
        self._window.refuse_reducing("load_state_dict() was called", undo=False)
        if not isinstance(state_dict, dict):
            raise TypeError(f"fusedaccum: load_state_dict expects a dict, got a {type(state_dict).__name__}")
        inner_state = dict(self._through_hooks(self._optimizer_load_state_dict_pre_hooks, state_dict))
        saved = inner_state.pop(_checkpoint.STATE_KEY, None)
        self._sync_layout()
        if saved is not None:
            _checkpoint.check(saved, self._window, self._masters, self._weights, self.param_groups,
                              self._mode.in_backward)
        self._inner.load_state_dict(inner_state)  # with master_weights, its hooks show it the master weights
        self._reset_window()
        if saved is not None:
            _checkpoint.load(saved, self._window, self._masters, self._weights, self.param_groups)
        self._scaler.micro_step_counted()  # the scaler may have been reloaded too
        self._through_hooks(self._optimizer_load_state_dict_post_hooks)

    # --------------------------------------------------------------------------------------------- layout
    def _sync_layout(self, trainable: Params | None = None, force: bool = False) -> None:
        """(Re)build the master buffers when the trainable params changed; keeps the window's partial sums."""
        groups, masters = self.param_groups, self._masters
        if trainable is None:
            trainable = masters.trainable(groups)
        if not force and not masters.changed(groups, trainable):
            return
        self._window.refuse_reducing("the trainable parameters changed", undo=True)
        masters.check(groups, trainable)
        self._weights.check(groups)
        masters.rebuild(groups, trainable)
        self._weights.follow(groups, self._inner.state)
        self._reduction.plan(masters, self._mode.in_backward)
        self._register_hooks()

    def _register_hooks(self) -> None:
        self._mode.register(self._reduction.hooked_params(self._masters, self.param_groups), self._hook_callback)

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        """accumulate_in_backward: autograd has finished ``param``'s grad for this backward."""
        self._mode.on_grad(param, self._masters, self._window, self._scaler, self._reduction, self._sync_layout,
                           self._reset_window)

