"""The wrapper's float32 master gradients: storage, layout and the validate-then-accumulate call.

One flat float32 buffer per (device, param dtype), a view per trainable parameter on a 16-byte boundary, which
params got a gradient in the current window (``touched``), and per device the inf/NaN flag and the squared norm
the fused passes write. The layout is rebuilt when the trainable params change, keeping the window's partial sums.
This part knows :mod:`fusedaccum.ops` and nothing of windows, optimizers or collectives; the facade
(:class:`fusedaccum.GradAccumulator`) tells it what to do.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import backends, ops
from .distributed import fsdp_mesh_group, local_grad, local_part

FLOAT_DTYPES = ops.GRAD_DTYPES  # what a param and its grad may be: float32 masters serve these
GroupKey = tuple[torch.device, torch.dtype]
Params = list[tuple[int, torch.Tensor]]  # (position in the flattened param_groups, param)
# Bounds the scratch memory of the rare "scale the masters without a new grad" pass (see MasterGrads.scale_only_).
_ZERO_CHUNK_ELEMENTS = 1 << 22
_VIEW_ALIGNMENT_ELEMENTS = 4  # float32 elements per 16 bytes: see _aligned


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
class Entry:
    """A trainable parameter and where its float32 master gradient lives."""

    param: torch.Tensor
    position: int  # index in the flattened param_groups order (what state dicts compare)
    key: GroupKey
    offset: int
    view: torch.Tensor  # float32 master gradient, the param's (local shard's) shape, a view of its group's buffer
    index: int  # position in the entry list (what touched and the bucket plan are indexed by)


class _Walk(NamedTuple):
    """The params as collect() last walked them, and each one's entry (None: not trainable)."""

    params: list[torch.Tensor]  # the param_groups' params, flattened
    group_sizes: list[int]
    requires_grad: list[bool]
    entry_at: list[Entry | None]

    def same_params(self, groups: list[dict[str, Any]], params: list[torch.Tensor]) -> bool:
        """Whether ``params`` (flattened from ``groups``) are these, in these groups, with the same
        requires_grad: then the trainable set is the same unless a param without an entry got a grad. (The group
        sizes mirror the layout signature, so the reused walk never leaves the signature stale.)"""
        return (
            len(params) == len(self.params)
            and all(map(operator.is_, params, self.params))
            and [len(g["params"]) for g in groups] == self.group_sizes
            and [p.requires_grad for p in params] == self.requires_grad
        )


