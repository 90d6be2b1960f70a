"""Lightning: ``Trainer(accumulate_grad_batches=N, callbacks=[FusedAccumulation()])``.

Lightning keeps its knob and its loop: it divides each batch's loss by ``accumulate_grad_batches``, runs
``training_step`` + backward on every batch, and calls ``optimizer.step()`` on the window's last batch (or the
epoch's last). :class:`FusedAccumulation` wraps the optimizer Lightning built in a :class:`fusedaccum.GradAccumulator`
in open-window mode (``accumulation_steps=None, reduction="sum"``): every backward's gradients go into fp32 master
buffers, and that ``step()`` applies their sum. It also takes over what Lightning would do to ``p.grad``, which the
wrapper leaves None: ``gradient_clip_val`` becomes the wrapper's ``max_grad_norm`` (the window's fused 2-norm), the
``16-mixed`` GradScaler unscales inside the wrapper's passes, and the short last window of an epoch is divided by
its true number of batches instead of by ``accumulate_grad_batches`` (Lightning issue #19987).

Why a callback: it is Lightning's own extension point, needs no change to the LightningModule (its
``configure_optimizers`` and LR schedulers stay as they are), sees the Trainer's clipping and precision settings,
and runs at the three moments the integration needs: after the optimizer is built and before a checkpoint's
optimizer state is restored (``on_fit_start``), between the window's last backward and the update
(``on_before_optimizer_step``), and at the end of fit (``teardown``). Works with ``lightning.pytorch`` and with
``pytorch_lightning`` (the Trainer only calls a callback's hooks).

Two wrapper calls it needs have no public form yet, so it makes them on the wrapper's internals (the same package):
removing the parameter hooks at the end of fit (``acc._mode.register([], ...)``; a public ``remove_hooks()``
would do) and dropping a window Lightning abandoned (``acc._reset_window()``; a public ``discard_window()``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..accumulator import GradAccumulator

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError(
            "fusedaccum.integrations.lightning needs Lightning: pip install lightning (or pytorch-lightning)"
        ) from error

__all__ = ["FusedAccumulation"]

# The precision plugins whose optimizer step the wrapper serves: plain fp32 ("32-true"), autocast with or without a
# GradScaler ("16-mixed", "bf16-mixed") and half-precision params ("16-true", "bf16-true"), by class name (Lightning
# 2.0 calls them PrecisionPlugin, MixedPrecisionPlugin, HalfPrecisionPlugin). The others (DeepSpeed, FSDP, XLA,
# bitsandbytes, Transformer Engine, double) own the optimizer step or the gradients themselves.
_PLAIN_PRECISION = ("Precision", "PrecisionPlugin")
_SUPPORTED_PRECISION_BASES = ("MixedPrecision", "MixedPrecisionPlugin", "HalfPrecision", "HalfPrecisionPlugin")

# LightningModule hooks that see p.grad: the wrapper's hooks have moved every gradient into its fp32 masters (and
# set p.grad to None) by the time they run.
_GRAD_READING_HOOKS = ("on_after_backward", "on_before_optimizer_step")


class FusedAccumulation(Callback):
    """Train with :class:`fusedaccum.GradAccumulator` while ``Trainer(accumulate_grad_batches=N)`` stays the knob.

    Pass it in ``Trainer(callbacks=[FusedAccumulation()])``; ``configure_optimizers`` returns the plain optimizer (and
    schedulers) as usual. At ``on_fit_start`` the optimizer is wrapped; at the end of fit the trainer gets its own
    optimizer back. The updates, ``global_step`` and scheduler steps are Lightning's; each update is the fp32 sum of
    the window's backwards, clipped by ``Trainer(gradient_clip_val=...)`` on the window's fused norm.

    Args:
        exact_last_window: divide the short last window of an epoch (fewer batches than ``accumulate_grad_batches``)
            by its true number of batches k, as a large batch of those batches would be. False keeps Lightning's
            own arithmetic (every batch's loss divided by ``accumulate_grad_batches`` N: the short window's gradient
            is k/N of their mean), e.g. to reproduce a native run.
        log_grad_norm: a metric name (e.g. ``"grad_norm"``) under which each applied window's 2-norm before
            clipping is logged with ``pl_module.log`` (Lightning cannot compute it: ``p.grad`` is None); None: no
            logging. The norm is on the device; logging reads it when the logger writes.
        master_weights: the wrapper's ``master_weights``: with ``precision="bf16-true"``/``"16-true"`` the
            optimizer steps float32 copies of the parameters.
        backend: the wrapper's :mod:`fusedaccum.ops` backend (default: the fastest available).

    Raises (at ``trainer.fit``, before the first batch, nothing changed):
        RuntimeError: manual optimization; a distributed run or a strategy that accumulates itself (DeepSpeed);
            a precision plugin other than Lightning's fp32, mixed and half ones; ``configure_optimizers`` returned
            no optimizer, or already a ``GradAccumulator`` (with an int ``accumulation_steps`` and
            ``accumulate_grad_batches > 1`` the gradients would be accumulated twice); the LightningModule overrides
            ``configure_gradient_clipping`` (it would clip ``p.grad``, which is None).
        ValueError: ``gradient_clip_algorithm="value"`` with a ``gradient_clip_val`` (the wrapper clips by norm).
        RuntimeError at the first update: the trainer's optimizer was replaced after ``on_fit_start``.
    """

    def __init__(
        self,
        *,
        exact_last_window: bool = True,
        log_grad_norm: str | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        if not isinstance(exact_last_window, bool):
            raise TypeError(f"fusedaccum: exact_last_window must be a bool, got {exact_last_window!r}")
        if log_grad_norm is not None and (not isinstance(log_grad_norm, str) or not log_grad_norm):
            raise TypeError(f"fusedaccum: log_grad_norm must be a metric name or None, got {log_grad_norm!r}")
        self.exact_last_window = exact_last_window
        self.log_grad_norm = log_grad_norm
        self._wrapper_options = {"master_weights": master_weights, "backend": backend}
        self._acc: GradAccumulator | None = None
        self._saved_clip_val: Any = None
        self._batch_idx = 0
        self._stepping = False

    @property
    def accumulator(self) -> GradAccumulator | None:
        """The wrapper during ``trainer.fit`` (its ``grad_norm``, ``stepped``, ``skipped_windows``); None otherwise."""
        return self._acc

    # ------------------------------------------------------------------------------------------ wrapping
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check the setup and wrap the optimizer: after Lightning built it (and connected the precision plugin),
        before a checkpoint's optimizer state is loaded into it (``ckpt_path=``), so that the wrapper loads its own
        ``"fusedaccum"`` entry."""
        optimizer = self._checked_optimizer(trainer, pl_module)
        clip_val = trainer.gradient_clip_val
        clip = float(clip_val) if clip_val is not None and clip_val > 0 else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        acc = GradAccumulator(optimizer, None, reduction="sum", max_grad_norm=clip, scaler=scaler,
                              **self._wrapper_options)
        trainer.strategy.optimizers = [acc]
        # Lightning's own clipping would run over p.grad, which is None (a silent no-op), and with a GradScaler it
        # refuses an optimizer that unscales in its step: the wrapper clips instead, so Lightning's is off for this fit.
        self._saved_clip_val = clip_val
        trainer.gradient_clip_val = None
        self._acc = acc
        for hook in _GRAD_READING_HOOKS:
            if _overrides(pl_module, hook):
                warnings.warn(
                    f"fusedaccum: {type(pl_module).__name__}.{hook} reads no gradients under FusedAccumulation: "
                    "p.grad is None there (each backward's gradients are already in the wrapper's fp32 masters). "
                    "Log the window's norm with FusedAccumulation(log_grad_norm='grad_norm') instead",
                    stacklevel=2,
                )

    def _checked_optimizer(self, trainer: Any, pl_module: Any) -> torch.optim.Optimizer:
        """The optimizer to wrap, or an error saying what cannot work and what to do."""
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "fusedaccum: FusedAccumulation serves Lightning's automatic optimization; with manual optimization "
                "your training_step owns the loop: wrap the optimizer yourself in configure_optimizers "
                "(fusedaccum.GradAccumulator(opt, N), or (opt, None) if you call step() once per window) and clip "
                "with its max_grad_norm"
            )
        strategy = trainer.strategy
        if trainer.world_size > 1:
            raise RuntimeError(
                f"fusedaccum: FusedAccumulation supports single-process training only (world size "
                f"{trainer.world_size} with {type(strategy).__name__}): the wrapper would have to replace the "
                "strategy's gradient reduction"
            )
        if getattr(strategy, "handles_gradient_accumulation", False):
            raise RuntimeError(
                f"fusedaccum: {type(strategy).__name__} accumulates gradients itself; FusedAccumulation cannot "
                "take over its accumulation"
            )
        plugin = trainer.precision_plugin
        bases = {cls.__name__ for cls in type(plugin).__mro__}
        if type(plugin).__name__ not in _PLAIN_PRECISION and not bases.intersection(_SUPPORTED_PRECISION_BASES):
            raise RuntimeError(
                f"fusedaccum: FusedAccumulation supports Lightning's Precision ('32-true'), MixedPrecision "
                f"('16-mixed', 'bf16-mixed') and HalfPrecision ('16-true', 'bf16-true') plugins, got "
                f"{type(plugin).__name__}, which drives the optimizer step or the gradients itself"
            )
        optimizers = [_unwrapped(o) for o in strategy.optimizers]
        if len(optimizers) != 1 or not any(group["params"] for group in optimizers[0].param_groups):
            raise RuntimeError(
                "fusedaccum: FusedAccumulation needs configure_optimizers to return one optimizer with parameters, "
                f"got {len(optimizers)} optimizer(s)"
            )
        optimizer = optimizers[0]
        n = trainer.accumulate_grad_batches
        if isinstance(optimizer, GradAccumulator):
            if optimizer.accumulation_steps is not None and n > 1:
                raise RuntimeError(
                    f"fusedaccum: double accumulation: configure_optimizers returned GradAccumulator(opt, "
                    f"{optimizer.accumulation_steps}) and Trainer(accumulate_grad_batches={n}) also accumulates: "
                    f"there would be one update per {n * optimizer.accumulation_steps} batches, each averaged twice. "
                    "Return the plain optimizer; FusedAccumulation wraps it and accumulate_grad_batches stays the knob"
                )
            raise RuntimeError(
                "fusedaccum: configure_optimizers returned a GradAccumulator; with FusedAccumulation return the plain "
                "optimizer (the callback wraps it, with the Trainer's clipping and GradScaler; pass master_weights= "
                "or backend= to FusedAccumulation)"
            )
        if _overrides(pl_module, "configure_gradient_clipping"):
            raise RuntimeError(
                f"fusedaccum: {type(pl_module).__name__} overrides configure_gradient_clipping, whose clipping would "
                "run over p.grad, which is None under FusedAccumulation (the gradients are in the wrapper's fp32 "
                "masters): remove the override and set Trainer(gradient_clip_val=...), which the wrapper applies to "
                "the window's fused norm"
            )
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)  # an enum
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val > 0 and algorithm == "value":
            raise ValueError(
                f"fusedaccum: Trainer(gradient_clip_algorithm='value', gradient_clip_val={clip_val}): the wrapper "
                "clips the window's gradient by its 2-norm only; use gradient_clip_algorithm='norm' (the default)"
            )
        return optimizer

    # ------------------------------------------------------------------------------------------ windows
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx  # the position in the epoch: Lightning's windows start at multiples of N
        self._stepping = False

    def on_before_zero_grad(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """A window starts. If the last one still holds gradients, Lightning never stepped it (16-mixed skips
        scaler.step when the window's last training_step returned None) and its zero_grad now drops them natively:
        drop them too, rather than let them leak into this window's update."""
        acc = self._acc
        if acc is None or acc.micro_step == 0:
            return
        warnings.warn(
            f"fusedaccum: a window of {acc.micro_step} backward(s) ended without an optimizer step (its last "
            "training_step returned None under a GradScaler, so Lightning skipped the step); its gradients are "
            "dropped, as Lightning's zero_grad drops them natively",
            stacklevel=2,
        )
        acc._reset_window()  # no public call for it yet: see the module docstring

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The window's last backward is done and counted, its update comes next: a short last window gets
        ``N / k`` (its batches' losses were divided by N, their mean needs k)."""
        acc = self._acc
        if acc is None:
            return
        if _unwrapped(optimizer) is not acc:
            # Something replaced the trainer's optimizer after on_fit_start: the update would use p.grad, which the
            # wrapper's hooks keep empty (every window's gradient lost, silently).
            raise RuntimeError(
                f"fusedaccum: the trainer steps {type(optimizer).__name__}, not the GradAccumulator FusedAccumulation "
                "set at fit start (something replaced trainer.strategy.optimizers since); the gradients are in the "
                "wrapper's masters, so that step would see none"
            )
        self._stepping = True
        n = trainer.accumulate_grad_batches
        k = self._batch_idx % n + 1
        if self.exact_last_window and k < n and acc.micro_step > 0:
            # One extra pass over the masters, once per epoch. The wrapper's step() measures the norm (clipping) and
            # the inf flag after this, on the window's true mean.
            with torch.no_grad():
                for part in acc.master_grad_buffers():
                    part.buffer.mul_(n / k)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        acc = self._acc
        if self.log_grad_norm and acc is not None and self._stepping and acc.stepped and acc.grad_norm is not None:
            pl_module.log(self.log_grad_norm, acc.grad_norm, on_step=True, on_epoch=False)
        self._stepping = False

    # ------------------------------------------------------------------------------------------ the end
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release(trainer)

    def _release(self, trainer: Any) -> None:
        """The trainer gets its own optimizer and clipping setting back, and the wrapper stops taking the model's
        gradients (after fit, a backward leaves its gradients in p.grad again) and frees its masters."""
        acc = self._acc
        if acc is None:
            return
        self._acc = None
        trainer.gradient_clip_val = self._saved_clip_val
        # Removes the wrapper's parameter hooks (no public call for it yet: see the module docstring).
        acc._mode.register([], acc._hook_callback)
        if acc.micro_step == 0:  # fit ends on an update: the masters hold nothing of use (4 B/param) for whoever
            acc.release_masters()  # still holds the wrapper (a mid-window end keeps its partial sums)
        strategy = trainer.strategy
        if any(_unwrapped(o) is acc for o in strategy.optimizers):
            strategy.optimizers = [acc.optimizer]


def _overrides(pl_module: Any, hook: str) -> bool:
    """Whether the LightningModule's class redefines ``hook`` (compared with the Lightning base that defines it)."""
    for cls in type(pl_module).__mro__:
        if hook in cls.__dict__:
            return cls.__name__ != "LightningModule" and not cls.__module__.startswith(
                ("lightning.pytorch.", "pytorch_lightning."))
    return False


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer inside a ``LightningOptimizer`` (which subclasses the optimizer's class), else ``optimizer``."""
    if any(cls.__name__ == "LightningOptimizer" for cls in type(optimizer).__mro__):
        return optimizer._optimizer
    return optimizer
