"""🤗 transformers' ``Trainer`` with :class:`fusedaccum.GradAccumulator`: Trainer keeps its own accumulation knob.

Swap ``Trainer`` for :class:`FusedAccumTrainer` (or put :class:`FusedAccumMixin` first in the bases of a Trainer
subclass); nothing else in the script changes::

    from fusedaccum.integrations.transformers import FusedAccumTrainer

    trainer = FusedAccumTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=8), ...)
    trainer.train()

Trainer still divides each micro-batch's loss (by ``gradient_accumulation_steps``, by the true length of a short
last window, or by the window's token count ``num_items_in_batch``) and still calls ``optimizer.step()``, the LR
scheduler and ``global_step`` once per window. The trainer wraps the optimizer it builds (or the one passed in
``optimizers=``) in ``GradAccumulator(optimizer, None, reduction="sum", max_grad_norm=args.max_grad_norm,
scaler=accelerator.scaler)``: every backward's gradients go into fp32 master buffers from the parameters' hooks,
and Trainer's ``optimizer.step()`` applies their sum. Clipping is the wrapper's, on the window's fused norm (Trainer
does not clip ``p.grad``, which stays empty), and the ``grad_norm`` Trainer logs is that window's norm before
clipping, as Trainer logs it natively. With ``fp16=True``, accelerate's GradScaler drives the wrapper: its
``scaler.step(acc)`` + ``scaler.update()`` once per window, a window with an overflow skipped as a whole.

Needs transformers >= 5.3 (its ``Trainer._clip_grad_norm`` / ``_get_grad_norm``, the two places where Trainer
computes the norm and clips) and accelerate >= 1.3 (the oldest with which transformers 5.3's Trainer runs: it
calls ``unwrap_model(keep_torch_compile=...)``, though it declares accelerate >= 1.1). Tested with 5.3.0 + 1.3.0
and 5.24.0 + 1.16.0. See docs/transformers.md.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

try:
    import transformers
    from packaging.version import Version
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # an optional extra: fusedaccum itself never needs it
    raise ImportError(
        "fusedaccum.integrations.transformers needs transformers >= 5.3 and accelerate >= 1.3: "
        "pip install 'fusedaccum[integrations]'"
    ) from error

from .. import backends
from ..accumulator import GradAccumulator

__all__ = ["MIN_TRANSFORMERS", "FusedAccumMixin", "FusedAccumTrainer"]

MIN_TRANSFORMERS = "5.3"
if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(
        f"fusedaccum.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} (found "
        f"{transformers.__version__}): older Trainers clip and measure the gradient inline in their training loop, "
        "where the wrapper's fused norm cannot take over"
    )

# GradAccumulator options the trainer sets itself, and where each one comes from.
_OWNED = {
    "accumulation_steps": "None: Trainer's gradient_accumulation_steps is the knob",
    "reduction": '"sum": Trainer already divides the loss by the window (or by num_items_in_batch)',
    "max_grad_norm": "TrainingArguments.max_grad_norm (0 turns clipping off)",
    "scaler": "accelerate's GradScaler (fp16=True)",
    "accumulate_in_backward": "implied: the gradients go into the masters from the parameters' hooks",
    "process_group": "multi-process Trainer runs are refused",
    "ddp_module": "multi-process Trainer runs are refused",
    "fsdp_module": "FSDP is refused",
}
_ALLOWED = ("master_weights", "backend")
# Trainer optimizers that update inside backward (their step() does nothing): the wrapper would never see a gradient.
_IN_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")


class FusedAccumMixin:
    """Makes a ``transformers.Trainer`` (sub)class accumulate through :class:`fusedaccum.GradAccumulator`.

    Put it first in the bases: ``class MyTrainer(FusedAccumMixin, SFTTrainer): pass``. :class:`FusedAccumTrainer` is
    ``FusedAccumMixin`` over ``Trainer``.

    Args:
        fusedaccum_options: further :class:`~fusedaccum.GradAccumulator` options: ``master_weights`` (fp32 copies
            of bf16/fp16 params), ``backend``. The others are set from Trainer's arguments.
        *args, **kwargs: the Trainer's own.

    Raises:
        ValueError: a setup the wrapper would get silently wrong: an ``optimizers=`` optimizer that is already a
            GradAccumulator (with an int ``accumulation_steps`` Trainer's N and the wrapper's would multiply),
            DeepSpeed, FSDP, several processes or GPUs (DataParallel), LOMO/layer-wise optimizers, an unknown or
            Trainer-owned option in ``fusedaccum_options``.
    """

    def __init__(self, *args: Any, fusedaccum_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._fusedaccum_options = _checked_options(fusedaccum_options)
        self._fusedaccum: GradAccumulator | None = None
        self._fusedaccum_norm: torch.Tensor | None = None  # the current window's logged norm (see _norm_slot)
        super().__init__(*args, **kwargs)
        _refuse_setup(self)
        self.add_callback(_AfterOptimizerStep(self))

    @property
    def accumulator(self) -> GradAccumulator | None:
        """The :class:`~fusedaccum.GradAccumulator` Trainer steps (None until ``train()`` builds the optimizer)."""
        return self._fusedaccum

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """Trainer's optimizer (built as Trainer builds it, or the one given in ``optimizers=``), wrapped once."""
        optimizer = super().create_optimizer(*args, **kwargs)
        acc = self._fusedaccum
        if acc is not None and _unwrapped(optimizer) is acc:
            return optimizer  # a second train(): already ours (possibly inside accelerate's AcceleratedOptimizer)
        _refuse_accumulator(optimizer)
        max_norm = self.args.max_grad_norm
        self._fusedaccum = GradAccumulator(
            optimizer, None, reduction="sum", max_grad_norm=max_norm if max_norm and max_norm > 0 else None,
            scaler=getattr(self.accelerator, "scaler", None), **self._fusedaccum_options,
        )
        self.optimizer = self._fusedaccum
        return self.optimizer

    # Trainer calls these two right before optimizer.step(): _clip_grad_norm when max_grad_norm > 0, then
    # _get_grad_norm, whose result it logs after the step. Natively both go through accelerator.clip_grad_norm_ over
    # p.grad, which the hooks leave empty (and, with fp16, call GradScaler.unscale_, which the wrapper refuses: it
    # unscales in its fused pass). The wrapper clips inside optimizer.step() with the window's fused norm, known only
    # then: Trainer gets a tensor that _AfterOptimizerStep fills with that norm right after the step, before Trainer
    # reads it (.item()) to log.
    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        return self._norm_slot()

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        return self._norm_slot() if grad_norm is None else grad_norm

    def _norm_slot(self) -> torch.Tensor:
        self._fusedaccum_norm = torch.full((), float("nan"), device=self.args.device)
        return self._fusedaccum_norm