class MasterGrads:
    """The master-gradient buffers of one wrapper and the layout that maps params into them."""

    released = False  # the buffers' memory is freed (release()); every method that touches it calls _materialize()

    def __init__(self, backend: str | None, fsdp: bool) -> None:
        self.backend = backend
        self._fsdp = fsdp
        self.entries: list[Entry] = []
        self.by_param: dict[int, Entry] = {}
        self.buffers: dict[GroupKey, torch.Tensor] = {}
        self.touched: list[bool] = []  # per entry: got a grad in the current window
        self.found_inf: dict[torch.device, torch.Tensor] = {}
        self.sumsq: dict[torch.device, torch.Tensor] = {}
        self.shard_group: Any = None  # FSDP2: the params' mesh group
        self._signature: tuple[int, ...] = ()
        self._walk: _Walk | None = None

    # ------------------------------------------------------------------------------------------- layout
    def entry_of(self, param: torch.Tensor) -> Entry | None:
        entry = self.by_param.get(id(param))
        return entry if entry is not None and entry.param is param else None

    def trainable(
        self, groups: list[dict[str, Any]], params: list[torch.Tensor] | None = None,
        grads: list[torch.Tensor | None] | None = None,
    ) -> Params:
        """Every param that gets a master; ``params`` (flattened from ``groups``) and their ``grads`` when the
        caller has read them already."""
        if params is None:
            params = [p for g in groups for p in g["params"]]
        if grads is None:
            grads = [p.grad for p in params]
        return [(position, p) for position, (p, grad) in enumerate(zip(params, grads)) if self._is_trainable(p, grad)]

    def _is_trainable(self, p: torch.Tensor, grad: torch.Tensor | None) -> bool:
        """It requires grad, or has one, or holds a partial sum of the current window (a param frozen mid-window
        keeps it until the window ends; then it leaves the layout, which is then the one a wrapper built afresh
        with that param frozen has, so checkpoints load into either)."""
        if p.requires_grad or grad is not None:
            return True
        old = self.entry_of(p)
        return old is not None and self.touched[old.index]

    def changed(self, groups: list[dict[str, Any]], trainable: Params) -> bool:
        return _signature(groups, trainable) != self._signature

    def check(self, groups: list[dict[str, Any]], trainable: Params) -> None:
        """Refuses params the masters cannot serve, before anything changes."""
        for position, p in trainable:
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"fusedaccum: a trainable parameter of shape {tuple(p.shape)} is {p.dtype}; GradAccumulator "
                    f"supports {', '.join(str(d) for d in FLOAT_DTYPES)} parameters (float32 masters)"
                )
            if p.layout != torch.strided:
                raise ValueError("fusedaccum: GradAccumulator supports dense (strided) parameters only")
            if p.device.type == "meta":
                raise ValueError(
                    f"fusedaccum: {param_name(groups, position)} (shape {tuple(p.shape)}) is on the meta device; "
                    "materialise the model first (e.g. model.to_empty(device=...) and initialise it), then build the "
                    "optimizer and the wrapper"
                )
        shard_groups = {id(g) for g in (fsdp_mesh_group(p, self._fsdp) for _, p in trainable) if g is not None}
        if len(shard_groups) > 1:
            raise ValueError("fusedaccum: with fsdp_module, every parameter must be sharded on the same device mesh")
        for device in {local_part(p).device for _, p in trainable}:
            backends.resolve(self.backend, device)  # a backend that cannot serve these tensors fails here, early

    def rebuild(self, groups: list[dict[str, Any]], trainable: Params) -> None:
        """New buffers for ``trainable`` (checked), keeping each remaining param's partial sum and touched flag."""
        # The masters are shaped like what this rank holds: the local shard of a DTensor, else the param.
        local = {id(p): local_part(p) for _, p in trainable}
        sizes: dict[GroupKey, int] = {}
        for _, p in trainable:
            key = (local[id(p)].device, p.dtype)
            sizes[key] = _aligned(sizes.get(key, 0)) + local[id(p)].numel()
        buffers = {key: torch.zeros(n, dtype=torch.float32, device=key[0]) for key, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        entries: list[Entry] = []
        touched: list[bool] = []
        for position, p in trainable:
            shard = local[id(p)]
            key = (shard.device, p.dtype)
            offset = _aligned(offsets[key])
            offsets[key] = offset + shard.numel()
            view = buffers[key][offset : offset + shard.numel()].view(shard.shape)
            old = self.entry_of(p)
            if old is not None and not self.released:  # released: at a window boundary, nothing to keep
                view.copy_(old.view)
            touched.append(old is not None and self.touched[old.index])
            entries.append(Entry(p, position, key, offset, view, len(entries)))
        self.entries = entries
        self.by_param = {id(e.param): e for e in entries}
        self._walk = None
        self.buffers = buffers
        self.released = False
        self.touched = touched
        shard_groups = [g for g in (fsdp_mesh_group(p, self._fsdp) for _, p in trainable) if g is not None]
        if shard_groups:
            self.shard_group = shard_groups[0]
        for device in {key[0] for key in buffers}:
            if device not in self.found_inf:
                self.found_inf[device] = torch.zeros(1, dtype=torch.float32, device=device)
                self.sumsq[device] = torch.zeros(1, dtype=torch.float32, device=device)
        self._signature = _signature(groups, trainable)

    def rekey(self, groups: list[dict[str, Any]]) -> None:
        """After a copy (deepcopy, pickle): the lookups are keyed by object identity, which a copy changes."""
        self.by_param = {id(e.param): e for e in self.entries}
        self._signature = _signature(groups, [(e.position, e.param) for e in self.entries])
        self._walk = None

    def forget_walk(self) -> None:
        self._walk = None

    def describe(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The layout as a state dict records it (what another layout is told apart by)."""
        return {
            "group_sizes": [len(g["params"]) for g in groups],
            "params": [[e.position, list(e.param.shape), str(e.param.dtype)] for e in self.entries],
            "buffers": [[str(key[1]), buffer.numel()] for key, buffer in self.buffers.items()],
        }

    def release(self) -> None:
        """Free the buffers' memory (4 B per param) at a window boundary. The views and any bucket plan over them
        stay valid: they share the buffers' storages, which the next write re-allocates (FSDP2 frees its unsharded
        params the same way). No zeroing then: a param's first grad of a window overwrites its master."""
        for buffer in self.buffers.values():
            buffer.untyped_storage().resize_(0)
        self.released = True

    def _materialize(self) -> None:
        if self.released:
            for buffer in self.buffers.values():
                buffer.untyped_storage().resize_(buffer.numel() * buffer.element_size())
            self.released = False

    def buffer_list(self) -> list[MasterGradBuffer]:
        self._materialize()
        out = []
        for key, buffer in self.buffers.items():
            entries = [e for e in self.entries if e.key == key]
            out.append(MasterGradBuffer(key[0], key[1], buffer, tuple(e.param for e in entries),
                                        tuple(e.offset for e in entries)))
        return out

    # ---------------------------------------------------------------------------------------- micro-step
    def collect(
        self, groups: list[dict[str, Any]], sync: Any
    ) -> list[tuple[Entry, torch.Tensor]]:
        """The (entry, dense contiguous grad) pairs of this micro-step; validates every grad and changes nothing
        but the layout (``sync(trainable)``, the facade's, when a new trainable param extends it).

        It runs on every micro-step, and Python per param is what it costs: when the params, their groups and
        their requires_grad are the ones of the last micro-step (one pass of list comprehensions tells), the
        layout cannot have changed and the grads are paired with the entries of the last walk (step() costs
        about 150 us for 148 tiny params, torch.utils.benchmark median on the 2-core AMD EPYC CI machine)."""
        params = [p for g in groups for p in g["params"]]
        grads = [p.grad for p in params]
        walk = self._walk
        if walk is not None and walk.same_params(groups, params):
            out = self._pair(walk, grads)
            if out is not None:
                return out
        # Something may have changed: check every grad before anything else changes, then the layout.
        for p, grad in zip(params, grads):
            if grad is not None:
                check_grad(p, grad)
        trainable = self.trainable(groups, params, grads)
        sync(trainable)
        entry_at: list[Entry | None] = [None] * len(params)
        for position, p in trainable:
            entry_at[position] = self.by_param[id(p)]
        self._walk = walk = _Walk(params, [len(g["params"]) for g in groups], [p.requires_grad for p in params],
                                  entry_at)
        out = self._pair(walk, grads)
        assert out is not None, "every param with a grad is trainable, so it has an entry"
        return out

    def _pair(self, walk: _Walk, grads: list[torch.Tensor | None]) -> list[tuple[Entry, torch.Tensor]] | None:
        """The grads paired with the walk's entries, checked; None if a grad belongs to a param without an entry
        (a frozen param got one: the layout grows). Changes nothing."""
        fsdp = self._fsdp
        out = []
        for entry, p, grad in zip(walk.entry_at, walk.params, grads):
            if grad is None:
                continue
            if grad.layout is not torch.strided or grad.dtype not in FLOAT_DTYPES:
                check_grad(p, grad)  # raises, naming the param
            if entry is None:
                return None
            if fsdp:
                grad = local_grad(p, grad)
            out.append((entry, grad if grad.is_contiguous() else grad.contiguous()))
        return out

    def accumulate_(
        self, groups: list[dict[str, Any]], grads: list[tuple[Entry, torch.Tensor]], scale: float | torch.Tensor,
        post_scale: float, with_sumsq: bool,
    ) -> None:
        """One micro-step's grads into their masters (a param's first grad of the window overwrites its master:
        no zeroing pass, no stale values from the previous window), flagging non-finite grads, and adding the
        squares of the new masters to sumsq when asked. Refuses (changing nothing) before anything is written."""
        calls = self._calls(grads)
        self._materialize()
        with self._naming_shared_grads(groups, grads):
            # A lone call validates all its tensors before writing any (fusedaccum.ops); with several calls a
            # failure in a later one would leave a half-done micro-step, so they are all checked together first.
            if len(calls) > 1:
                self.check_args(grads)
            for device, overwrite, masters, grad_list in calls:
                if isinstance(scale, torch.Tensor):
                    scale = scale.to(device, non_blocking=True)
                ops.accumulate_(
                    masters, grad_list, scale, overwrite=overwrite, post_scale=post_scale, zero_grads=False,
                    found_inf=self.found_inf[device], sumsq=self.sumsq[device] if with_sumsq else None,
                    backend=self.backend,
                )
        for entry, _ in grads:
            self.touched[entry.index] = True

    def check_args(self, grads: list[tuple[Entry, torch.Tensor]], groups: list[dict[str, Any]] | None = None) -> None:
        """Raises what accumulating these grads would raise, and touches nothing."""
        by_device: dict[torch.device, list[tuple[Entry, torch.Tensor]]] = {}
        for entry, grad in grads:
            by_device.setdefault(entry.key[0], []).append((entry, grad))
        with self._naming_shared_grads(groups, grads):
            for device, pairs in by_device.items():
                ops.check_accumulate_args([e.view for e, _ in pairs], [g for _, g in pairs], zero_grads=False,
                                          found_inf=self.found_inf[device], sumsq=self.sumsq[device])

    @contextmanager
    def _naming_shared_grads(
        self, groups: list[dict[str, Any]] | None, grads: list[tuple[Entry, torch.Tensor]]
    ) -> Iterator[None]:
        """The op refuses grads that overlap as "grads[i] and grads[j] overlap", indices of its own call; when two
        params were handed one .grad tensor, name the params instead. Costs nothing unless the op refused."""
        try:
            yield
        except ValueError:
            if groups is None:
                raise
            seen: dict[int, Entry] = {}
            for entry, grad in grads:
                other = seen.setdefault(grad.data_ptr(), entry)
                if other is not entry and grad.numel():
                    raise ValueError(
                        f"fusedaccum: {param_name(groups, other.position)} and {param_name(groups, entry.position)} "
                        "have one .grad tensor (their gradients overlap in memory); give each parameter a gradient "
                        "of its own. Nothing was changed"
                    ) from None
            raise

    def _calls(
        self, grads: list[tuple[Entry, torch.Tensor]]
    ) -> list[tuple[torch.device, bool, list[torch.Tensor], list[torch.Tensor]]]:
        """The micro-step's accumulate_ calls: one per (device, whether it is the param's first grad of the
        window)."""
        touched = self.touched
        devices = {key[0] for key in self.buffers}
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

    def accumulate_one_(
        self, entry: Entry, grad: torch.Tensor, scale: float | torch.Tensor, *, overwrite: bool = False,
        post_scale: float = 1.0, with_sumsq: bool = False, into: torch.Tensor | None = None,
    ) -> None:
        """One param's grad into its master (or into ``into``), as accumulate_in_backward's hooks add them."""
        self._materialize()
        device = entry.key[0]
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device, non_blocking=True)
        ops.accumulate_(
            [entry.view if into is None else into], [grad], scale, overwrite=overwrite, post_scale=post_scale,
            zero_grads=False, found_inf=self.found_inf[device], sumsq=self.sumsq[device] if with_sumsq else None,
            backend=self.backend,
        )

    def scale_only_(self, entries: list[Entry], post_scale: float) -> None:
        """Multiply masters by ``post_scale`` and add their squares to sumsq, with no new gradient.

        Rare: a param absent from the window's last micro-step, a flush, a distributed window after its reduction.
        ``accumulate_`` needs a grad list, so it gets zeros from one reusable bf16 scratch buffer (bounded size,
        several calls if needed).
        """
        self._materialize()
        by_device: dict[torch.device, list[Entry]] = {}
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
                        masters, grads, 1.0, post_scale=post_scale, zero_grads=False, sumsq=self.sumsq[device],
                        backend=self.backend,
                    )
                    masters, grads, used = [], [], 0
                if e is not None:
                    masters.append(e.view)
                    grads.append(zeros[used : used + n].view(e.view.shape))
                    used += n

    # ------------------------------------------------------------------------------------------- window
    def touched_entries(self) -> list[Entry]:
        """The params that received a gradient in the current window."""
        return [e for e, t in zip(self.entries, self.touched) if t]

    def any_touched(self) -> bool:
        return any(self.touched)

    def zero_sumsq(self) -> None:
        for t in self.sumsq.values():
            t.zero_()

    def zero_untouched(self) -> None:
        """Regions of params without a grad this window may hold an earlier window's values (a first grad
        overwrites rather than adds); a distributed sum must not see them."""
        self._materialize()
        for e, touched in zip(self.entries, self.touched):
            if not touched:
                e.view.zero_()

    def found(self) -> torch.Tensor | None:
        return _combined(self.found_inf)

    def norm_squared(self) -> torch.Tensor | None:
        return _combined(self.sumsq)

    def set_found(self, device: torch.device | None, value: bool) -> None:
        """Every device's flag cleared, then ``device``'s (all, when None) set to ``value``."""
        for d, flag in self.found_inf.items():
            flag.fill_(1.0 if value and (device is None or d == device) else 0.0)

    def reset(self) -> None:
        """A new window: nothing touched, no inf seen."""
        self.touched = [False] * len(self.entries)
        self.set_found(None, False)

    def holds_frozen(self) -> bool:
        """Whether a param frozen during the window still has a master (it leaves when the window ends)."""
        return any(not e.param.requires_grad and e.param.grad is None for e in self.entries)

    def scale_all_(self, coef: torch.Tensor) -> None:
        # One op per buffer; regions of params without a grad this window are never read, so scaling them too is
        # harmless.
        self._materialize()
        for key, buffer in self.buffers.items():
            buffer.mul_(coef.to(key[0], non_blocking=True))

    def load(self, buffers: list[torch.Tensor], touched: list[bool]) -> None:
        self._materialize()
        for buffer, saved in zip(self.buffers.values(), buffers):
            buffer.copy_(saved)
        self.touched = list(touched)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_walk"] = None  # holds the original params; the copy's first step rebuilds it
        return state


