"""torch.distributed for :class:`fusedaccum.GradAccumulator`: what is reduced, when, and which setups are refused.

The wrapper (accumulator.py) owns the window's state and decides when a window ends; this module owns the
collectives' mechanics and the checks of the parallel setup:

* :class:`BucketedAllReduce`: the all-reduce buckets over the flat float32 master buffers and the asynchronous
  collectives in flight (issued together at the window's end, or, with accumulate_in_backward, from the last
  backward's hooks as the params become final), plus the re-reduction of gradients that arrive late;
* the reduction strategies the wrapper chooses once: :class:`LocalReduction` (one process),
  :class:`AllReduceReduction` (process group / DDP: the masters' bucketed all-reduce per window) and
  :class:`ShardAgreement` (FSDP2: FSDP reduce-scatters; the ranks only agree on the skip and the norm);
* process group / DDP / FSDP2 resolution and refusals; DTensor shards as local tensors and back.

See docs/distributed.md.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

# With accumulate_in_backward, the first bucket issued (the end of the buffer: the params backward finishes first)
# is at most 1 MiB, as DDP's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES): the reduction then
# starts after the first layers of the last backward instead of after a whole 25 MiB of them.
FIRST_BUCKET_ELEMENTS = 2**20 // 4

Span = tuple[Any, int, int]  # (buffer key, first element, element count) of one param in a flat buffer

if TYPE_CHECKING:
    from ._accumulation import AtStep
    from ._hooks import BackwardHooks
    from ._master_grads import MasterGrads
    from ._window import Window


class LocalReduction:
    """One process: the window's masters are the update's; the last micro-step's fused pass scales them by 1/W
    and measures the norm."""

    buckets: BucketedAllReduce | None = None
    scales_locally = True  # the 1/W and the norm are applied by the last micro-step's own pass

    def refuse_weight(self, weight: Any) -> None:
        """Every rank's weights can be applied: nothing to refuse."""

    def take_over(self) -> None:
        """The wrapper is built: from now on this reduction is the only one (DDP's is switched off)."""

    def check_step(self) -> None:
        """Refuses, before a micro-step changes anything, a setup that would silently go wrong: here, several
        processes with no reduction (each rank would update from its own gradients and the replicas diverge)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"fusedaccum: torch.distributed runs {dist.get_world_size()} processes, but this GradAccumulator was "
                "given no ddp_module, process_group or fsdp_module: each rank would step on its own gradients and "
                "the replicas would silently diverge. Pass ddp_module=model (or call acc.attach(ddp_module=model) "
                "once DDP wraps the model, if the optimizer was built first) or process_group='default'. If every "
                "rank really trains a model of its own, give it a group of its own: "
                "process_group=torch.distributed.new_group([rank])"
            )

    def hooked_params(self, masters: MasterGrads, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The params accumulate_in_backward hooks: all of them (a frozen one may be unfrozen later)."""
        return [p for g in groups for p in g["params"]]

    def plan(self, masters: MasterGrads, in_backward: bool) -> None:
        """A new layout: nothing to plan."""

    def reduce(self, masters: MasterGrads, window: Window, mode: AtStep | BackwardHooks) -> bool:
        """Makes the masters the update's gradient; False when there is nothing to update."""
        return True

    def agree(self, masters: MasterGrads, found: torch.Tensor, sumsq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The skip flag and the squared norm every rank decides on."""
        return found, sumsq


class ShardAgreement(LocalReduction):
    """FSDP2: FSDP reduce-scatters (and averages over ranks) every backward's gradient; the masters hold this rank's
    shards, and one small all-reduce over the mesh per window makes the skip and the norm global."""

    def refuse_weight(self, weight: Any) -> None:
        if weight is not None:
            raise ValueError(
                "fusedaccum: step(weight=...) cannot be used with fsdp_module: FSDP averages each micro-batch's "
                "gradient over the ranks in its reduce-scatter, before step() sees it, so per-rank weights cannot be "
                "applied afterwards. Weight the loss instead (loss * w * world_size / global weight sum) with "
                "reduction='sum'"
            )

    def hooked_params(self, masters: MasterGrads, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Only the trainable shards: FSDP owns the others' gradient path."""
        return [e.param for e in masters.entries]

    def check_step(self) -> None:
        """FSDP reduces over its mesh: nothing to refuse."""

    def agree(self, masters: MasterGrads, found: torch.Tensor, sumsq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if masters.shard_group is None:
            return found, sumsq
        return agree_across_shards(found, sumsq, masters.shard_group)


class AllReduceReduction(LocalReduction):
    """A process group or DDP: no collective on a window's non-final micro-steps; at its end the raw master sums
    are all-reduced in buckets (issued from the last backward's hooks with accumulate_in_backward), with one small
    float64 all-reduce of what the ranks must agree on, then scaled by the global weight sum."""

    scales_locally = False  # the masters hold raw sums until the reduction; 1/W and the norm come after it

    def __init__(self, group: Any, bucket_elements: int, ddp_module: torch.nn.Module | None = None) -> None:
        self.group = group
        self.bucket_elements = bucket_elements
        self.buckets = BucketedAllReduce(group, bucket_elements)
        # Held weakly (a copy of the wrapper must not copy the model), to see its reduction switched back on.
        self._ddp = None if ddp_module is None else weakref.ref(ddp_module)

    def take_over(self) -> None:
        ddp = None if self._ddp is None else self._ddp()
        if ddp is not None:
            # no_sync() for good: DDP's forward then skips the reducer (no per-backward all-reduce, no
            # unused-parameter or buffer collectives) and .grad holds this rank's own gradient.
            ddp.require_backward_grad_sync = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ddp"] = None
        return state

    def check_step(self) -> None:
        ddp = None if self._ddp is None else self._ddp()
        if ddp is not None and ddp.require_backward_grad_sync:
            raise RuntimeError(
                "fusedaccum: the DDP module's require_backward_grad_sync was switched back on (e.g. nanoGPT's "
                "`model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)`): DDP then "
                "all-reduces every such backward on top of the wrapper's one reduction per window. Remove that line; "
                "the wrapper switched DDP's reduction off for good (nothing was changed)"
            )

    def plan(self, masters: MasterGrads, in_backward: bool) -> None:
        spans = [(e.key, e.offset, e.view.numel()) for e in masters.entries] if in_backward else None
        first = min(self.bucket_elements, FIRST_BUCKET_ELEMENTS) if in_backward else self.bucket_elements
        self.buckets.plan(masters.buffers, spans, first)

    def reduce(self, masters: MasterGrads, window: Window, mode: AtStep | BackwardHooks) -> bool:
        # Untouched regions may hold an earlier window's values; they must not enter the sum when another rank did
        # get a gradient for this param. (Never part of a bucket already issued: those hold only final params.)
        masters.zero_untouched()
        found = masters.found()
        device = found.device
        # One small float64 SUM all-reduce carries everything the ranks must agree on (float64: token-count
        # weight sums stay exact to 2**53). Flags are 0/1 per rank, so "sum > 0" is the MAX (any rank) decision.
        n = len(masters.entries)
        meta = torch.zeros(4 + n * (2 if mode.in_backward else 1), dtype=torch.float64, device=device)
        meta[0] = found[0]
        meta[1] = window.weight_sum
        if window.micro_step:
            meta[2 if window.weighted else 3] = 1.0
        flags = [float(t) for t in masters.touched]
        if mode.in_backward:  # which params got a grad after their bucket had been issued (reduce_late)
            flags += [float(i in mode.held_back) for i in range(n)]
        if flags:
            meta[4:] = torch.tensor(flags, dtype=torch.float64).to(device)
        # Every collective is issued before any is waited on: the backend can then work on several buckets at once
        # (gloo runs them on its worker threads; nccl queues them on its stream) instead of one round trip each.
        # With accumulate_in_backward the last backward's hooks have issued the buckets whose params were final
        # (BucketedAllReduce.param_final); this issues the rest, in the same plan order on every rank.
        self.buckets.issue_all()
        meta_work = dist.all_reduce(meta, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.buckets.wait_all()
        meta_work.wait()
        host = meta.tolist()  # host sync: skip/step and which params to hand the optimizer are host decisions
        overflow, weight_sum, n_weighted, n_unweighted = host[0] > 0, host[1], host[2], host[3]
        masters.touched = [t > 0 for t in host[4 : 4 + n]]
        late = [i for i, t in enumerate(host[4 + n :]) if t > 0]
        if late:
            reduce_late([e.view for e in masters.entries], mode.held_back, late, self.group)
            mode.held_back.clear()
        if n_weighted and n_unweighted:
            raise ValueError(
                "fusedaccum: in this window some ranks passed step(weight=...) and others did not; weights must be "
                "given on every rank or on none (the window was dropped on every rank)"
            )
        if weight_sum == 0.0:  # flush() with every rank's window empty
            return False
        if not masters.any_touched():
            raise RuntimeError(window.no_grads_message("on every rank") + " (the window was dropped on every rank)")
        window.weight_sum = weight_sum
        masters.set_found(device, overflow)
        masters.zero_sumsq()
        if not overflow:  # a skipped window needs no scaling
            masters.scale_only_(masters.touched_entries(), window.post_scale())
        return True


class BucketedAllReduce:
    """The window's SUM all-reduce of the flat master buffers, in buckets, and the collectives in flight.

    Buckets are contiguous slices of at most ``bucket_elements`` float32 elements, planned from the end of the
    last buffer back to the start of the first, since backward finishes the last params' grads first (as DDP
    orders its buckets). They ignore parameter boundaries: the all-reduce is an elementwise sum, so any tiling
    gives each element the same sum and the cap is met exactly. Every rank issues them in plan order, which
    keeps the ranks' collectives matched.
    """

    def __init__(self, group: Any, bucket_elements: int) -> None:
        self.group = group
        self.bucket_elements = bucket_elements
        self._buffers: dict[Any, torch.Tensor] = {}
        self._plan: list[tuple[Any, int, int]] = []  # (buffer key, start, stop), in issue order
        self._param_buckets: list[list[int]] = []  # per param (span index): the buckets it overlaps
        self._params_per_bucket: list[int] = []
        self._waiting: list[int] = []  # per bucket: its params still without their final sum (last backward)
        self._works: list[Any] = []
        self._next = 0  # buckets issued so far this window
        self._final_backward = False  # the window's last backward has begun; its reduction is under way

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_works"] = []  # collectives in flight belong to the original's buffers
        return state

    @property
    def under_way(self) -> bool:
        """Whether this window's reduction has begun (its last backward started) and not yet ended."""
        return self._final_backward or bool(self._works)

    def plan(self, buffers: dict[Any, torch.Tensor], spans: list[Span] | None, first_bucket_elements: int) -> None:
        """Cut ``buffers`` into buckets (the first at most ``first_bucket_elements``); with ``spans`` (one per
        param), also record which buckets each param overlaps, for :meth:`param_final`."""
        plan: list[tuple[Any, int, int]] = []
        for key in reversed(list(buffers)):
            stop = buffers[key].numel()
            while stop > 0:
                cap = first_bucket_elements if not plan else self.bucket_elements
                plan.append((key, max(0, stop - cap), stop))
                stop = plan[-1][1]
        self._buffers, self._plan = buffers, plan
        spans = spans or []
        self._param_buckets = [[] for _ in spans]
        self._params_per_bucket = [0] * len(plan)
        for b, (key, start, stop) in enumerate(plan):
            for i, (span_key, offset, numel) in enumerate(spans):
                if span_key == key and start < offset + numel and offset < stop:
                    self._param_buckets[i].append(b)
                    self._params_per_bucket[b] += 1

    def start_final_backward(self) -> None:
        """The window's last backward begins: no param has its final sum yet. Whatever is still held back when
        this backward ends (a param without a grad on this rank) is issued then, from autograd's end-of-backward
        callback, as DDP finalises its reduction: when ``backward()`` returns, every rank has issued the same
        collectives, so a collective the user runs before ``step()`` (logging the loss, say) pairs up correctly."""
        self._waiting = list(self._params_per_bucket)
        self._final_backward = True
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self.issue_all)
        except RuntimeError:
            pass  # not inside a backward (a grad set by hand, found by step()): step() issues the rest itself

    def param_final(self, index: int) -> None:
        """Param ``index`` has its final sum: issue the next buckets, in plan order, while all their params do.
        Strict plan order keeps the ranks' collectives matched even when their backwards finish params in
        different orders or a param gets no grad on some rank (its bucket, and those after it, then wait for
        :meth:`issue_all`)."""
        for b in self._param_buckets[index]:
            self._waiting[b] -= 1
        upto = self._next
        while upto < len(self._plan) and self._waiting[upto] == 0:
            upto += 1
        self._issue(upto)

    def param_issued(self, index: int) -> bool:
        """Whether a bucket holding part of param ``index`` is already being reduced."""
        return any(b < self._next for b in self._param_buckets[index])

    def issue_all(self) -> None:
        """Issue every bucket not issued yet (asynchronously)."""
        self._issue(len(self._plan))

    def wait_all(self) -> None:
        """Wait for every issued bucket; the window's reduction is then complete."""
        works, self._works, self._next, self._final_backward = self._works, [], 0, False
        for work in works:
            work.wait()

    def _issue(self, upto: int) -> None:
        while self._next < upto:
            key, start, stop = self._plan[self._next]
            bucket = self._buffers[key][start:stop]
            self._works.append(dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
            self._next += 1


def agree_across_shards(found: torch.Tensor, sumsq: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """FSDP: each rank measured its own shards. One small all-reduce over the mesh makes the skip flag and the
    squared norm global (the shards partition every param, so the squared norms add up); float64, so summing
    the shards' float32 partial sums adds no rounding of its own. The same bytes reach every rank."""
    both = torch.cat([found, sumsq]).double()
    if both.device.type == "cpu" and str(dist.get_backend(group)) == "nccl":
        # CPU masters under an nccl-only mesh (FSDP2's CPUOffloadPolicy): nccl reduces device tensors only.
        both = both.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return (both[:1] > 0).float().to(found.device), both[1:].float().to(found.device)


def reduce_late(views: list[torch.Tensor], late: dict[int, torch.Tensor], indices: list[int], group: Any) -> None:
    """All-reduce the grads that arrived after their bucket had been issued and add them to the reduced masters.

    ``indices`` (the same list on every rank: any rank's late params) pick from ``views``; this rank contributes
    ``late[i]`` where it has one and zeros elsewhere. One collective per device; rare (a second backward in a
    window's last micro-step, accumulate_in_backward only)."""
    by_device: dict[torch.device, list[int]] = {}
    for i in indices:
        by_device.setdefault(views[i].device, []).append(i)
    for device, chosen in by_device.items():
        flat = torch.zeros(sum(views[i].numel() for i in chosen), dtype=torch.float32, device=device)
        start = 0
        for i in chosen:
            if i in late:
                flat[start : start + views[i].numel()].copy_(late[i].reshape(-1))
            start += views[i].numel()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        start = 0
        for i in chosen:
            views[i].add_(flat[start : start + views[i].numel()].view(views[i].shape))
            start += views[i].numel()


def resolve_process_group(process_group: Any, ddp_module: torch.nn.Module | None) -> tuple[bool, Any]:
    """Validate the distributed arguments; returns (distributed, group for torch.distributed calls)."""
    if ddp_module is not None:
        if not isinstance(ddp_module, torch.nn.parallel.DistributedDataParallel):
            hint = ""
            if any(isinstance(p, _dtensor_type()) for p in ddp_module.parameters()) or _is_fsdp1(ddp_module):
                hint = " For FSDP2 (fully_shard) pass fsdp_module= instead; FSDP1 is not supported."
            raise TypeError(
                "fusedaccum: ddp_module must be a torch.nn.parallel.DistributedDataParallel, got "
                f"{type(ddp_module).__name__}.{hint}"
            )
        if getattr(ddp_module, "static_graph", False):
            raise ValueError(
                "fusedaccum: DistributedDataParallel(static_graph=True) needs DDP's own reduction on its first "
                "iteration, which the wrapper switches off (DDP fails with an internal assert); build DDP without "
                "static_graph"
            )
        if process_group is None:
            return True, ddp_module.process_group
    if process_group is None:
        return False, None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "fusedaccum: process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun sets up its environment)"
        )
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(
                f"fusedaccum: process_group must be None, 'default' or a ProcessGroup, got {process_group!r}"
            )
        group = dist.group.WORLD
    elif isinstance(process_group, dist.ProcessGroup):
        group = process_group
    else:
        raise TypeError(
            f"fusedaccum: process_group must be None, 'default' or a ProcessGroup, got {type(process_group).__name__}"
        )
    if ddp_module is not None and ddp_module.process_group is not group:
        raise ValueError(
            "fusedaccum: process_group differs from ddp_module's process group; the gradients must be reduced "
            "over the group DDP replicates the model on (leave process_group out to use it)"
        )
    return True, group


def check_ddp_params_covered(ddp_module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The wrapper switches DDP's reduction off for the whole module and reduces only its optimizer's params: a
    trainable DDP param outside that optimizer (a second optimizer's head, say) would never be reduced and the
    replicas would silently diverge. Refuse that setup."""
    ignored = set(getattr(ddp_module, "parameters_to_ignore", ()))
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in ddp_module.module.named_parameters()
               if p.requires_grad and id(p) not in owned and name not in ignored]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"fusedaccum: {len(missing)} trainable parameter(s) of the DDP module are not in the wrapped optimizer "
            f"({shown}); the wrapper turns DDP's reduction off for the whole module, so they would never be "
            "averaged across ranks. Put every trainable parameter in the wrapped optimizer (one optimizer with "
            "several param groups), or mark them in DDP's parameters_to_ignore"
        )


@functools.cache
def _dtensor_type() -> type:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return type(None)
    return DTensor


def _is_fsdp1(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def fsdp_mesh_group(p: torch.Tensor, fsdp: bool) -> Any:
    """Checks how ``p`` is sharded; returns its mesh's process group for an FSDP2 shard, None for a plain tensor.

    Without fsdp_module, sharded params are refused: summing their local shards across ranks, or treating a shard
    as a whole param, would be silently wrong. With it, every trainable param must be an FSDP2 shard: a plain
    tensor would keep its rank-local gradient (FSDP reduces only what it shards)."""
    is_dtensor = isinstance(p, _dtensor_type())
    if not fsdp:
        if is_dtensor:
            raise TypeError(
                "fusedaccum: a parameter is a DTensor (FSDP2 fully_shard or tensor parallel): for FSDP2 pass the "
                "fully_shard root module as GradAccumulator(..., fsdp_module=model); tensor parallelism is not "
                "supported. See docs/distributed.md"
            )
        if type(p).__name__ == "FlatParameter":
            raise TypeError(
                "fusedaccum: FSDP1 (FullyShardedDataParallel) flat parameters are not supported; use FSDP2 "
                "(torch.distributed.fsdp.fully_shard) with GradAccumulator(..., fsdp_module=model)"
            )
        return None
    if not is_dtensor:
        raise ValueError(
            f"fusedaccum: with fsdp_module, every trainable parameter in the optimizer must be sharded by "
            f"fully_shard; a plain tensor parameter of shape {tuple(p.shape)} would keep its rank-local gradient "
            "(FSDP reduces only the parameters it shards)"
        )
    mesh = p.device_mesh
    if mesh.ndim != 1 or not all(placement.is_shard() for placement in p.placements):
        raise ValueError(
            f"fusedaccum: fsdp_module supports parameters sharded on a 1-D device mesh (fully_shard); got "
            f"{tuple(p.placements)} on a {mesh.ndim}-D mesh (HSDP and tensor parallelism are not supported)"
        )
    return mesh.get_group()


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: a DTensor's local shard (no autograd record), else ``t`` itself."""
    if isinstance(t, _dtensor_type()):
        with torch.no_grad():
            return t.to_local()
    return t


def local_grad(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The local shard of a sharded param's grad, which must be sharded like the param (a Partial or replicated
    gradient would not be this rank's part of the reduced sum)."""
    if not isinstance(p, _dtensor_type()):
        return grad
    if not isinstance(grad, _dtensor_type()) or tuple(grad.placements) != tuple(p.placements):
        got = tuple(grad.placements) if isinstance(grad, _dtensor_type()) else type(grad).__name__
        raise ValueError(
            f"fusedaccum: a sharded parameter of shape {tuple(p.shape)} has a gradient placed as {got}, not "
            f"{tuple(p.placements)} like the parameter; GradAccumulator expects FSDP2's reduce-scattered gradients"
        )
    return local_part(grad)


def as_param_grad(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` (shaped like this rank's part of ``p``) as what ``p.grad`` must be: a DTensor sharded like ``p``."""
    if not isinstance(p, _dtensor_type()):
        return grad
    return type(p).from_local(grad, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def check_fsdp_module(module: torch.nn.Module, process_group: Any, ddp_module: Any, master_weights: bool) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        FSDPModule = None  # noqa: N806
    if FSDPModule is None or not isinstance(module, FSDPModule):
        raise TypeError(
            f"fusedaccum: fsdp_module must be the module fully_shard was applied to (an FSDPModule), got "
            f"{type(module).__name__}"
        )
    if process_group is not None or ddp_module is not None:
        raise ValueError(
            "fusedaccum: fsdp_module cannot be combined with process_group or ddp_module: FSDP reduce-scatters "
            "every backward's gradient itself, over its device mesh"
        )
    if master_weights:
        raise ValueError(
            "fusedaccum: master_weights=True cannot be used with fsdp_module: keep the sharded parameters float32 "
            "and compute in bf16 with fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)); "
            "the float32 shards are then the master weights"
        )