class FusedAccumTrainer(FusedAccumMixin, Trainer):
    """``transformers.Trainer`` accumulating through :class:`fusedaccum.GradAccumulator` (see
    :class:`FusedAccumMixin`; the arguments are Trainer's, plus ``fusedaccum_options``)."""


class _AfterOptimizerStep(TrainerCallback):
    """Right after Trainer's ``optimizer.step()``: the logged norm becomes the window's, and a window the wrapper
    skipped (an inf/nan gradient, with or without GradScaler) counts as skipped for Trainer's LR scheduler. Before
    an evaluation and at the end of training (window boundaries), the fp32 masters are freed: they hold nothing of
    use there, and the next backward re-allocates them."""

    def __init__(self, trainer: FusedAccumMixin) -> None:
        self._trainer = weakref.ref(trainer)  # the trainer holds this callback: no cycle

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        acc = None if trainer is None else trainer._fusedaccum
        if acc is None:
            return
        slot = trainer._fusedaccum_norm
        if slot is not None:
            # A skipped window (an inf/nan gradient) keeps the slot's NaN: natively Trainer logs the norm of that
            # non-finite gradient (NaN or inf).
            if acc.stepped and acc.grad_norm is not None:
                slot.copy_(acc.grad_norm)
            trainer._fusedaccum_norm = None
        # accelerate's AcceleratedOptimizer reports a skipped step only when GradScaler.step did not call step()
        # (GradScaler calls the wrapper's step() every window: the wrapper decides to skip); Trainer steps the LR
        # scheduler unless accelerator.optimizer_step_was_skipped. The wrapper knows: tell it.
        optimizer, told = trainer.optimizer, False
        while optimizer is not None and optimizer is not acc:
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = not acc.stepped
                told = True
            optimizer = getattr(optimizer, "optimizer", None)
        if not told and not acc.stepped and trainer.optimizer is not acc:
            raise RuntimeError(
                "fusedaccum: the GradAccumulator skipped this window, but the optimizer Trainer steps has no "
                "AcceleratedOptimizer._is_overflow to say so (this accelerate does not match the integration): "
                "Trainer would step the LR scheduler for a window that changed nothing"
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Trainer's DefaultFlowCallback (before this one) has just decided whether to evaluate after this update.
        if control.should_evaluate:
            self._release()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        trainer = self._trainer()
        acc = None if trainer is None else trainer._fusedaccum
        if acc is not None and acc.micro_step == 0:  # a window boundary (a callback may stop training mid-window)
            acc.release_masters()


def _unwrapped(optimizer: Any) -> Any:
    """Through accelerate's AcceleratedOptimizer (``.optimizer``) down to a GradAccumulator, if there is one."""
    seen = 0
    while not isinstance(optimizer, GradAccumulator) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _refuse_accumulator(optimizer: Any) -> None:
    acc = _unwrapped(optimizer)
    if not isinstance(acc, GradAccumulator):
        return
    if acc.accumulation_steps is not None:
        raise ValueError(
            f"fusedaccum: the optimizer given to the trainer is a GradAccumulator with accumulation_steps="
            f"{acc.accumulation_steps}: Trainer already accumulates gradient_accumulation_steps micro-batches per "
            "optimizer.step(), so the two windows would multiply (double accumulation). Pass the plain optimizer: "
            "the trainer wraps it itself, with Trainer's gradient_accumulation_steps as the only knob"
        )
    raise ValueError(
        "fusedaccum: the optimizer given to the trainer is already a GradAccumulator: pass the plain optimizer; the "
        "trainer wraps it itself (reduction, clipping and the GradScaler come from Trainer's arguments; "
        f"fusedaccum_options= takes {', '.join(_ALLOWED)})"
    )


def _checked_options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"fusedaccum: fusedaccum_options must be a dict, got {type(options).__name__}")
    for key in options:
        if key in _OWNED:
            raise ValueError(f"fusedaccum: fusedaccum_options[{key!r}] is set by the trainer: {_OWNED[key]}")
        if key not in _ALLOWED:
            raise ValueError(
                f"fusedaccum: unknown fusedaccum_options key {key!r}; the trainer takes {', '.join(_ALLOWED)}"
            )
    # Checked now, not when train() builds the optimizer: a typo should not wait for the end of data loading.
    if "master_weights" in options and not isinstance(options["master_weights"], bool):
        raise TypeError(f"fusedaccum: fusedaccum_options['master_weights'] must be a bool, got "
                        f"{options['master_weights']!r}")
    backends.check_name(options.get("backend"), "fusedaccum_options['backend']")
    return dict(options)