def _signature(groups: list[dict[str, Any]], trainable: Params) -> tuple[int, ...]:
    return tuple(id(p) for _, p in trainable) + tuple(len(g["params"]) for g in groups)


def _combined(per_device: dict[torch.device, torch.Tensor]) -> torch.Tensor | None:
    tensors = list(per_device.values())
    if not tensors:
        return None
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t.to(total.device, non_blocking=True)
    return total


def _aligned(offset: int) -> int:
    """The next view offset in a flat master buffer: a multiple of 4 elements, i.e. 16 bytes. The CUDA kernel's
    16-byte vector loads need both the master and the grad 16-byte aligned (else that tensor takes the scalar
    path); packing views back to back would leave most of them misaligned. The gaps (< 16 B a param) stay zero."""
    return (offset + _VIEW_ALIGNMENT_ELEMENTS - 1) // _VIEW_ALIGNMENT_ELEMENTS * _VIEW_ALIGNMENT_ELEMENTS


def param_name(groups: list[dict[str, Any]], position: int) -> str:
    """How a user finds the param at ``position`` of the flattened param_groups."""
    for g, group in enumerate(groups):
        if position < len(group["params"]):
            return f"param_groups[{g}]['params'][{position}]"
        position -= len(group["params"])
    return f"param {position}"


def check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.layout != torch.strided:
        raise ValueError(
            f"fusedaccum: a parameter of shape {tuple(p.shape)} has a sparse ({grad.layout}) gradient; "
            "GradAccumulator accumulates dense gradients only (e.g. nn.Embedding(sparse=False))"
        )
    if p.dtype not in FLOAT_DTYPES or grad.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fusedaccum: a parameter is {p.dtype} with a {grad.dtype} gradient; GradAccumulator "
            f"supports {', '.join(str(d) for d in FLOAT_DTYPES)} (float32 masters)"
        )


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    if saved["group_sizes"] != current["group_sizes"]:
        return f"param group sizes {saved['group_sizes']} saved vs {current['group_sizes']} here"
    a, b = saved["params"], current["params"]
    for i, (x, y) in enumerate(zip(a, b)):
        if list(x) != list(y):
            return f"trainable param {i}: [position, shape, dtype] {list(x)} saved vs {list(y)} here"
    if len(a) != len(b):
        return f"{len(a)} trainable params saved vs {len(b)} here"
    return f"master buffers {saved['buffers']} saved vs {current['buffers']} here"
