"""float32 copies of bf16/fp16 parameters (``master_weights=True``): the wrapped optimizer steps these.

Every bf16/fp16 param the wrapped optimizer holds has one, trainable or frozen: freezing a param for a while
(and a checkpoint taken meanwhile) neither rounds its copy nor its optimizer state to bf16.
The copies live here, keyed by their parameter; the wrapped optimizer's state is keyed by the copies. They are
shown to it in its param_groups while it steps (:meth:`MasterWeights.swapped_in`) and, through state-dict hooks,
while its own ``state_dict()``/``load_state_dict()`` run, and written back to the params after each update.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from ._master_grads import Entry, param_name
from .distributed import as_param_grad


@dataclass
class _Copy:
    param: torch.Tensor
    master: torch.Tensor  # float32
    version: int  # param._version when master was last known to match the param


class MasterWeights:
    """The float32 master weights of one wrapper's bf16/fp16 params (empty when master_weights is off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._copies: dict[int, _Copy] = {}  # id(param) -> its copy
        self._hook_handles: list[Any] = []

    def master_of(self, param: torch.Tensor) -> torch.Tensor | None:
        copy = self._copies.get(id(param))
        return copy.master if copy is not None and copy.param is param else None

    def check(self, groups: list[dict[str, Any]]) -> None:
        """Params whose memory overlaps cannot each get a master weight: writing the copies back would conflict (and
        be refused only after the optimizer had stepped them)."""
        if not self.enabled:
            return
        spans = []
        for position, p in enumerate(p for g in groups for p in g["params"]):
            if p.dtype in _LOW_PRECISION and p.numel():
                start = p.data_ptr()
                spans.append((start, start + p.numel() * p.element_size(), position))
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(
                    f"fusedaccum: {param_name(groups, a)} and {param_name(groups, b)} share memory; with "
                    "master_weights=True each bf16/fp16 parameter needs memory of its own (its float32 copy is "
                    "written back after every update)"
                )

    def follow(self, groups: list[dict[str, Any]], state: dict[Any, Any]) -> None:
        """Copies for exactly the bf16/fp16 params of ``groups``: new ones get one, taking over any optimizer state
        they already had; params that left the groups lose theirs, and their state goes back to them."""
        if not self.enabled:
            return
        current = {id(p): p for g in groups for p in g["params"] if p.dtype in _LOW_PRECISION}
        for key, copy in list(self._copies.items()):
            if current.get(key) is not copy.param:
                del self._copies[key]
                if copy.master in state:  # back in the param's dtype, as Optimizer.load_state_dict would give it
                    state[copy.param] = _cast_state(state.pop(copy.master), copy.param.dtype)
        for key, p in current.items():
            if key not in self._copies:
                master = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                with torch.no_grad():
                    master.copy_(p)
                if p in state:  # stepped or loaded before wrapping: the state moves to the copy
                    state[master] = _cast_state(state.pop(p), torch.float32)
                self._copies[key] = _Copy(p, master, p._version)

    def rekey(self) -> None:
        """After a copy (deepcopy, pickle): keyed by object identity, which a copy changes."""
        self._copies = {id(c.param): c for c in self._copies.values()}

    def refresh(self) -> None:
        """A param changed outside the wrapper (e.g. model.load_state_dict) since its copy was written: the param
        wins, unless it is just the copy rounded (e.g. a checkpoint loaded in either order)."""
        for c in self._copies.values():
            if c.param._version != c.version:
                with torch.no_grad():
                    if not torch.equal(c.param, c.master.to(c.param.dtype)):
                        c.master.copy_(c.param)
                c.version = c.param._version

    def write_back(self) -> None:
        copies = list(self._copies.values())
        contiguous = [c for c in copies if c.param.is_contiguous()]
        with torch.no_grad():
            ops.copy_([c.param for c in contiguous], [c.master for c in contiguous])
            for c in copies:
                if not c.param.is_contiguous():
                    c.param.copy_(c.master)
        for c in copies:
            c.version = c.param._version

    def step_optimizer(self, optimizer: torch.optim.Optimizer, entries: list[Entry]) -> Any:
        """The wrapped optimizer's step on the window's gradient: the masters of ``entries`` (the params with a
        grad this window) as float32 grads of the copies, or of float32 params, or rounded once to a bf16/fp16
        param's dtype; then the copies are written back. The grads are removed again whatever happens."""
        casts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        holders: list[torch.Tensor] = []
        for e in entries:
            master = self.master_of(e.param)
            if master is not None:
                master.grad = e.view
                holders.append(master)
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
        self.refresh()
        try:
            with self.swapped_in(optimizer.param_groups):
                result = optimizer.step()
            self.write_back()
        finally:
            for t in holders:
                t.grad = None
        return result

    # ---------------------------------------------------------------------- the wrapped optimizer's view
    @contextmanager
    def swapped_in(self, groups: list[dict[str, Any]]) -> Iterator[None]:
        """Inside this block the param_groups hold the float32 copies (the wrapped optimizer steps them), and the
        model's params outside it."""
        self.swap_in(groups)
        try:
            yield
        finally:
            self.swap_out(groups)

    def swap_in(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            params = group["params"]
            for i, p in enumerate(params):
                master = self.master_of(p)
                if master is not None:
                    params[i] = master

    def swap_out(self, groups: list[dict[str, Any]]) -> None:
        # By identity, not by remembered positions: the wrapped optimizer's load_state_dict builds new groups.
        params_of = {id(c.master): c.param for c in self._copies.values()}
        for group in groups:
            params = group["params"]
            for i, p in enumerate(params):
                param = params_of.get(id(p))
                if param is not None:
                    params[i] = param

    def hook_state_dicts(self, optimizer: torch.optim.Optimizer) -> None:
        """The wrapped optimizer's state is keyed by the copies, which are not in its param_groups outside step();
        its own state_dict() and load_state_dict() (which users and libraries call on ``acc.optimizer``) see them
        through these hooks, so its state dict works, keeps float32 state and round-trips. The hooks hold this
        part weakly; an optimizer's copy (pickle, deepcopy) has none, and the wrapper's copy adds them again."""
        self._hook_handles = []
        if not self.enabled:
            return
        ref = weakref.ref(self)

        def swap_in(opt: torch.optim.Optimizer, state_dict: Any = None) -> None:
            weights = ref()
            if weights is None:
                return
            if state_dict is not None:
                _check_groups_match(opt.param_groups, state_dict)  # torch's own refusal, before the swap
            weights.swap_in(opt.param_groups)

        def swap_out(opt: torch.optim.Optimizer, state_dict: Any = None) -> None:
            weights = ref()
            if weights is not None:
                weights.swap_out(opt.param_groups)

        self._hook_handles = [
            optimizer.register_state_dict_pre_hook(swap_in, prepend=True),
            optimizer.register_state_dict_post_hook(swap_out),
            optimizer.register_load_state_dict_pre_hook(swap_in, prepend=True),
            optimizer.register_load_state_dict_post_hook(swap_out),
        ]

    # ------------------------------------------------------------------------------------ state dicts
    def saved(self, params: list[torch.Tensor], skip: set[int] | None = None) -> dict[int, torch.Tensor]:
        """The copies by the index of their param in ``params``, as state dicts hold them: the layout's params, or
        all params of the groups with ``skip`` (ids of the layout's) left out."""
        out = {}
        for i, p in enumerate(params):
            master = self.master_of(p)
            if master is not None and (skip is None or id(p) not in skip):
                out[i] = master
        return out

    def load(self, params: list[torch.Tensor], saved: dict[int, torch.Tensor]) -> None:
        for index, tensor in saved.items():
            copy = self._copies.get(id(params[int(index)]))
            if copy is not None:
                copy.master.copy_(tensor)
                # Not "in sync": the model may have been loaded (or changed) before or after this; the next update
                # compares the param with the rounded copy and keeps the copy only if they agree.
                copy.version = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hook_handles"] = []  # the wrapped optimizer's copy has no hooks; the wrapper's copy adds them
        return state


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _cast_state(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step" else v
        for k, v in state.items()
    }


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
