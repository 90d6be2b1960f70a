"""GradAccumulator: wrap any ``torch.optim.Optimizer`` so that the large-batch loop does exact gradient accumulation.

The loop stays the one written for a large batch::

    acc = fusedaccum.GradAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=8)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        acc.step()            # adds the grads into fp32 masters; really steps on every 8th call
        acc.zero_grad()

Every micro-step is one fused pass per device (:func:`fusedaccum.ops.accumulate_`): the window's first
micro-step overwrites the masters (no zeroing pass), the last one multiplies by 1/W (``post_scale``) and measures
the squared norm (``sumsq``), every one sets a device flag on a non-finite grad (``found_inf``). The only host sync
is one read of that flag per window, when the update is due. This module knows nothing about kernels beyond
:mod:`fusedaccum.ops`; the mechanics of collectives and of DDP/FSDP2 setups live in :mod:`fusedaccum.distributed`.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import backends, ops
from .distributed import (
    FIRST_BUCKET_ELEMENTS,
    BucketedAllReduce,
    agree_across_shards,
    as_param_grad,
    check_ddp_params_covered,
    check_fsdp_module,
    fsdp_mesh_group,
    local_grad,
    local_part,
    reduce_late,
    resolve_process_group,
)

__all__ = ["GradAccumulator", "MasterGradBuffer"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_KEY = "fusedaccum"
_STATE_VERSION = 1
# Bounds the scratch memory of the rare "scale the masters without a new grad" pass (see _scale_masters_only_).
_ZERO_CHUNK_ELEMENTS = 1 << 22
# Default all-reduce bucket size, DDP's default: large enough that per-collective latency is amortised, small enough
# that several buckets of a large model are in flight at once.
DEFAULT_BUCKET_CAP_MB = 25.0

GroupKey = tuple[torch.device, torch.dtype]
_VIEW_ALIGNMENT_ELEMENTS = 4  # float32 elements per 16 bytes: see _aligned
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# Distributed weighted windows add the ranks' raw sums of w * grad: weights are kept where those products stay normal.
_DISTRIBUTED_WEIGHT_MIN, _DISTRIBUTED_WEIGHT_MAX = 2.0**-40, 2.0**40
# The fields of a saved "fusedaccum" entry and their types (checked before anything is loaded).
_SAVED_FIELDS: dict[str, tuple[type, ...]] = {
    "accumulation_steps": (int,),
    "reduction": (str,),
    "master_weights": (bool,),
    "micro_step": (int,),
    "weight_sum": (float, int),
    "weighted": (bool, type(None)),
    "stepped": (bool,),
    "skipped_windows": (int,),
    "grad_norm": (torch.Tensor, type(None)),
    "found_inf": (bool,),
    "layout": (dict,),
    "touched": (list,),
    "master_grads": (list,),
    "master_weight_tensors": (dict,),
}


class MasterGradBuffer(NamedTuple):
    """One flat float32 master-gradient buffer: every parameter of one (device, dtype) in parameter order.

    ``buffer[offsets[i] : offsets[i] + params[i].numel()]`` is ``params[i]``'s master gradient (a later
    per-bucket all-reduce or accumulate-during-backward mode addresses it through these offsets).
    """

    device: torch.device
    param_dtype: torch.dtype
    buffer: torch.Tensor
    params: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]


@dataclass
class _Entry:
    """A trainable parameter and where its float32 master gradient (and master weight) live."""

    param: torch.Tensor
    position: int  # index in the flattened param_groups order (what state dicts compare)
    key: GroupKey
    offset: int
    view: torch.Tensor  # float32 master gradient, the param's shape, a view of its group's buffer
    master_weight: torch.Tensor | None  # float32 copy of a bf16/fp16 param when master_weights=True
    version: int  # param._version when master_weight was last known to match the param
    index: int  # position in the wrapper's entry list (what _touched and the bucket plan are indexed by)


class _Walk(NamedTuple):
    """The params as _collect_grads last walked them, and each one's entry (None: not trainable)."""

    params: list[torch.Tensor]  # the param_groups' params, flattened
    group_sizes: list[int]
    requires_grad: list[bool]
    entry_at: list[_Entry | None]

    def same_params(self, groups: list[dict[str, Any]], params: list[torch.Tensor]) -> bool:
        """Whether ``params`` (flattened from ``groups``) are these, in these groups, with the same
        requires_grad: then the trainable set is the same unless a param without an entry got a grad. (The group
        sizes mirror _layout_signature, so the reused walk never leaves the signature stale.)"""
        return (
            len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and [len(g["params"]) for g in groups] == self.group_sizes
            and [p.requires_grad for p in params] == self.requires_grad
        )


