"""🤗 accelerate's ``Accelerator`` with :class:`fusedaccum.GradAccumulator`: its ``gradient_accumulation_steps`` rules.

Replace the one ``accelerator.prepare(...)`` call; the training loop stays accelerate's own::

    from fusedaccum.integrations.accelerate import prepare

    accelerator = Accelerator(gradient_accumulation_steps=4)
    model, optimizer, loader, scheduler = prepare(accelerator, model, optimizer, loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))       # accelerate divides the loss by 4
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()                                  # once per window: accelerate calls it then
            scheduler.step()
            optimizer.zero_grad()

:func:`prepare` wraps the optimizer in ``GradAccumulator(optimizer, None, reduction="sum")``: every backward's
gradient goes into fp32 master buffers from the parameters' hooks (``p.grad`` stays empty), and the one
``optimizer.step()`` accelerate lets through per window applies their sum, which is the gradient accelerate's own
accumulation would step with (its ``backward`` divides the loss by ``gradient_accumulation_steps``; a short last
window at the end of a prepared dataloader is stepped early, as accelerate does). Updates, scheduler steps, the
parameters (within float32 rounding), ``save_state``/``load_state`` and the returned norm are accelerate's.

What it changes on the ``accelerator`` object, and why (``p.grad`` is empty, so accelerate's own versions would
silently do nothing):

* ``clip_grad_norm_(params, max_norm)`` over the wrapper's parameters is routed to it: the clipping uses the
  window's fused norm and ``clip_grad_norm_``'s formula on the window's whole gradient. It returns a 0-dim tensor
  that receives the window's norm (before clipping) when ``optimizer.step()`` applies the window; it holds NaN
  until then, and stays NaN for a window skipped for an inf/NaN gradient. ``params`` must be all the wrapper's
  trainable parameters (or none of them: then accelerate's own method runs).
* ``clip_grad_value_`` over the wrapper's parameters is refused (the wrapper has no per-element clipping), as are
  ``unscale_gradients`` with fp16 (the wrapper unscales in its fused passes) and, distributed,
  ``trigger_sync_in_backward`` on the DDP model (DDP's reduction is off: the wrapper reduces once per window).

Multi-process (accelerate's DDP modes: ``MULTI_CPU`` under ``torchrun``, ``MULTI_GPU``, ...): the wrapper gets the
DDP model as ``ddp_module`` and all-reduces its fp32 masters once per window instead of DDP (whose per-backward
reduction it switches off; accelerate's ``no_sync`` inside ``accumulate()`` then keeps it off). The wrapper's
``reduction="sum"`` adds the ranks, where DDP averages them, so the update is divided by the number of processes
in the same pass as the clipping (DDP divides once per window too). DeepSpeed, FSDP, XLA and Megatron-LM are
refused. With ``mixed_precision="fp16"`` (off-CPU), accelerate's GradScaler drives the wrapper (``scaler.step(acc)``
+ ``scaler.update()`` once per window), and a window skipped for an overflow is reported to accelerate as skipped
(its scheduler does not step), as accelerate's own GradScaler step would.

See docs/accelerate.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

try:
    import accelerate
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from packaging.version import Version
except ImportError as error:  # an optional extra: fusedaccum itself never needs it
    raise ImportError(
        "fusedaccum.integrations.accelerate needs accelerate >= 1.1: pip install 'fusedaccum[integrations]'"
    ) from error

from ..accumulator import GradAccumulator

__all__ = ["MIN_ACCELERATE", "prepare"]

MIN_ACCELERATE = "1.1"
if Version(accelerate.__version__).release < Version(MIN_ACCELERATE).release:
    raise ImportError(
        f"fusedaccum.integrations.accelerate needs accelerate >= {MIN_ACCELERATE} (found {accelerate.__version__})"
    )

# accelerate's distributed types whose multi-process mode wraps the model in DistributedDataParallel (prepare_model),
# by value, so that a type an older accelerate lacks is no import error. The others shard or own the optimizer.
_DDP_TYPES = frozenset({"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                        "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"})
_NAME = "fusedaccum.integrations.accelerate"


def prepare(accelerator: Accelerator, *objects: Any, device_placement: list[bool] | None = None) -> Any:
    """``accelerator.prepare(*objects)``, with the one optimizer among ``objects`` accumulating in a
    :class:`~fusedaccum.GradAccumulator`.

    Pass what you would pass to ``accelerator.prepare``: the model (its parameters must be the optimizer's), the
    optimizer (a plain ``torch.optim.Optimizer``, not yet prepared), dataloaders, LR schedulers built on that
    optimizer, anything else accelerate prepares. The results come back in the same order, as from
    ``accelerator.prepare``. The returned optimizer is accelerate's ``AcceleratedOptimizer``; its ``.optimizer`` is
    the ``GradAccumulator`` (``.grad_norm``, ``.skipped_windows``, ``.stepped``), whose ``.optimizer`` is yours.

    The objects are prepared in two calls of ``accelerator.prepare``: first everything but the optimizer and the
    schedulers (so the model is on its device, and wrapped in DDP when distributed, before the wrapper allocates
    its masters and takes DDP's reduction over), then the wrapper and the schedulers.

    Args:
        accelerator: the ``Accelerator``; its ``gradient_accumulation_steps`` is the window.
        *objects: as for ``accelerator.prepare``; exactly one optimizer, and a model when distributed.
        device_placement: as for ``accelerator.prepare``: one bool per object, or None.

    Returns:
        The prepared objects, in order (one object alone is returned as itself, as accelerate does).

    Raises:
        TypeError / ValueError / RuntimeError: a setup the wrapper cannot serve exactly (a message says which and
            what to do), before anything is prepared.
    """
    _check_accelerator(accelerator)
    if device_placement is not None and len(device_placement) != len(objects):
        raise ValueError(
            f"{_NAME}: device_placement has {len(device_placement)} entries for {len(objects)} objects (one each)"
        )
    placement = list(device_placement) if device_placement is not None else [None] * len(objects)
    optimizer_at = _the_optimizer(objects)
    optimizer = objects[optimizer_at]
    multi = accelerator.num_processes > 1
    if multi and not any(isinstance(obj, torch.nn.Module) for obj in objects):
        raise ValueError(
            f"{_NAME}: pass the model together with the optimizer: distributed, the wrapper takes the DDP model "
            "accelerate makes of it (its reduction becomes the wrapper's)"
        )

    def is_scheduler(obj: Any) -> bool:
        return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)

    first = [i for i, obj in enumerate(objects) if i != optimizer_at and not is_scheduler(obj)]
    second = [optimizer_at] + [i for i, obj in enumerate(objects) if is_scheduler(obj)]
    result: list[Any] = list(objects)
    for i, prepared in zip(first, _prepare(accelerator, [objects[i] for i in first], [placement[i] for i in first])):
        result[i] = prepared

    ddp = _the_ddp_module([result[i] for i in first], optimizer) if multi else None
    acc = GradAccumulator(optimizer, None, reduction="sum", scaler=accelerator.scaler, ddp_module=ddp)
    objects_second = [acc] + [objects[i] for i in second[1:]]
    for i, prepared in zip(second, _prepare(accelerator, objects_second, [placement[i] for i in second])):
        result[i] = prepared
    accelerated = result[optimizer_at]
    if not (isinstance(accelerated, AcceleratedOptimizer) and accelerated.optimizer is acc):
        raise RuntimeError(f"{_NAME}: accelerate did not wrap the GradAccumulator in an AcceleratedOptimizer")
    _Glue(accelerator, acc, accelerated, ddp, accelerator.num_processes if multi else 1).install()
    return tuple(result) if len(result) > 1 else result[0]


def _check_accelerator(accelerator: Any) -> None:
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"{_NAME}: prepare() takes the Accelerator first, got {type(accelerator).__name__}")
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind not in _DDP_TYPES:
        raise ValueError(
            f"{_NAME}: accelerate's {kind} mode is not supported: it owns the optimizer step or the gradients' "
            "reduction itself (DeepSpeed, FSDP, XLA, Megatron-LM). The wrapper serves single-process runs and "
            "accelerate's DDP modes (MULTI_CPU, MULTI_GPU, ...)"
        )
    parallelism = getattr(accelerator, "parallelism_config", None)
    if parallelism is not None and (getattr(parallelism, "tp_enabled", False) or getattr(parallelism, "cp_enabled",
                                                                                         False)):
        raise ValueError(f"{_NAME}: tensor and context parallelism (parallelism_config) are not supported")
    if accelerator.num_processes == 1 and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            f"{_NAME}: torch.distributed runs {torch.distributed.get_world_size()} processes, but accelerate runs "
            "this one alone (distributed_type NO): every rank would train on its own. Under torchrun on CPUs, "
            "build the Accelerator with cpu=True (accelerate picks its MULTI_CPU mode only then)"
        )
    handler = getattr(accelerator, "ddp_handler", None)
    comm_hook = getattr(handler, "comm_hook", None)
    if accelerator.num_processes > 1 and comm_hook is not None and getattr(comm_hook, "value", comm_hook) != "no":
        raise ValueError(
            f"{_NAME}: DistributedDataParallelKwargs(comm_hook=...) is set, but the wrapper switches DDP's reduction "
            "off (it all-reduces its fp32 masters once per window), so the hook would never run. Remove it"
        )


def _the_optimizer(objects: tuple[Any, ...]) -> int:
    found = [i for i, obj in enumerate(objects) if isinstance(obj, torch.optim.Optimizer)]
    if len(found) != 1:
        raise ValueError(
            f"{_NAME}: prepare() takes exactly one optimizer, got {len(found)}; call it once per optimizer (each with "
            "its own model) or prepare the others with accelerator.prepare"
        )
    optimizer = objects[found[0]]
    if isinstance(optimizer, AcceleratedOptimizer):
        raise TypeError(
            f"{_NAME}: the optimizer was already prepared by accelerate; pass the plain optimizer (prepare() hands "
            "it to accelerator.prepare inside its GradAccumulator)"
        )
    if isinstance(optimizer, GradAccumulator):
        raise TypeError(
            f"{_NAME}: pass the plain optimizer, not a GradAccumulator: prepare() builds the wrapper accelerate needs "
            "(accumulation_steps=None: the Accelerator's gradient_accumulation_steps is the window; a wrapper with "
            "its own accumulation_steps would accumulate a second time, and update N times too rarely)"
        )
    return found[0]


def _prepare(accelerator: Accelerator, objects: list[Any], placement: list[bool | None]) -> list[Any]:
    if not objects:
        return []
    given = None if all(p is None for p in placement) else [accelerator.device_placement if p is None else p
                                                            for p in placement]
    prepared = accelerator.prepare(*objects, device_placement=given)
    return list(prepared) if len(objects) > 1 else [prepared]


def _the_ddp_module(prepared: list[Any], optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The DDP model accelerate made whose parameters the optimizer holds (the wrapper replaces its reduction)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    candidates = [obj for obj in prepared if isinstance(obj, torch.nn.Module)
                  and any(id(p) in held for p in obj.parameters())]
    if len(candidates) != 1 or not isinstance(candidates[0], torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"{_NAME}: distributed, exactly one of the prepared models must hold the optimizer's parameters and be "
            f"wrapped in DistributedDataParallel by accelerate; found {[type(c).__name__ for c in candidates]}"
        )
    return candidates[0]


class _Glue:
    """What ties one wrapper to one accelerator: the window's clipping request and the norms promised for it, the
    division by the number of processes, the skip reported to accelerate, and the accelerator methods rerouted."""

    def __init__(self, accelerator: Accelerator, acc: GradAccumulator, accelerated: AcceleratedOptimizer,
                 ddp: torch.nn.Module | None, world: int) -> None:
        self.accelerator = accelerator
        self.acc = acc
        self.accelerated = accelerated
        self.ddp = ddp
        self.world = world
        self.max_norm: float | None = None  # this window's clip_grad_norm_ request
        self.promised: list[torch.Tensor] = []  # the norms clip_grad_norm_ returned for this window
        self.last_norm: torch.Tensor | None = None
        self.skipped_seen = 0  # the wrapper's skipped_windows when its current step() began
        self.scaled = accelerator.scaler is not None
        if self.scaled and not hasattr(accelerated, "_accelerate_step_called"):
            # AcceleratedOptimizer learns of a GradScaler skip only through this flag (set when its optimizer's step
            # is called). GradScaler.step always calls the wrapper's step, which may skip the window itself.
            raise RuntimeError(
                f"{_NAME}: this accelerate ({accelerate.__version__}) has no AcceleratedOptimizer."
                "_accelerate_step_called; with fp16 a window the wrapper skips could not be reported to it"
            )

    def install(self) -> None:
        self.acc.optimizer.register_step_pre_hook(self._before_update)
        self.acc.register_step_pre_hook(self._before_step)
        self.acc.register_step_post_hook(self._after_step)
        self._reroute("clip_grad_norm_", self._clip_grad_norm_)
        self._reroute("clip_grad_value_", self._clip_grad_value_)
        if self.scaled:
            self._reroute("unscale_gradients", self._unscale_gradients)
        if self.ddp is not None:
            self._reroute("trigger_sync_in_backward", self._trigger_sync_in_backward)

    def _reroute(self, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Shadow ``accelerator.<name>`` on this instance; calls that do not concern this wrapper go to the method
        it shadows (accelerate's, or another wrapper's reroute)."""
        setattr(self.accelerator, name, make(getattr(self.accelerator, name)))

    # ------------------------------------------------------------------------------------- the window's end
    def _before_update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """The wrapped optimizer is about to apply the window (its grads are the wrapper's sum): divide by the
        processes, clip with the window's norm, hand the norm to what clip_grad_norm_ returned."""
        norm = self.acc.grad_norm
        if norm is None or norm is self.last_norm:
            raise RuntimeError(
                f"{_NAME}: the GradAccumulator did not publish this window's norm before its update (grad_norm is "
                "not new); this fusedaccum version does not match the integration"
            )
        self.last_norm = norm
        if self.world > 1:
            norm = norm / self.world  # the wrapper's norm is the ranks' sum's; DDP's mean has 1/world of it
        factor: float | torch.Tensor | None = 1.0 / self.world if self.world > 1 else None
        if self.max_norm is not None and math.isfinite(self.max_norm):
            # clip_grad_norm_'s arithmetic (torch.nn.utils.clip_grads_with_norm_), on the device, no host sync.
            coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
            factor = coef if factor is None else coef * factor
        if factor is not None:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
            for device, grads in by_device.items():
                torch._foreach_mul_(grads, factor.to(device) if isinstance(factor, torch.Tensor) else factor)
        for out in self.promised:
            out.copy_(norm)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.skipped_seen = self.acc.skipped_windows

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each step() of the wrapper (one per window under accelerate): the window is over."""
        skipped = self.acc.skipped_windows != self.skipped_seen
        if skipped and self.scaled:
            # As if GradScaler.step had not called the optimizer: accelerate then reports step_was_skipped and its
            # scheduler does not step (what it does when its own GradScaler skips).
            self.accelerated._accelerate_step_called = False
        self.max_norm = None
        self.promised = []  # filled by _before_update if the window was applied; NaN otherwise

    # ---------------------------------------------------------------------------------- rerouted methods
    def _mine(self, parameters: Iterable[torch.Tensor] | torch.Tensor) -> tuple[list[torch.Tensor], bool]:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        held = {id(p) for group in self.acc.param_groups for p in group["params"]}
        return params, any(id(p) in held for p in params)

    def _clip_grad_norm_(self, shadowed: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                            norm_type: float = 2) -> Any:
            params, mine = self._mine(parameters)
            if not mine:
                return shadowed(params, max_norm, norm_type=norm_type)
            if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or float(norm_type) != 2.0:
                raise ValueError(
                    f"{_NAME}: clip_grad_norm_(norm_type={norm_type!r}): the GradAccumulator measures the window's "
                    "2-norm only"
                )
            if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1:
                max_norm = max_norm.item()
            if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not float(max_norm) > 0:
                raise ValueError(f"{_NAME}: clip_grad_norm_: max_norm must be a number > 0, got {max_norm!r}")
            given = {id(p) for p in params if p.requires_grad}
            trainable = {id(p) for group in self.acc.param_groups for p in group["params"] if p.requires_grad}
            if given != trainable:
                raise ValueError(
                    f"{_NAME}: clip_grad_norm_ was given {len(given)} trainable parameter(s), {len(given & trainable)} "
                    f"of the GradAccumulator's {len(trainable)}: the wrapper clips the window's whole gradient, so "
                    "pass all of them (e.g. model.parameters()) or none"
                )
            self.max_norm = float(max_norm)
            out = torch.full((), math.nan, dtype=torch.float32, device=params[0].device)
            self.promised.append(out)
            return out

        return clip_grad_norm_

    def _clip_grad_value_(self, shadowed: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_value_(parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float) -> Any:
            params, mine = self._mine(parameters)
            if mine:
                raise RuntimeError(
                    f"{_NAME}: clip_grad_value_ cannot reach the GradAccumulator's gradients (they are in its fp32 "
                    "masters, p.grad is empty); clip by norm with accelerator.clip_grad_norm_, which is routed to it"
                )
            return shadowed(params, clip_value)

        return clip_grad_value_

    def _unscale_gradients(self, shadowed: Callable[..., Any]) -> Callable[..., Any]:
        def unscale_gradients(optimizer: Any = None) -> Any:
            if optimizer is None:  # accelerate's "all of them" (its clip_grad_norm_ asks so): all but this one
                return shadowed([o for o in self.accelerator._optimizers if o is not self.accelerated])
            chosen = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
            if any(o is self.accelerated or o is self.acc for o in chosen):
                raise RuntimeError(
                    f"{_NAME}: unscale_gradients on the GradAccumulator: it unscales in its fused passes (unscaling "
                    "twice would be wrong); accelerator.clip_grad_norm_ is routed to the wrapper and needs no unscale"
                )
            return shadowed(optimizer)

        return unscale_gradients

    def _trigger_sync_in_backward(self, shadowed: Callable[..., Any]) -> Callable[..., Any]:
        def trigger_sync_in_backward(model: torch.nn.Module) -> Any:
            if model is self.ddp:
                raise RuntimeError(
                    f"{_NAME}: trigger_sync_in_backward would make DDP all-reduce this backward on top of the "
                    "GradAccumulator's one reduction per window; drop it (the wrapper reduces at optimizer.step())"
                )
            return shadowed(model)

        return trigger_sync_in_backward