def _refuse_setup(trainer: Any) -> None:
    """What the wrapper would get silently wrong under this Trainer, refused at construction."""
    args = trainer.args

    def refuse(what: str, why: str) -> None:
        raise ValueError(f"fusedaccum: {type(trainer).__name__} does not support {what}: {why}")

    if trainer.optimizer is not None:
        _refuse_accumulator(trainer.optimizer)
    if getattr(trainer, "is_deepspeed_enabled", False):
        refuse("DeepSpeed", "DeepSpeed's engine accumulates, clips and steps itself")
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        refuse("FSDP", "Trainer builds the optimizer before FSDP shards the model; the wrapper would need fsdp_module")
    if args.world_size > 1:
        refuse(
            f"multi-process training (world_size={args.world_size})",
            "Trainer's losses assume DDP's mean over ranks, while GradAccumulator(reduction='sum') all-reduces "
            "the global sum (the update would be world_size times too large). Train on one process",
        )
    if args.n_gpu > 1:
        refuse(f"DataParallel over {args.n_gpu} GPUs", "use one GPU (CUDA_VISIBLE_DEVICES)")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim in _IN_BACKWARD_OPTIMIZERS or optim.endswith("_layerwise"):
        refuse(f"optim={optim!r}", "it updates the parameters inside backward; the wrapper would never see a gradient")