class GradAccumulator(torch.optim.Optimizer):
    """Turns ``accumulation_steps`` micro-batches into one exact large-batch update of ``optimizer``.

    It is an Optimizer to the ecosystem: ``param_groups``, ``state`` and ``defaults`` *are* the wrapped
    optimizer's (the same objects, so a learning-rate scheduler built on the wrapper drives the wrapped
    optimizer), and ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` behave as
    usual. Call ``loss.backward(); acc.step(); acc.zero_grad()`` on every micro-batch.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer`` except LBFGS, whose step re-evaluates
            the loss, and SparseAdam, which needs sparse gradients).
        accumulation_steps: micro-batches per update (an int >= 1).
        reduction: ``"mean"`` (default): the update uses the mean of the window's micro-batch gradients, or
            the weighted mean ``sum(w_i g_i) / sum(w_i)`` when ``step(weight=w_i)`` is given. ``"sum"``: the
            (weighted) sum.
        master_weights: keep float32 copies of bf16/fp16 parameters; the wrapped optimizer steps those (its state
            is float32) and one cast-copy per update writes them back. Without it, bf16/fp16 parameters receive
            their float32 master gradient rounded once to their dtype at the update.
        max_grad_norm: clip the window's gradient to this total 2-norm (``torch.nn.utils.clip_grad_norm_``
            semantics) using the norm measured in the last micro-step's fused pass.
        backend: the :mod:`fusedaccum.ops` backend (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``);
            default: ``$FUSEDACCUM_BACKEND``, else the fastest for the parameters' device.
        scaler: a ``torch.amp.GradScaler`` whose ``scale(loss)`` produced the gradients. The wrapper unscales
            them in the fused pass with the scaler's device scale (no host sync), skips a window in which any
            micro-step overflowed, and calls ``scaler.update()`` once per window itself. Do not call
            ``scaler.step``, ``scaler.unscale_`` or ``scaler.update`` yourself.
        process_group: ``None`` (default): single process, no communication. ``"default"`` (the default
            torch.distributed group) or a ``ProcessGroup``: data-parallel training. No collective runs on a
            window's non-final micro-steps; on its last one (and in :meth:`flush`) the ranks all-reduce (SUM)
            each flat float32 master buffer once, in buckets of ``bucket_cap_mb`` issued together, plus one small
            float64 tensor (the inf flags, the weight sums, which params got a gradient), and divide by the
            global weight sum: the update is the mean over world size x window (or the global weighted mean;
            ``reduction="sum"``: the global sum), every rank skips the same windows, and the clipping norm is the
            global one. Every rank must call :meth:`step` and :meth:`flush` equally often (they are collective)
            with the same settings and parameter layout. See docs/distributed.md.
        ddp_module: the ``DistributedDataParallel`` module that wraps the model whose parameters ``optimizer``
            holds. The wrapper switches off DDP's per-backward gradient all-reduce for good (as if every
            backward ran under ``ddp_module.no_sync()``; its reduction is replaced by the wrapper's one per
            window) and uses DDP's process group unless ``process_group`` is given (then it must be the same).
            A DDP model must be passed here: otherwise DDP averages on every backward and the wrapper would
            average again (weighted windows would come out wrong).
        bucket_cap_mb: distributed only: the master buffers are all-reduced in contiguous slices of at most this
            many MiB (default 25, as DDP), all issued asynchronously before any is waited on, so the backend can
            work on several at once. Results do not depend on it beyond float rounding of the sums.
        accumulate_in_backward: add each parameter's gradient into its master the moment
            autograd finishes it (a ``register_post_accumulate_grad_hook`` per trainable param) and set its
            ``.grad`` to None right there, so at most one parameter's bf16/fp16 gradient is alive at a time: peak
            gradient memory is the 4 B/param masters instead of masters + the model's gradients (6 B/param for
            bf16). The cost: one :func:`fusedaccum.ops.accumulate_` call (one launch on CUDA) per parameter per
            backward instead of one per device per micro-step. The maths is the default mode's, bit for bit (the
            clipping norm is summed per parameter, so it can differ in its last bits). ``step()`` then only counts
            the micro-step and applies the update when due. Because the window's last micro-step scales by 1/W
            inside backward, a weight must be known before backward: ``step(weight=...)`` is refused in this mode
            (use the default mode for weighted windows). Several backwards before one ``step()`` form one
            micro-step, as in the default mode. With ``process_group``/``ddp_module`` it also overlaps the
            window's reduction with its last backward, as DDP does: each bucket's all-reduce is issued from the
            hooks as soon as every parameter in it has its final sum (the first bucket, the end of the buffer,
            at most 1 MiB), and what is left when the backward ends (a param without a grad on this rank) is
            issued then; the masters and the update are the default distributed mode's, bit for bit (unless a
            second backward in the last micro-step adds to a bucket already issued: that grad is all-reduced
            separately at ``step()``, which rounds the sum differently).
        fsdp_module: the module ``torch.distributed.fsdp.fully_shard`` was applied to (the root), when the
            optimizer holds FSDP2's sharded parameters. FSDP keeps reduce-scattering (and averaging over ranks)
            every backward's gradient; the wrapper accumulates each rank's float32 gradient shards (masters of
            1/world the size), and per window one small all-reduce over the mesh makes the inf/NaN skip and the
            clipping norm global. Every trainable parameter must be sharded on the same 1-D mesh. With
            ``accumulate_in_backward`` each shard goes into its master from FSDP's post-reduce-scatter hook call.
            Not with ``process_group``/``ddp_module``, ``master_weights`` (use
            ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``: the float32 shards are the master weights) or
            ``step(weight=...)``. Use ``MixedPrecisionPolicy(reduce_dtype=torch.float32)`` so that the
            reduce-scatter itself does not sum in bf16. See docs/distributed.md.

    Raises:
        TypeError / ValueError: bad arguments; nothing is created.
    """

    # GradScaler.step(opt) checks this and then hands the optimizer grad_scale/found_inf attributes instead of
    # unscaling the grads in place; the wrapper uses that hook only to refuse the call with a clear message (the
    # scaler must be updated once per window, which scaler.step + scaler.update per micro-batch cannot do).
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
        if isinstance(optimizer, GradAccumulator):
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
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral):
            raise TypeError(f"fusedaccum: accumulation_steps must be an int, got {accumulation_steps!r}")
        if accumulation_steps < 1:
            raise ValueError(f"fusedaccum: accumulation_steps must be >= 1, got {accumulation_steps}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"fusedaccum: reduction must be 'mean' or 'sum', got {reduction!r}")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
                raise TypeError(f"fusedaccum: max_grad_norm must be a number or None, got {max_grad_norm!r}")
            if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
                raise ValueError(f"fusedaccum: max_grad_norm must be finite and > 0, got {max_grad_norm}")
        if backend is not None and backend not in backends.BACKENDS:
            raise ValueError(f"fusedaccum: unknown backend {backend!r}; choose one of {backends.BACKENDS}")
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

        # Not Optimizer.__init__: that would build a second set of param_groups. What it sets up for the base
        # methods (hooks, profiling names, the step wrapper) is set up here.
        self._inner = optimizer
        self._accumulation_steps = int(accumulation_steps)
        self._reduction = reduction
        self._master_weights = bool(master_weights)
        self._max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._backend = backend
        self._scaler = scaler
        self._distributed = distributed
        self._group = group  # None with distributed=True means torch.distributed's default group
        # FSDP2: the params are DTensor shards and FSDP reduce-scatters every backward's gradient itself; the
        # wrapper accumulates the local shards and agrees with the other shards' ranks on the skip and the norm.
        self._fsdp = fsdp_module is not None
        self._shard_group: Any = None  # the params' mesh group (set by _sync_layout)
        # Distributed: the window's bucketed all-reduce of the masters. float32 elements per bucket: at least one, so
        # a tiny cap still makes progress.
        self._bucket_elements = max(1, int(bucket_cap_mb * 2**20) // 4)
        self._reducer = BucketedAllReduce(group, self._bucket_elements) if distributed else None
        # OrderedDicts as in Optimizer.__init__: the handles register_*_hook returns keep weak references to them.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._register_inner_state_dict_hooks()

        # Window state.
        self._micro_step = 0
        self._weight_sum = 0.0
        self._weight_ref = 1.0  # the window's reference weight: see _weight_ref_for
        self._weighted: bool | None = None  # whether this window's micro-steps pass weight= (all or none)
        self._stepped = False
        self._skipped_windows = 0
        self._grad_norm: torch.Tensor | None = None
        # accumulate_in_backward state: the hooks' handles, the params (by id) whose grad a hook consumed since the
        # last step() (this micro-step's; on the last micro-step their masters are final: post-scaled, in sumsq),
        # whether sumsq must be recomputed (a param got a second grad in the last micro-step), and the inverse loss
        # scale of this micro-step (read once per micro-step, on the device).
        self._in_backward = accumulate_in_backward
        self._hook_handles: dict[int, tuple[torch.Tensor, Any]] = {}  # id(param) -> (param, handle)
        self._fresh: set[int] = set()
        self._sumsq_stale = False
        self._hook_scale: float | torch.Tensor | None = None
        # Autograd runs the hooks of CPU params on the thread that called backward and those of each CUDA device on
        # that device's thread: with params on several devices, hooks run concurrently. They share the window's
        # bookkeeping (and the bucket issue order, which every rank must follow), so they take turns.
        self._hook_lock = threading.Lock()
        # Distributed accumulate_in_backward: grads that arrived in the last micro-step after their bucket's
        # all-reduce had been issued, by entry index (reduced separately at step(): distributed.reduce_late).
        self._late: dict[int, torch.Tensor] = {}

        # Layout (built from the param_groups; rebuilt when they change).
        self._signature: tuple[int, ...] = ()
        self._entries: list[_Entry] = []
        self._by_param: dict[int, _Entry] = {}
        self._buffers: dict[GroupKey, torch.Tensor] = {}
        self._touched: list[bool] = []  # per entry: got a grad in the current window
        self._found_inf: dict[torch.device, torch.Tensor] = {}
        self._sumsq: dict[torch.device, torch.Tensor] = {}
        self._walk: _Walk | None = None  # what _collect_grads needs to know the layout is unchanged
        self._sync_layout(force=True)
        if ddp_module is not None:
            check_ddp_params_covered(ddp_module, self._inner)
            # no_sync() for good: DDP's forward then skips the reducer (no per-backward all-reduce, no
            # unused-parameter or buffer collectives) and .grad holds this rank's own gradient.
            ddp_module.require_backward_grad_sync = False

    # ------------------------------------------------------------------------------------- Optimizer facade
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's ``param_groups`` (the same list)."""
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's ``state`` (with ``master_weights=True`` keyed by the float32 master weights)."""
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``defaults``."""
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per update."""
        return self._accumulation_steps

    @property
    def stepped(self) -> bool:
        """Whether the last :meth:`step` (or :meth:`flush`) applied an update: step LR schedulers when it is True."""
        return self._stepped

    @property
    def micro_step(self) -> int:
        """Micro-steps accumulated in the current window (0 right after an update)."""
        return self._micro_step

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """Total 2-norm of the last applied window's gradient, before clipping: a device tensor (no host sync)."""
        return self._grad_norm

    @property
    def skipped_windows(self) -> int:
        """How many windows were dropped because a gradient was inf or nan."""
        return self._skipped_windows

    def master_grad_buffers(self) -> list[MasterGradBuffer]:
        """The flat float32 master-gradient buffers, one per (device, param dtype), parameters in order.

        Between updates they hold the window's partial sums; only the regions of parameters that received a
        gradient in the current window are meaningful.
        """
        out = []
        for key, buffer in self._buffers.items():
            entries = [e for e in self._entries if e.key == key]
            out.append(
                MasterGradBuffer(
                    key[0], key[1], buffer, tuple(e.param for e in entries), tuple(e.offset for e in entries)
                )
            )
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Everything (copy.deepcopy / pickle of the model and the wrapper together keeps a half-finished window),
        # except a step wrapper an LR scheduler put on this instance: it points at the original object.
        state = self.__dict__.copy()
        state.pop("step", None)
        # Hook handles point at the original params; a copy registers its own on its params (__setstate__).
        state["_hook_handles"] = {}
        state["_hook_scale"] = None
        state["_hook_lock"] = None  # locks do not copy; __setstate__ makes a fresh one
        state["_walk"] = None  # holds the original params; the copy's first step rebuilds it
        state["_inner_hook_handles"] = []  # the wrapped optimizer's copy has no hooks; __setstate__ adds them
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hook_lock = threading.Lock()
        # The lookups are keyed by object identity, which a copy changes.
        self._by_param = {id(e.param): e for e in self._entries}
        self._signature = self._layout_signature([(e.position, e.param) for e in self._entries])
        self._patch_step_function()
        self._register_inner_state_dict_hooks()
        self._register_hooks()

    def __repr__(self) -> str:
        return (
            f"GradAccumulator({self._inner!r}, accumulation_steps={self._accumulation_steps}, "
            f"reduction={self._reduction!r}, master_weights={self._master_weights}, "
            f"max_grad_norm={self._max_grad_norm}, backend={self._backend!r}, "
            f"distributed={self._distributed}, accumulate_in_backward={self._in_backward})"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer; works mid-window (new params join from now on)."""
        self._refuse_under_way("add_param_group() was called", undo=False)
        groups = self._inner.param_groups
        count = len(groups)
        self._inner.add_param_group(param_group)
        try:
            self._sync_layout()
        except BaseException:
            del groups[count:]  # refused (e.g. float64 params): the wrapped optimizer must not keep the group
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``. :meth:`step` already consumes (sets to None) the grads it reads, so in the
        documented loop this finds nothing to do; it stays so the large-batch loop needs no change."""
        torch.optim.Optimizer.zero_grad(self, set_to_none)

    # ------------------------------------------------------------------------------------------------ step
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None, *, weight: float | torch.Tensor | None = None) -> Any:
        """Accumulate this micro-batch's gradients; apply the update when the window is full.

        Reads every parameter's ``.grad`` into its float32 master in one fused pass and sets ``.grad`` to None
        (the gradient has moved into the master). On the window's last micro-step it checks for non-finite
        gradients (one host sync), clips if asked, and steps the wrapped optimizer with the window's mean.

        Args:
            closure: optional; called (with grad enabled) before accumulating, it must run this micro-batch's
                forward and backward and return its loss.
            weight: this micro-batch's weight ``w_i`` (e.g. its token count): the window's gradient becomes
                ``sum(w_i g_i) / sum(w_i)``. Give it on every micro-step of a window or on none. A number; a
                tensor works but costs a host sync per micro-step.

        Returns:
            The closure's loss if a closure was given; else what the wrapped optimizer's ``step()`` returned on an
            update micro-step, and None otherwise.

        Raises:
            ValueError / TypeError: bad weight, sparse or non-float gradients, weights given on only some
                micro-steps of a window; ``weight=`` with ``accumulate_in_backward=True``. RuntimeError: the update
                is due but no parameter received a gradient in the whole window; ``scaler.step(acc)`` or
                ``scaler.unscale_(acc)`` was used. After any of these nothing has changed (the grads are still in
                ``.grad``; with ``accumulate_in_backward=True`` the hooks have already added them to the masters,
                and the next successful ``step()`` counts them).
        """
        self._refuse_grad_scaler_step()
        if closure is not None and not callable(closure):
            raise TypeError(f"fusedaccum: closure must be a callable or None, got {closure!r}")
        if self._in_backward and weight is not None:
            raise ValueError(
                "fusedaccum: step(weight=...) cannot be used with accumulate_in_backward=True: the hooks scale the "
                "window's last micro-step by 1/sum(weights) during backward, before step() could give its weight. "
                "Use the default mode (accumulate_in_backward=False) for weighted windows"
            )
        if self._fsdp and weight is not None:
            raise ValueError(
                "fusedaccum: step(weight=...) cannot be used with fsdp_module: FSDP averages each micro-batch's "
                "gradient over the ranks in its reduce-scatter, before step() sees it, so per-rank weights cannot be "
                "applied afterwards. Weight the loss instead (loss * w * world_size / global weight sum) with "
                "reduction='sum'"
            )
        w = self._check_weight(weight)
        self._check_weighting(weight is not None)
        ref = self._weight_ref_for(w, weight is not None)
        self._check_scaler_ready()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._collect_grads()
        last = self._micro_step + 1 == self._accumulation_steps
        # Distributed: whether any rank got a gradient is only known after the reduction (a local raise here would
        # leave the other ranks waiting in it); _reduce_and_finish raises on every rank instead.
        if last and not self._distributed and not grads and not any(self._touched):
            where = f"micro-step {self._micro_step + 1} of {self._accumulation_steps}"
            raise RuntimeError(self._no_grads_message(where))

        # One accumulate_ call per (device, whether it is the param's first grad of the window). A lone call
        # validates all its tensors before writing any (fusedaccum.ops), so a bad micro-step (e.g. two params
        # sharing one grad tensor) changes nothing; with several calls a failure in a later one would leave a
        # half-done micro-step, so they are all checked together first. The common case is one call (every
        # param first, or none): no second validation pass (~40 us for GPT-2's 150 tensors on the 2-core CI CPU).
        calls = self._accumulate_calls(grads)
        if len(calls) > 1 or (self._in_backward and grads):
            by_device: dict[torch.device, list[tuple[_Entry, torch.Tensor]]] = {}
            for entry, grad in grads:
                by_device.setdefault(entry.key[0], []).append((entry, grad))
            with self._naming_shared_grads(grads):
                for device, pairs in by_device.items():
                    ops.check_accumulate_args([e.view for e, _ in pairs], [g for _, g in pairs], zero_grads=False,
                                              found_inf=self._found_inf[device], sumsq=self._sumsq[device])
        if self._in_backward:
            self._stepped = False
            self._weighted = weight is not None
            return self._count_hooked_micro_step(grads, last, loss, closure is not None)
        # Distributed: the masters hold raw (weighted) sums until the reduction; the 1/global-weight-sum and the
        # norm are applied once, after it (dividing locally first would be wrong when ranks' weight sums differ).
        local_last = last and not self._distributed
        # w: this micro-step's weight, not yet counted; ref: the window's reference weight (see _weight_ref_for).
        post_scale = self._post_scale(w, ref) if local_last else 1.0
        scale = self._micro_scale(w / ref)
        if local_last:
            self._zero_sumsq()  # scratch for this pass: a refused call below leaves nothing that matters
        with self._naming_shared_grads(grads):
            for device, overwrite, masters, grad_list in calls:
                if isinstance(scale, torch.Tensor):
                    scale = scale.to(device, non_blocking=True)
                ops.accumulate_(
                    masters, grad_list, scale, overwrite=overwrite, post_scale=post_scale, zero_grads=False,
                    found_inf=self._found_inf[device], sumsq=self._sumsq[device] if local_last else None,
                    backend=self._backend,
                )

        # The grads are in the masters: from here on, the window's state changes.
        self._stepped = False
        self._weighted = weight is not None
        self._weight_sum += w
        self._weight_ref = ref
        touched = self._touched
        for entry, _ in grads:
            entry.param.grad = None  # consumed: the next backward writes a fresh grad, no zeroing pass needed
            touched[entry.index] = True
        if local_last:
            # Params that got a grad earlier in the window but not now still need the 1/W and the norm.
            fresh = {id(entry) for entry, _ in grads}
            lagging = [e for e, t in zip(self._entries, self._touched) if t and id(e) not in fresh]
            self._scale_masters_only_(lagging, post_scale)
        self._micro_step += 1
        result = self._finish_if_last(last)
        return loss if closure is not None else result

    def _finish_if_last(self, last: bool) -> Any:
        """The update, on a window's last micro-step (already counted). If it raises, the window is dropped: its
        masters were scaled for this update and the grads consumed, so it cannot be replayed, and a window left at
        micro_step == accumulation_steps would never update again."""
        if not last:
            return None
        try:
            return self._reduce_and_finish() if self._distributed else self._finish_window()
        except BaseException as error:
            if self._micro_step:
                self._reset_window()
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note("fusedaccum: the update failed; the window was dropped (the next step() starts "
                                   "a new one)")
            raise

    @contextmanager
    def _naming_shared_grads(self, grads: list[tuple[_Entry, torch.Tensor]]) -> Iterator[None]:
        """The op refuses grads that overlap as "grads[i] and grads[j] overlap", indices of its own call; when two
        params were handed one .grad tensor, name the params instead. Costs nothing unless the op refused."""
        try:
            yield
        except ValueError:
            seen: dict[int, _Entry] = {}
            for entry, grad in grads:
                other = seen.setdefault(grad.data_ptr(), entry)
                if other is not entry and grad.numel():
                    groups = self._inner.param_groups
                    raise ValueError(
                        f"fusedaccum: {_param_name(groups, other.position)} and "
                        f"{_param_name(groups, entry.position)} have one .grad tensor (their gradients overlap in "
                        "memory); give each parameter a gradient of its own. Nothing was changed"
                    ) from None
            raise

    def _count_hooked_micro_step(
        self, grads: list[tuple[_Entry, torch.Tensor]], last: bool, loss: Any, has_closure: bool
    ) -> Any:
        """step() with accumulate_in_backward: the hooks already added this micro-step's grads; count it, finish
        the window's last micro-step and apply the update when due."""
        # Grads no hook consumed (a param that became trainable after the last layout sync, a .grad set by hand)
        # take the hooks' path: per param, so one already final in this last micro-step is handled too.
        for entry, grad in grads:
            self._accumulate_in_hook_(entry, grad)
        if last and not self._distributed:  # distributed: the 1/W and the norm come after the reduction
            post_scale = self._post_scale(1.0)
            if not self._fresh:
                self._zero_sumsq()  # no grad at all this micro-step: sumsq still holds the previous window's norm²
            lagging = [e for e, t in zip(self._entries, self._touched) if t and id(e.param) not in self._fresh]
            self._scale_masters_only_(lagging, post_scale)
            if self._sumsq_stale:
                # A param got a second grad after its master was final: its sumsq term is out of date. Recount all
                # (post_scale 1 leaves the masters as they are); rare, one read+write pass.
                self._zero_sumsq()
                self._scale_masters_only_(self._touched_entries(), 1.0)
        self._weight_sum += 1.0
        self._micro_step += 1
        self._fresh.clear()
        self._sumsq_stale = False
        self._hook_scale = None  # the scaler may be updated (end of window) or reloaded before the next backward
        result = self._finish_if_last(last)
        return loss if has_closure else result

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
        self._refuse_grad_scaler_step()
        self._refuse_uncounted_backward("flush()")
        if self._distributed:
            # Collective: a rank with an empty window still takes part (it contributes zeros and weight 0).
            self._sync_layout()
            self._stepped = False
            self._reduce_and_finish()
            self._mark_update_for_schedulers()
            return self._stepped
        if self._micro_step == 0:
            self._stepped = False
            return False
        self._sync_layout()
        if not any(self._touched):
            raise RuntimeError(self._no_grads_message(f"flush() after {self._micro_step} micro-steps"))
        self._stepped = False
        self._zero_sumsq()
        self._scale_masters_only_(self._touched_entries(), self._post_scale())
        self._finish_window()
        self._mark_update_for_schedulers()
        return self._stepped

    def _mark_update_for_schedulers(self) -> None:
        # An LR scheduler built on this wrapper warns "lr_scheduler.step() before optimizer.step()" unless its
        # wrapper around step() has set _opt_called; an update applied by flush() (e.g. the first one after a
        # resume) must count as well.
        if self._stepped:
            self._opt_called = True

    # --------------------------------------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"fusedaccum"`` entry: the window position, the weights
        so far, the float32 master gradients (and master weights), the skipped-window count.

        Like ``Optimizer.state_dict``, tensors are references: ``torch.save`` it (or deep-copy it) before training
        on. Reading the window's inf flag costs one host sync.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._refuse_uncounted_backward("state_dict()")
        self._sync_layout()
        if self._master_weights:
            self._refresh_master_weights()  # a param changed since the last update must be saved as it is now
        state = self._inner.state_dict()  # with master_weights, its hooks show it the float32 master weights
        found = self._combined(self._found_inf)
        state[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "accumulation_steps": self._accumulation_steps,
            "reduction": self._reduction,
            "master_weights": self._master_weights,
            "micro_step": self._micro_step,
            "weight_sum": self._weight_sum,
            "weight_ref": self._weight_ref,
            "weighted": self._weighted,
            "stepped": self._stepped,
            "skipped_windows": self._skipped_windows,
            "grad_norm": self._grad_norm,
            "found_inf": bool(found.item()) if found is not None else False,
            "layout": self._layout_description(),
            "touched": list(self._touched),
            "master_grads": list(self._buffers.values()),
            "master_weight_tensors": {
                i: e.master_weight for i, e in enumerate(self._entries) if e.master_weight is not None
            },
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a plain state dict of the wrapped optimizer's type, which starts a fresh
        window). Saved at any micro-step, training continues bit-identically.

        Raises:
            ValueError: the state dict comes from another parameter layout (shapes, dtypes, which params are
                trainable, group sizes), or mid-window from another accumulation_steps/reduction, or from another
                master_weights setting. Nothing changes.
        """
        self._refuse_under_way("load_state_dict() was called", undo=False)
        if not isinstance(state_dict, dict):
            raise TypeError(f"fusedaccum: load_state_dict expects a dict, got a {type(state_dict).__name__}")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        inner_state = dict(state_dict)
        ours = inner_state.pop(_STATE_KEY, None)
        self._sync_layout()
        if ours is not None:
            self._check_loadable(ours)
        self._inner.load_state_dict(inner_state)  # with master_weights, its hooks show it the master weights
        if ours is None:
            self._reset_window()
        else:
            self._load_ours(ours)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loadable(self, ours: Any) -> None:
        """Every field of a saved "fusedaccum" entry, checked against its type, its range, the other fields and
        this wrapper's layout and settings, before anything is loaded: a refusal changes nothing."""
        if not isinstance(ours, dict):
            raise ValueError(
                f"fusedaccum: the state dict's {_STATE_KEY!r} entry must be a dict, got a {type(ours).__name__}"
            )
        if ours.get("version") != _STATE_VERSION:
            raise ValueError(f"fusedaccum: unknown GradAccumulator state version {ours.get('version')!r}")
        for name, kinds in _SAVED_FIELDS.items():
            if name not in ours:
                raise ValueError(f"fusedaccum: the state dict's {_STATE_KEY!r} entry has no {name!r} field")
            value = ours[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(
                    f"fusedaccum: the state dict's {_STATE_KEY}[{name!r}] is a {type(value).__name__}; expected "
                    f"{' or '.join('None' if k is type(None) else k.__name__ for k in kinds)}"
                )
        saved_layout = ours["layout"]
        current = self._layout_description()
        if saved_layout != current:
            try:
                difference = _first_difference(saved_layout, current)
            except (KeyError, TypeError, ValueError):
                difference = f"{saved_layout!r} saved vs {current!r} here"
            raise ValueError(
                "fusedaccum: this state dict comes from another parameter layout and cannot be loaded here: "
                f"{difference}"
            )
        if ours["master_weights"] != self._master_weights:
            raise ValueError(
                f"fusedaccum: the state dict was saved with master_weights={ours['master_weights']}, this wrapper "
                f"has master_weights={self._master_weights}"
            )
        micro_step, steps, weight_sum, weighted = (
            ours["micro_step"], ours["accumulation_steps"], ours["weight_sum"], ours["weighted"]
        )

        def refuse(what: str) -> None:
            raise ValueError(f"fusedaccum: the state dict's {_STATE_KEY!r} entry is inconsistent: {what}")

        if steps < 1:
            refuse(f"accumulation_steps={steps} (must be >= 1)")
        if not 0 <= micro_step < steps:
            refuse(f"micro_step={micro_step} with accumulation_steps={steps} (0 <= micro_step < accumulation_steps)")
        if ours["reduction"] not in ("mean", "sum"):
            refuse(f"reduction={ours['reduction']!r}")
        if ours["skipped_windows"] < 0:
            refuse(f"skipped_windows={ours['skipped_windows']}")
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
        ref = ours.get("weight_ref", 1.0)  # optional: absent from state dicts written before it existed
        if isinstance(ref, bool) or not isinstance(ref, (float, int)) or not (
            math.isfinite(ref) and ref > 0 and math.frexp(ref)[0] == 0.5
        ):
            refuse(f"weight_ref={ref!r} (must be a power of two)")
        if ref != 1.0 and not (micro_step > 0 and weighted):
            refuse(f"weight_ref={ref} outside a weighted window")
        touched = ours["touched"]
        if len(touched) != len(self._entries) or not all(isinstance(t, bool) for t in touched):
            refuse(f"'touched' must be {len(self._entries)} bools (one per trainable param), got {touched!r}")
        if micro_step == 0 and any(touched):
            refuse("params marked as touched at micro_step 0")
        norm = ours["grad_norm"]
        if norm is not None and (not norm.is_floating_point() or norm.numel() != 1):
            refuse(f"grad_norm must be a one-element float tensor, got {norm.dtype} of shape {tuple(norm.shape)}")
        masters = ours["master_grads"]
        if len(masters) != len(self._buffers):
            refuse(f"{len(masters)} master_grads buffers saved, this layout has {len(self._buffers)}")
        for i, (saved, buffer) in enumerate(zip(masters, self._buffers.values())):
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.float32 or saved.shape != buffer.shape:
                got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else type(saved).__name__
                refuse(f"master_grads[{i}] must be a float32 tensor of shape {tuple(buffer.shape)}, got {got}")
        expected = {i for i, e in enumerate(self._entries) if e.master_weight is not None}
        weights = ours["master_weight_tensors"]
        if {k for k in weights if isinstance(k, int)} != expected or len(weights) != len(expected):
            refuse(f"master_weight_tensors for params {sorted(weights, key=str)}, expected {sorted(expected)}")
        for i, saved in weights.items():
            shape = self._entries[i].param.shape
            if not isinstance(saved, torch.Tensor) or saved.dtype != torch.float32 or saved.shape != shape:
                got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else type(saved).__name__
                refuse(f"master_weight_tensors[{i}] must be a float32 tensor of shape {tuple(shape)}, got {got}")
        if micro_step and weighted and self._in_backward:
            raise ValueError(
                "fusedaccum: the state dict holds a half-finished weighted window (step(weight=...)); "
                "accumulate_in_backward=True cannot continue it (weights are refused in that mode). Load it at a "
                "window boundary or into a wrapper with accumulate_in_backward=False"
            )
        if micro_step and (steps != self._accumulation_steps or ours["reduction"] != self._reduction):
            raise ValueError(
                f"fusedaccum: the state dict holds a half-finished window of accumulation_steps="
                f"{steps}, reduction={ours['reduction']!r}; this wrapper has "
                f"{self._accumulation_steps}, {self._reduction!r}. Load it at a window boundary or with equal settings"
            )

    def _load_ours(self, ours: dict[str, Any]) -> None:
        for buffer, saved in zip(self._buffers.values(), ours["master_grads"]):
            buffer.copy_(saved)
        for index, saved in ours["master_weight_tensors"].items():
            entry = self._entries[int(index)]
            if entry.master_weight is not None:
                entry.master_weight.copy_(saved)
                # Not "in sync": the model may have been loaded (or changed) before or after this; the next update
                # compares the param with the rounded copy and keeps the copy only if they agree.
                entry.version = -1
        self._touched = [bool(t) for t in ours["touched"]]
        self._fresh.clear()
        self._sumsq_stale = False
        self._hook_scale = None
        self._micro_step = int(ours["micro_step"])
        self._weight_sum = float(ours["weight_sum"])
        self._weight_ref = float(ours.get("weight_ref", 1.0))  # absent before it existed: unnormalised masters
        self._weighted = ours["weighted"]
        self._stepped = bool(ours["stepped"])
        self._skipped_windows = int(ours["skipped_windows"])
        norm = ours["grad_norm"]
        self._grad_norm = None if norm is None else norm.detach().clone()
        for flag in self._found_inf.values():
            flag.fill_(1.0 if ours["found_inf"] else 0.0)

    # ------------------------------------------------------------------------------------------ internals
    def _refuse_grad_scaler_step(self) -> None:
        if "grad_scale" in self.__dict__ or "found_inf" in self.__dict__:
            # Set by GradScaler.step(acc) right before it calls us; it only deletes them after a successful step.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise RuntimeError(
                "fusedaccum: do not call scaler.step(acc) / scaler.update() on a GradAccumulator: the scale must "
                "change once per window, not per micro-batch. Pass the scaler to the wrapper, "
                "GradAccumulator(opt, N, scaler=scaler), and call scaler.scale(loss).backward(); acc.step() on "
                "every micro-batch; the wrapper unscales in its fused pass and calls scaler.update() per window"
            )

    def _refuse_uncounted_backward(self, what: str) -> None:
        if self._fresh:
            raise RuntimeError(
                f"fusedaccum: {what} was called after backward() but before acc.step(): with "
                "accumulate_in_backward=True that micro-batch's gradient is already in the masters but not yet "
                "counted as a micro-step. Call acc.step() first (nothing was changed)"
            )

    def _refuse_under_way(self, what: str, undo: bool) -> None:
        """accumulate_in_backward, distributed: from the window's last backward until its step() the master
        buffers belong to the reduction (bucketed all-reduces in flight, a layout the ranks agreed on)."""
        if self._reducer is not None and self._reducer.under_way:
            advice = (
                "undo that change, call acc.step() to finish the window, then make it"
                if undo else "call acc.step() first (nothing was changed)"
            )
            raise RuntimeError(
                f"fusedaccum: {what} between a window's last backward and its step(), while the all-reduce of the "
                f"master buffers is under way (accumulate_in_backward with process_group/ddp_module); {advice}"
            )

    def _check_scaler_ready(self) -> None:
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return
        if scaler._scale is None:
            raise RuntimeError(
                "fusedaccum: the GradScaler has no scale yet: call scaler.scale(loss).backward() before acc.step()"
            )
        stage = scaler._per_optimizer_states.get(id(self), {}).get("stage")
        if stage is not None and stage is not torch.amp.grad_scaler.OptState.READY:
            raise RuntimeError(
                "fusedaccum: scaler.unscale_(acc) was called; the wrapper unscales in its fused pass (unscaling "
                "twice would be wrong). Use GradAccumulator(max_grad_norm=...) to clip"
            )

    @staticmethod
    def _check_weight(weight: float | torch.Tensor | None) -> float:
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

    def _collect_grads(self) -> list[tuple[_Entry, torch.Tensor]]:
        """The (entry, dense contiguous grad) pairs of this micro-step; validates everything, changes nothing
        but the layout (which a new trainable param extends).

        It runs on every micro-step, and Python per param is what it costs: when the params, their groups and
        their requires_grad are the ones of the last micro-step (one pass of list comprehensions tells), the
        layout cannot have changed and the grads are paired with the entries of the last walk (with the single-call
        path of _accumulate_calls, step() for 2048 tiny params went from 4.8 to 3.4 ms, for 148 from 380 to 280 us:
        torch.utils.benchmark medians on the 2-core AMD EPYC CI machine)."""
        groups = self._inner.param_groups
        params = [p for g in groups for p in g["params"]]
        grads = [p.grad for p in params]
        walk = self._walk
        if walk is not None and walk.same_params(groups, params):
            out = self._pair_grads(walk, grads)
            if out is not None:
                return out
        # Something may have changed: check every grad before anything else changes, then the layout.
        for p, grad in zip(params, grads):
            if grad is not None:
                _check_grad(p, grad)
        trainable = self._trainable(params, grads)
        self._sync_layout(trainable=trainable)
        entry_at: list[_Entry | None] = [None] * len(params)
        for position, p in trainable:
            entry_at[position] = self._by_param[id(p)]
        self._walk = walk = _Walk(params, [len(g["params"]) for g in groups], [p.requires_grad for p in params],
                                  entry_at)
        out = self._pair_grads(walk, grads)
        assert out is not None, "every param with a grad is trainable, so it has an entry"
        return out

    def _pair_grads(self, walk: _Walk, grads: list[torch.Tensor | None]) -> list[tuple[_Entry, torch.Tensor]] | None:
        """The grads paired with the walk's entries, checked; None if a grad belongs to a param without an entry
        (a frozen param got one: the layout grows). Changes nothing."""
        fsdp = self._fsdp
        out = []
        for entry, p, grad in zip(walk.entry_at, walk.params, grads):
            if grad is None:
                continue
            if grad.layout is not torch.strided or grad.dtype not in _FLOAT_DTYPES:
                _check_grad(p, grad)  # raises, naming the param
            if entry is None:
                return None
            if fsdp:
                grad = local_grad(p, grad)
            out.append((entry, grad if grad.is_contiguous() else grad.contiguous()))
        return out

    def _check_weighting(self, weighted: bool) -> None:
        if self._micro_step > 0 and self._weighted is not None and self._weighted != weighted:
            raise ValueError(
                "fusedaccum: step(weight=...) must be given on every micro-step of a window or on none; this window "
                f"started {'with' if self._weighted else 'without'} weights"
            )

    @staticmethod
    def _no_grads_message(where: str) -> str:
        return (
            f"fusedaccum: the update is due ({where}) but no parameter received a gradient in the whole window; "
            "call loss.backward() before acc.step(). Refusing to apply an all-zero update (nothing was changed)"
        )

    def _post_scale(self, pending: float = 0.0, ref: float | None = None) -> float:
        # pending: the current micro-step's weight when it is not yet in _weight_sum (the hooks run before step()).
        # The masters hold sum(w_i / ref * g_i): the mean is ref / sum(w_i) times that, the sum ref times it.
        ref = self._weight_ref if ref is None else ref
        return ref / (self._weight_sum + pending) if self._reduction == "mean" else ref

    def _weight_ref_for(self, w: float, weighted: bool) -> float:
        """The window's reference weight: the masters accumulate (w_i / ref) g_i, so that weights anywhere in
        float32's normal range give float32 products that neither underflow nor overflow (1.2e-38 * g would be
        subnormal, 1e38 * g inf). A power of two, 2**floor(log2(w_1)) of the window's first weight: dividing by it
        is exact, and the update's bits are those of the unnormalised sum wherever that one neither under- nor
        overflows. 1 for unweighted windows, and distributed (the ranks' raw sums are added: they must share one
        unit, so the weights are limited instead). Raises before anything changes."""
        if self._micro_step > 0:
            ref = self._weight_ref
        elif not weighted or self._distributed:
            ref = 1.0
        else:
            ref = math.ldexp(1.0, math.frexp(w)[1] - 1)
        if self._distributed and weighted and not _DISTRIBUTED_WEIGHT_MIN <= w <= _DISTRIBUTED_WEIGHT_MAX:
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

    def _micro_scale(self, w: float) -> float | torch.Tensor:
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return w
        # Same reciprocal as GradScaler.unscale_ (in float64, then float32), kept on the device: no host sync.
        inv_scale = scaler._scale.double().reciprocal().float().reshape(1)
        return inv_scale * w if w != 1.0 else inv_scale

    def _touched_entries(self) -> list[_Entry]:
        """The params that received a gradient in the current window."""
        return [e for e, t in zip(self._entries, self._touched) if t]

    def _zero_sumsq(self) -> None:
        for t in self._sumsq.values():
            t.zero_()

    def _accumulate_calls(
        self, grads: list[tuple[_Entry, torch.Tensor]]
    ) -> list[tuple[torch.device, bool, list[torch.Tensor], list[torch.Tensor]]]:
        """The micro-step's accumulate_ calls: (device, overwrite, masters, grads). A param's first grad of the
        window overwrites its master, whatever micro-step that is: no zeroing pass, and no stale values from the
        previous window."""
        touched = self._touched
        devices = {key[0] for key in self._buffers}
        if grads and len(devices) == 1:
            # The common case, one device and every param at the same point of its window: one call, built
            # without a per-param dict lookup.
            firsts = [not touched[entry.index] for entry, _ in grads]
            if all(firsts) or not any(firsts):
                return [(devices.pop(), firsts[0], [entry.view for entry, _ in grads], [g for _, g in grads])]
        calls: dict[tuple[torch.device, bool], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for entry, grad in grads:
            first = not touched[entry.index]
            masters, grad_list = calls.setdefault((entry.key[0], first), ([], []))
            masters.append(entry.view)
            grad_list.append(grad)
        return [(device, first, masters, grad_list) for (device, first), (masters, grad_list) in calls.items()]

    def _scale_masters_only_(self, entries: list[_Entry], post_scale: float) -> None:
        """Multiply masters by ``post_scale`` and add their squares to sumsq, with no new gradient.

        Rare: a param absent from the window's last micro-step, or :meth:`flush`. ``accumulate_`` needs a grad
        list, so it gets zeros from one reusable bf16 scratch buffer (bounded size, several calls if needed).
        """
        by_device: dict[torch.device, list[_Entry]] = {}
        for e in entries:
            by_device.setdefault(e.key[0], []).append(e)
        for device, group in by_device.items():
            total = sum(e.view.numel() for e in group)
            size = max(min(total, _ZERO_CHUNK_ELEMENTS), max(e.view.numel() for e in group))
            zeros = torch.zeros(size, dtype=torch.bfloat16, device=device)
            masters: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            used = 0
            for e in group + [None]:
                n = 0 if e is None else e.view.numel()
                if masters and (e is None or used + n > size):
                    ops.accumulate_(
                        masters, grads, 1.0, post_scale=post_scale, zero_grads=False, sumsq=self._sumsq[device],
                        backend=self._backend,
                    )
                    masters, grads, used = [], [], 0
                if e is not None:
                    masters.append(e.view)
                    grads.append(zeros[used : used + n].view(e.view.shape))
                    used += n

    @staticmethod
    def _combined(per_device: dict[torch.device, torch.Tensor]) -> torch.Tensor | None:
        tensors = list(per_device.values())
        if not tensors:
            return None
        total = tensors[0].clone()
        for t in tensors[1:]:
            total += t.to(total.device, non_blocking=True)
        return total

    def _finish_window(self) -> Any:
        """The update of a complete window whose masters hold the final (scaled) gradient and sumsq its norm²."""
        found = self._combined(self._found_inf)
        sumsq = self._combined(self._sumsq)
        if self._shard_group is not None:  # FSDP: the skip and the norm over every rank's shards
            found, sumsq = agree_across_shards(found, sumsq, self._shard_group)
        norm = sumsq.sqrt()
        # Finite grads can still sum past float32's range in the masters: a non-finite norm skips the window too,
        # read in the same host sync as the flag.
        found = torch.maximum(found, (~torch.isfinite(sumsq)).to(found.dtype))
        coef = None
        probe = found
        if self._max_grad_norm is not None:
            # clip_grad_norm_'s arithmetic, on the device: coef = min(max_norm / (norm + 1e-6), 1).
            coef = torch.clamp(self._max_grad_norm / (norm + 1e-6), max=1.0)
            probe = torch.cat([found, coef])
        host = probe.tolist()  # the one host sync per window: skip or step must be decided on the host
        overflow = host[0] != 0.0
        if self._scaler is not None and self._scaler.is_enabled():
            self._update_scaler(found)
        if overflow:
            self._skipped_windows += 1
            self._reset_window()
            self._stepped = False
            return None
        self._grad_norm = norm.reshape(())
        if coef is not None and host[1] < 1.0:
            for key, buffer in self._buffers.items():
                # One op per buffer; regions of params without a grad this window are never read, so scaling them
                # too is harmless.
                buffer.mul_(coef.to(key[0], non_blocking=True))
        try:
            result = self._step_inner()
        finally:
            self._reset_window()
        self._stepped = True
        return result

    def _reduce_and_finish(self) -> Any:
        """Distributed end of a window: all-reduce the raw master sums and the window's metadata, then scale by
        the global weight sum (measuring the global norm) and finish the window as in a single process."""
        entries = self._entries
        for e, touched in zip(entries, self._touched):
            if not touched:
                # Its region may hold an earlier window's values (a first grad overwrites rather than adds); they
                # must not enter the sum when another rank did get a gradient for this param. (Never part of a
                # bucket already issued: those hold only params that got their final grad.)
                e.view.zero_()
        found = self._combined(self._found_inf)
        device = found.device
        # One small float64 SUM all-reduce carries everything the ranks must agree on (float64: token-count
        # weight sums stay exact to 2**53). Flags are 0/1 per rank, so "sum > 0" is the MAX (any rank) decision.
        n = len(entries)
        meta = torch.zeros(4 + n * (2 if self._in_backward else 1), dtype=torch.float64, device=device)
        meta[0] = found[0]
        meta[1] = self._weight_sum
        if self._micro_step:
            meta[2 if self._weighted else 3] = 1.0
        flags = [float(t) for t in self._touched]
        if self._in_backward:  # which params got a grad after their bucket had been issued (reduce_late)
            flags += [float(i in self._late) for i in range(n)]
        if flags:
            meta[4:] = torch.tensor(flags, dtype=torch.float64).to(device)
        # Every collective is issued before any is waited on: the backend can then work on several buckets at once
        # (gloo runs them on its worker threads; nccl queues them on its stream) instead of one round trip each.
        # With accumulate_in_backward the last backward's hooks have issued the buckets whose params were final
        # (BucketedAllReduce.param_final); this issues the rest, in the same plan order on every rank.
        self._reducer.issue_all()
        meta_work = dist.all_reduce(meta, op=dist.ReduceOp.SUM, group=self._group, async_op=True)
        self._reducer.wait_all()
        meta_work.wait()
        host = meta.tolist()  # host sync: skip/step and which params to hand the optimizer are host decisions
        overflow, weight_sum, n_weighted, n_unweighted = host[0] > 0, host[1], host[2], host[3]
        self._touched = [t > 0 for t in host[4 : 4 + n]]
        late = [i for i, t in enumerate(host[4 + n :]) if t > 0]
        if late:
            reduce_late([e.view for e in entries], self._late, late, self._group)
            self._late.clear()
        if n_weighted and n_unweighted:
            self._reset_window()
            raise ValueError(
                "fusedaccum: in this window some ranks passed step(weight=...) and others did not; weights must be "
                "given on every rank or on none (the window was dropped on every rank)"
            )
        if weight_sum == 0.0:  # flush() with every rank's window empty
            self._reset_window()
            return None
        if not any(self._touched):
            self._reset_window()
            raise RuntimeError(self._no_grads_message("on every rank") + " (the window was dropped on every rank)")
        self._weight_sum = weight_sum
        for flag in self._found_inf.values():
            flag.zero_()
        self._found_inf[device].fill_(1.0 if overflow else 0.0)
        self._zero_sumsq()
        if not overflow:  # a skipped window needs no scaling
            self._scale_masters_only_(self._touched_entries(), self._post_scale())
        return self._finish_window()

    def _update_scaler(self, found: torch.Tensor) -> None:
        # Hand GradScaler the window's inf flag the way its own step() would record it, then let its update()
        # apply its growth/backoff rule: once per window.
        scaler = self._scaler
        state = scaler._per_optimizer_states[id(self)]
        state["found_inf_per_device"] = {found.device: found.to(scaler._scale.device).reshape(())}
        state["stage"] = torch.amp.grad_scaler.OptState.STEPPED
        scaler.update()

    def _step_inner(self) -> Any:
        casts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        holders: list[torch.Tensor] = []
        for e in self._touched_entries():
            if e.master_weight is not None:
                e.master_weight.grad = e.view
                holders.append(e.master_weight)
                continue
            grad_dtype = getattr(e.param, "grad_dtype", e.param.dtype) or e.param.dtype
            grad = e.view
            if grad_dtype != torch.float32:
                # bf16/fp16 params without master weights: the float32 mean, rounded once to the param dtype.
                grad = torch.empty(e.view.shape, dtype=grad_dtype, device=e.view.device)
                casts[0].append(grad)
                casts[1].append(e.view)
            e.param.grad = as_param_grad(e.param, grad)
            holders.append(e.param)
        ops.copy_(*casts)
        if self._master_weights:
            self._refresh_master_weights()
        try:
            with self._inner_sees_master_weights():
                result = self._inner.step()
            if self._master_weights:
                self._write_back_master_weights()
        finally:
            for t in holders:
                t.grad = None
        return result

    def _refresh_master_weights(self) -> None:
        """A param changed outside the wrapper (e.g. model.load_state_dict) since its master weight was written:
        the param wins, unless it is just the master rounded (e.g. a checkpoint loaded in either order)."""
        for e in self._entries:
            if e.master_weight is not None and e.param._version != e.version:
                with torch.no_grad():
                    if not torch.equal(e.param, e.master_weight.to(e.param.dtype)):
                        e.master_weight.copy_(e.param)
                e.version = e.param._version

    def _write_back_master_weights(self) -> None:
        entries = [e for e in self._entries if e.master_weight is not None]
        contiguous = [e for e in entries if e.param.is_contiguous()]
        with torch.no_grad():
            ops.copy_([e.param for e in contiguous], [e.master_weight for e in contiguous])
            for e in entries:
                if not e.param.is_contiguous():
                    e.param.copy_(e.master_weight)
        for e in entries:
            e.version = e.param._version

    @contextmanager
    def _inner_sees_master_weights(self) -> Iterator[None]:
        """With master_weights, the wrapped optimizer's param_groups hold the float32 master weights inside this
        block (its step), and the model's params outside it."""
        self._swap_in_master_weights()
        try:
            yield
        finally:
            self._swap_out_master_weights()

    def _swap_in_master_weights(self) -> None:
        for group in self._inner.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                entry = self._by_param.get(id(p))
                if entry is not None and entry.param is p and entry.master_weight is not None:
                    params[i] = entry.master_weight

    def _swap_out_master_weights(self) -> None:
        # By identity, not by remembered positions: the wrapped optimizer's load_state_dict builds new groups.
        params_of = {id(e.master_weight): e.param for e in self._entries if e.master_weight is not None}
        for group in self._inner.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                param = params_of.get(id(p))
                if param is not None:
                    params[i] = param

    def _register_inner_state_dict_hooks(self) -> None:
        """master_weights: the wrapped optimizer's state is keyed by the float32 master weights, which are not in
        its param_groups outside step(); its own state_dict() and load_state_dict() (which users and libraries
        call on ``acc.optimizer``) see them through these hooks, so its state dict works, keeps float32 state and
        round-trips. The hooks hold the wrapper weakly."""
        self._inner_hook_handles = []
        if not self._master_weights:
            return
        ref = weakref.ref(self)

        def swap_in(optimizer: torch.optim.Optimizer, state_dict: Any = None) -> None:
            acc = ref()
            if acc is None:
                return
            if state_dict is not None:
                _check_groups_match(optimizer.param_groups, state_dict)  # torch's own refusal, before the swap
            acc._swap_in_master_weights()

        def swap_out(optimizer: torch.optim.Optimizer, state_dict: Any = None) -> None:
            acc = ref()
            if acc is not None:
                acc._swap_out_master_weights()

        inner = self._inner
        self._inner_hook_handles = [
            inner.register_state_dict_pre_hook(swap_in, prepend=True),
            inner.register_state_dict_post_hook(swap_out),
            inner.register_load_state_dict_pre_hook(swap_in, prepend=True),
            inner.register_load_state_dict_post_hook(swap_out),
        ]

    def _reset_window(self) -> None:
        self._micro_step = 0
        self._weight_sum = 0.0
        self._weight_ref = 1.0
        self._weighted = None
        self._touched = [False] * len(self._entries)
        self._fresh.clear()
        self._sumsq_stale = False
        self._late.clear()
        if any(not e.param.requires_grad for e in self._entries):
            self._walk = None  # a param frozen in this window leaves the layout at the next micro-step's walk
        for flag in self._found_inf.values():
            flag.zero_()

    # --------------------------------------------------------------------------------------------- layout
    def _trainable(
        self, params: list[torch.Tensor] | None = None, grads: list[torch.Tensor | None] | None = None
    ) -> list[tuple[int, torch.Tensor]]:
        """(position in the flattened param_groups, param) of every param that gets a master; ``params`` and
        their ``grads`` when the caller has read them already."""
        if params is None:
            params = [p for g in self._inner.param_groups for p in g["params"]]
        if grads is None:
            grads = [p.grad for p in params]
        by_param, touched = self._by_param, self._touched
        return [
            (position, p) for position, (p, grad) in enumerate(zip(params, grads))
            if _is_trainable(p, grad, by_param, touched)
        ]

    def _sync_layout(self, force: bool = False, trainable: list[tuple[int, torch.Tensor]] | None = None) -> None:
        """(Re)build the master buffers when the trainable params changed; keeps the window's partial sums."""
        if trainable is None:
            trainable = self._trainable()
        signature = self._layout_signature(trainable)
        if not force and signature == self._signature:
            return
        self._refuse_under_way("the trainable parameters changed", undo=True)
        for position, p in trainable:
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"fusedaccum: a trainable parameter of shape {tuple(p.shape)} is {p.dtype}; GradAccumulator "
                    f"supports {', '.join(str(d) for d in _FLOAT_DTYPES)} parameters (float32 masters)"
                )
            if p.layout != torch.strided:
                raise ValueError("fusedaccum: GradAccumulator supports dense (strided) parameters only")
            if p.device.type == "meta":
                raise ValueError(
                    f"fusedaccum: {_param_name(self._inner.param_groups, position)} (shape {tuple(p.shape)}) is on "
                    "the meta device; materialise the model first (e.g. model.to_empty(device=...) and initialise "
                    "it), then build the optimizer and the wrapper"
                )
        if self._master_weights:
            _refuse_overlapping(self._inner.param_groups, [(pos, p) for pos, p in trainable if p.dtype != torch.float32])
        shard_groups = {id(g): g for g in (fsdp_mesh_group(p, self._fsdp) for _, p in trainable) if g is not None}
        if len(shard_groups) > 1:
            raise ValueError("fusedaccum: with fsdp_module, every parameter must be sharded on the same device mesh")
        # The masters are shaped like what this rank holds: the local shard of a DTensor, else the param.
        local = {id(p): local_part(p) for _, p in trainable}
        for device in {local[id(p)].device for _, p in trainable}:
            backends.resolve(self._backend, device)  # a backend that cannot serve these tensors fails here, early
        sizes: dict[GroupKey, int] = {}
        for _, p in trainable:
            key = (local[id(p)].device, p.dtype)
            sizes[key] = _aligned(sizes.get(key, 0)) + local[id(p)].numel()
        buffers = {key: torch.zeros(n, dtype=torch.float32, device=key[0]) for key, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        entries: list[_Entry] = []
        touched: list[bool] = []
        for position, p in trainable:
            shard = local[id(p)]
            key = (shard.device, p.dtype)
            offset = _aligned(offsets[key])
            offsets[key] = offset + shard.numel()
            view = buffers[key][offset : offset + shard.numel()].view(shard.shape)
            old = self._by_param.get(id(p))
            old = old if old is not None and old.param is p else None
            master_weight = None
            version = p._version
            if old is not None:
                view.copy_(old.view)
                master_weight, version = old.master_weight, old.version
                touched.append(self._touched[old.index])
            else:
                touched.append(False)
            if self._master_weights and p.dtype != torch.float32 and master_weight is None:
                master_weight = self._new_master_weight(p)
            entries.append(_Entry(p, position, key, offset, view, master_weight, version, len(entries)))
        kept = {id(e.param) for e in entries}
        for old in self._entries:
            if id(old.param) not in kept and old.master_weight is not None and old.master_weight in self._inner.state:
                # A frozen param leaves the layout with its master weight: its optimizer state goes back to it in its
                # dtype, as Optimizer.load_state_dict gives it to a wrapper built afresh with the param frozen
                # (unfrozen, it moves to a new float32 copy again).
                moved = self._inner.state.pop(old.master_weight)
                self._inner.state[old.param] = {
                    k: v.to(old.param.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step"
                    else v for k, v in moved.items()
                }
        self._entries = entries
        self._by_param = {id(e.param): e for e in entries}
        self._walk = None
        self._buffers = buffers
        self._touched = touched
        if shard_groups:
            (self._shard_group,) = shard_groups.values()
        for device in {key[0] for key in buffers}:
            if device not in self._found_inf:
                self._found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
                self._sumsq[device] = torch.zeros(1, dtype=torch.float32, device=device)
        self._signature = signature
        if self._reducer is not None:
            spans = [(e.key, e.offset, e.view.numel()) for e in entries] if self._in_backward else None
            first = min(self._bucket_elements, FIRST_BUCKET_ELEMENTS) if self._in_backward else self._bucket_elements
            self._reducer.plan(buffers, spans, first)
        self._register_hooks()

    def _register_hooks(self) -> None:
        """accumulate_in_backward: one post-accumulate-grad hook on every leaf float param of the param_groups,
        frozen ones included: a param unfrozen later (``requires_grad_(True)``, no wrapper call in between) gets its
        master from its hook at its first grad, as a wrapper built with it trainable would (which a resume does).

        Kept in step with the param_groups at every layout change: hooks of params that left are removed, params
        already hooked keep theirs (a hook may be running: this can be called from one). The hook holds the wrapper
        weakly: a dropped wrapper neither stays alive through the model's params nor keeps eating their grads."""
        wanted: dict[int, torch.Tensor] = {}
        if self._in_backward:
            # FSDP2 shards: only the trainable ones (FSDP owns the others' gradient path).
            params = [e.param for e in self._entries] if self._fsdp else [
                p for g in self._inner.param_groups for p in g["params"]
            ]
            # Non-leaf params cannot take this hook; their .grad is consumed by step() instead.
            wanted = {id(p): p for p in params if p.is_leaf and p.dtype in _FLOAT_DTYPES and p.layout == torch.strided
                      and (p.requires_grad or not self._fsdp)}
        for key, (p, handle) in list(self._hook_handles.items()):
            if wanted.get(key) is not p:
                handle.remove()
                del self._hook_handles[key]
        if not wanted:
            return
        ref = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            acc = ref()
            if acc is not None:
                acc._on_grad_accumulated(param)

        for key, p in wanted.items():
            if key in self._hook_handles:
                continue
            frozen = not p.requires_grad
            if frozen:
                p.requires_grad_(True)  # torch takes the hook only from a tensor that requires grad; it stays
            try:
                self._hook_handles[key] = (p, p.register_post_accumulate_grad_hook(hook))
            finally:
                if frozen:
                    p.requires_grad_(False)

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        with self._hook_lock:
            try:
                _check_grad(param, grad)
            except (TypeError, ValueError) as error:
                # Earlier grads of this backward are already in the masters and this one cannot be: the window
                # cannot be completed as the large batch would, so it is dropped, and the error says so.
                self._reset_window()
                raise type(error)(f"{error}. The window was discarded (accumulate_in_backward had already added "
                                  "other gradients of this backward)") from None
            entry = self._by_param.get(id(param))
            if entry is None or entry.param is not param:
                if self._reducer is not None and self._reducer.under_way:
                    return  # the layout cannot grow under a reduction: step() refuses, with its message
                # Unfrozen since the last layout sync: its master now, where a wrapper built with it trainable has it.
                self._sync_layout()
                entry = self._by_param.get(id(param))
                if entry is None or entry.param is not param:
                    return  # not one of the wrapper's params any more: step() sees its grad
            grad = local_grad(param, grad)  # FSDP2 runs these hooks on the sharded param, after its reduce-scatter
            self._accumulate_in_hook_(entry, grad if grad.is_contiguous() else grad.contiguous())

    def _accumulate_in_hook_(self, entry: _Entry, grad: torch.Tensor) -> None:
        """Add one param's grad into its master now (accumulate_in_backward), with the default mode's maths, and
        free the grad. Distributed: the masters keep raw sums (as in the default mode) and, in the window's last
        micro-step, each bucket's all-reduce is issued as soon as its params are final."""
        device = entry.key[0]
        index = entry.index
        key = id(entry.param)
        # Known before backward: the window's last micro-step is the one step() will count as the last.
        last = self._micro_step + 1 == self._accumulation_steps
        local_last = last and not self._distributed
        scale = self._hooked_micro_scale()
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device, non_blocking=True)
        if last and not self._fresh:
            if self._distributed:
                # The first grad of the last backward: no bucket is issued yet; count each one's params afresh.
                self._reducer.start_final_backward()
            else:
                self._zero_sumsq()  # the first grad of the last micro-step starts the window's norm²
        common = dict(zero_grads=False, found_inf=self._found_inf[device], backend=self._backend)
        again = last and key in self._fresh
        if again and self._distributed and self._reducer.param_issued(index):
            # A second grad for this param in the last micro-step (two backwards before one step()) after its
            # bucket's all-reduce was issued: that region is the collective's now. Keep the grad aside; step()
            # all-reduces such grads once more, on every rank, and adds them (distributed.reduce_late).
            held = self._late.get(index)
            first = held is None
            if first:
                held = torch.empty(entry.view.shape, dtype=torch.float32, device=device)
            ops.accumulate_([held], [grad], scale, overwrite=first, **common)
            self._late[index] = held  # only once it holds the grad: a refused call leaves no garbage behind
        elif again and not self._distributed:
            # A second grad for this param in the last micro-step (in the default mode they would have summed in
            # .grad): its master is already final, m = (M + g1 s) / W, so add g2 s / W. Its sumsq term is now
            # stale: step() recounts sumsq.
            ops.accumulate_([entry.view], [grad], scale * self._post_scale(1.0), **common)
            self._sumsq_stale = True
        else:
            ops.accumulate_(
                [entry.view], [grad], scale, overwrite=not self._touched[index],
                post_scale=self._post_scale(1.0) if local_last else 1.0,
                sumsq=self._sumsq[device] if local_last else None, **common,
            )
        self._touched[index] = True
        self._fresh.add(key)
        entry.param.grad = None  # freed now: at most one param's low-precision grad is alive during backward
        if last and self._distributed and not again:
            self._reducer.param_final(index)

    def _hooked_micro_scale(self) -> float | torch.Tensor:
        # The loss scale is read once per micro-step (at its first hook), on the device: no host sync.
        if self._hook_scale is None:
            scaler = self._scaler
            if scaler is not None and scaler.is_enabled() and scaler._scale is None:
                raise RuntimeError(
                    "fusedaccum: a gradient arrived but the GradScaler has no scale yet: call "
                    "scaler.scale(loss).backward(), not loss.backward()"
                )
            self._hook_scale = self._micro_scale(1.0)
        return self._hook_scale

    def _layout_signature(self, trainable: list[tuple[int, torch.Tensor]]) -> tuple[int, ...]:
        return tuple(id(p) for _, p in trainable) + tuple(len(g["params"]) for g in self._inner.param_groups)

    def _new_master_weight(self, p: torch.Tensor) -> torch.Tensor:
        master = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        with torch.no_grad():
            master.copy_(p)
        # Optimizer state that already exists for the param (stepped or loaded before wrapping) moves to its master.
        state = self._inner.state
        if p in state:
            moved = state.pop(p)
            state[master] = {
                k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step" else v
                for k, v in moved.items()
            }
        return master

    def _layout_description(self) -> dict[str, Any]:
        return {
            "group_sizes": [len(g["params"]) for g in self._inner.param_groups],
            "params": [[e.position, list(e.param.shape), str(e.param.dtype)] for e in self._entries],
            "buffers": [[str(key[1]), buffer.numel()] for key, buffer in self._buffers.items()],
        }


def _aligned(offset: int) -> int:
    """The next view offset in a flat master buffer: a multiple of 4 elements, i.e. 16 bytes. The CUDA kernel's
    16-byte vector loads need both the master and the grad 16-byte aligned (else that tensor takes the scalar
    path); packing views back to back would leave most of them misaligned. The gaps (< 16 B a param) stay zero."""
    return (offset + _VIEW_ALIGNMENT_ELEMENTS - 1) // _VIEW_ALIGNMENT_ELEMENTS * _VIEW_ALIGNMENT_ELEMENTS


def _is_trainable(p: torch.Tensor, grad: torch.Tensor | None, by_param: dict[int, _Entry], touched: list[bool]) -> bool:
    """Whether ``p`` gets a master: it requires grad, or has one, or holds a partial sum of the current window (a
    param frozen mid-window keeps it until the window ends; then it leaves the layout, which is then the one a
    wrapper built afresh with that param frozen has, so checkpoints load into either)."""
    if p.requires_grad or grad is not None:
        return True
    old = by_param.get(id(p))
    return old is not None and old.param is p and touched[old.index]


def _check_groups_match(groups: list[dict[str, Any]], state_dict: Any) -> None:
    """The refusal Optimizer.load_state_dict makes before it changes anything (group counts and sizes)."""
    saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved, list):
        return  # torch itself refuses it, before any change
    if len(saved) != len(groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved) if isinstance(s, dict)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )


def _param_name(groups: list[dict[str, Any]], position: int) -> str:
    """How a user finds the param at ``position`` of the flattened param_groups."""
    for g, group in enumerate(groups):
        if position < len(group["params"]):
            return f"param_groups[{g}]['params'][{position}]"
        position -= len(group["params"])
    return f"param {position}"


def _refuse_overlapping(groups: list[dict[str, Any]], params: list[tuple[int, torch.Tensor]]) -> None:
    """Params whose memory overlaps cannot each get a master weight: writing the copies back would conflict (and
    be refused only after the optimizer had stepped them)."""
    spans = []
    for position, p in params:
        if p.numel():
            start = p.data_ptr()
            spans.append((start, start + p.numel() * p.element_size(), position))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"fusedaccum: {_param_name(groups, a)} and {_param_name(groups, b)} share memory; with "
                "master_weights=True each bf16/fp16 parameter needs memory of its own (its float32 copy is written "
                "back after every update)"
            )


def _check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.layout != torch.strided:
        raise ValueError(
            f"fusedaccum: a parameter of shape {tuple(p.shape)} has a sparse ({grad.layout}) gradient; "
            "GradAccumulator accumulates dense gradients only (e.g. nn.Embedding(sparse=False))"
        )
    if p.dtype not in _FLOAT_DTYPES or grad.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fusedaccum: a parameter is {p.dtype} with a {grad.dtype} gradient; GradAccumulator "
            f"supports {', '.join(str(d) for d in _FLOAT_DTYPES)} (float32 masters)"
        )


def _first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    if saved["group_sizes"] != current["group_sizes"]:
        return f"param group sizes {saved['group_sizes']} saved vs {current['group_sizes']} here"
    a, b = saved["params"], current["params"]
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            return f"trainable param {i}: [position, shape, dtype] {list(x)} saved vs {list(y)} here"
    if len(a) != len(b):
        return f"{len(a)} trainable params saved vs {len(b)} here"
    return f"master buffers {saved['buffers']} saved vs {current['buffers']} here"
