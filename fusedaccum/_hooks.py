"""``accumulate_in_backward=True``: each parameter's gradient goes into its float32 master the moment autograd
finishes it (a post-accumulate-grad hook per param), and its ``.grad`` is freed at once.

The maths is the default mode's: a param's first grad of the window overwrites its master, the window's last
micro-step (known before backward: the next one ``step()`` will count) post-scales by 1/W and adds to the norm.
Distributed, the masters keep raw sums and the last backward issues each bucket's all-reduce as soon as its
params are final. This part keeps the hooks and the micro-step's bookkeeping; the masters, the window and the
reducer are handed to it by the facade.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ._amp import ScalerLink
from ._master_grads import FLOAT_DTYPES, Entry, MasterGrads, check_grad
from ._window import Phase, Window
from .distributed import BucketedAllReduce, LocalReduction, local_grad


class BackwardHooks:
    """The hooks of one wrapper and what they did since the last counted micro-step. The same verbs as the default
    mode's :class:`fusedaccum._accumulation.AtStep`."""

    in_backward = True
    open_window = False  # the window has accumulation_steps micro-steps

    def __init__(self) -> None:
        self._handles: dict[int, tuple[torch.Tensor, Any]] = {}  # id(param) -> (param, handle)
        self.consumed: set[int] = set()  # params (by id) whose grad a hook consumed since the last step()
        self._sumsq_stale = False  # a param got a second grad after its master was final (last micro-step)
        # Distributed: grads that arrived in the last micro-step after their bucket's all-reduce had been issued, by
        # entry index (reduced separately at step(): distributed.reduce_late).
        self.held_back: dict[int, torch.Tensor] = {}
        # Autograd runs the hooks of CPU params on the thread that called backward and those of each CUDA device on
        # that device's thread: with params on several devices, hooks run concurrently. They share the window's
        # bookkeeping (and the bucket issue order, which every rank must follow), so they take turns.
        self.lock = threading.Lock()

    def register(self, params: list[torch.Tensor], callback: Callable[[torch.Tensor], None]) -> None:
        """One hook on every leaf float param of ``params``, frozen ones included: a param unfrozen later
        (``requires_grad_(True)``, no wrapper call in between) then reaches ``callback`` at its first grad, as in a
        wrapper built with it trainable (which a resume does). Hooks of params no longer listed are removed,
        params already hooked keep theirs (a hook may be running: this can be called from one). ``callback`` is
        held as the caller gives it (a weak reference to the wrapper, so that a dropped wrapper neither stays
        alive through the model's params nor keeps eating their grads)."""
        wanted = {id(p): p for p in params if p.is_leaf and p.dtype in FLOAT_DTYPES and p.layout == torch.strided}
        for key, (p, handle) in list(self._handles.items()):
            if wanted.get(key) is not p:
                handle.remove()
                del self._handles[key]
        for key, p in wanted.items():
            if key in self._handles:
                continue
            frozen = not p.requires_grad
            if frozen:
                p.requires_grad_(True)  # torch takes the hook only from a tensor that requires grad; it stays
            try:
                self._handles[key] = (p, p.register_post_accumulate_grad_hook(callback))
            finally:
                if frozen:
                    p.requires_grad_(False)

    def on_grad(
        self, param: torch.Tensor, masters: MasterGrads, window: Window, scaler: ScalerLink,
        reduction: LocalReduction, sync_layout: Callable[[], None], reset_window: Callable[[], None],
    ) -> None:
        """Autograd has finished ``param``'s grad for this backward: into its master now."""
        grad = param.grad
        if grad is None:
            return
        with self.lock:
            try:
                check_grad(param, grad)
            except (TypeError, ValueError) as error:
                # Earlier grads of this backward are already in the masters and this one cannot be: the window
                # cannot be completed as the large batch would, so it is dropped, and the error says so.
                reset_window()
                raise type(error)(f"{error}. The window was discarded (accumulate_in_backward had already added "
                                  "other gradients of this backward)") from None
            entry = masters.entry_of(param)
            if entry is None:
                if window.phase is Phase.REDUCING:
                    return  # the layout cannot grow under a reduction: step() refuses, with its message
                # Unfrozen since the last layout sync: its master now, where a wrapper built with it trainable has it.
                sync_layout()
                entry = masters.entry_of(param)
                if entry is None:
                    return  # not one of the wrapper's params any more: step() sees its grad
            grad = local_grad(param, grad)  # FSDP2 runs these hooks on the sharded param, after its reduce-scatter
            self.accumulate(entry, grad if grad.is_contiguous() else grad.contiguous(), masters, window, scaler,
                            reduction.buckets)

    def accumulate(
        self, entry: Entry, grad: torch.Tensor, masters: MasterGrads, window: Window, scaler: ScalerLink,
        reducer: BucketedAllReduce | None,
    ) -> None:
        """Add one param's grad into its master now, with the default mode's maths, and free the grad."""
        index = entry.index
        key = id(entry.param)
        last = window.is_last  # known before backward: the micro-step step() will count next
        distributed = reducer is not None
        scale = scaler.hooked_scale()
        if last and not self.consumed:
            if distributed:
                # The first grad of the last backward: no bucket is issued yet; count each one's params afresh.
                reducer.start_final_backward()
            else:
                masters.zero_sumsq()  # the first grad of the last micro-step starts the window's norm²
        second_grad = last and key in self.consumed
        if second_grad and distributed and reducer.param_issued(index):
            # A second grad for this param in the last micro-step (two backwards before one step()) after its
            # bucket's all-reduce was issued: that region is the collective's now. Keep the grad aside; step()
            # all-reduces such grads once more, on every rank, and adds them (distributed.reduce_late).
            held = self.held_back.get(index)
            first = held is None
            if first:
                held = torch.empty(entry.view.shape, dtype=torch.float32, device=entry.key[0])
            masters.accumulate_one_(entry, grad, scale, overwrite=first, into=held)
            self.held_back[index] = held  # only once it holds the grad: a refused call leaves no garbage behind
        elif second_grad and not distributed:
            # A second grad for this param in the last micro-step (in the default mode they would have summed in
            # .grad): its master is already final, m = (M + g1 s) / W, so add g2 s / W. Its sumsq term is now
            # stale: step() recounts sumsq.
            masters.accumulate_one_(entry, grad, scale * window.post_scale(1.0))
            self._sumsq_stale = True
        else:
            local_last = last and not distributed
            masters.accumulate_one_(
                entry, grad, scale, overwrite=not masters.touched[index],
                post_scale=window.post_scale(1.0) if local_last else 1.0, with_sumsq=local_last,
            )
        masters.touched[index] = True
        self.consumed.add(key)
        window.enter(Phase.REDUCING if last and distributed else Phase.BACKWARD_NOT_COUNTED)
        entry.param.grad = None  # freed now: at most one param's low-precision grad is alive during backward
        if last and distributed and not second_grad:
            reducer.param_final(index)

    def refuse_weight(self, weight: Any) -> None:
        if weight is not None:
            raise ValueError(
                "fusedaccum: step(weight=...) cannot be used with accumulate_in_backward=True: the hooks scale the "
                "window's last micro-step by 1/sum(weights) during backward, before step() could give its weight. "
                "Use the default mode (accumulate_in_backward=False) for weighted windows"
            )

    @staticmethod
    def ends_window(window: Window, grads: list[tuple[Entry, torch.Tensor]]) -> bool:
        """Whether this step() ends the window: its last micro-step."""
        return window.is_last

    def micro_step(
        self, grads: list[tuple[Entry, torch.Tensor]], w: float, ref: float, masters: MasterGrads, window: Window,
        scaler: ScalerLink, reduction: LocalReduction, groups: list[dict[str, Any]], weighted: bool,
    ) -> None:
        """step(): the hooks added this micro-step's grads; any they did not see (a .grad set by hand) take their
        path now (checked together first); then the micro-step is finished for counting."""
        if grads:
            masters.check_args(grads, groups)
        for entry, grad in grads:
            self.accumulate(entry, grad, masters, window, scaler, reduction.buckets)
        self._finish_micro_step(masters, window, reduction.scales_locally)
        scaler.micro_step_counted()
        window.count(w, weighted, ref)

    def _finish_micro_step(self, masters: MasterGrads, window: Window, scales_locally: bool) -> None:
        """On the window's last micro-step (single process), bring the masters of params without a grad in it to
        1/W too, and the norm up to date."""
        if window.is_last and scales_locally:  # distributed: the 1/W and the norm come after the reduction
            post_scale = window.post_scale(1.0)
            if not self.consumed:
                masters.zero_sumsq()  # no grad at all this micro-step: sumsq still holds the previous window's norm²
            lagging = [e for e, t in zip(masters.entries, masters.touched) if t and id(e.param) not in self.consumed]
            masters.scale_only_(lagging, post_scale)
            if self._sumsq_stale:
                # A param got a second grad after its master was final: its sumsq term is out of date. Recount all
                # (post_scale 1 leaves the masters as they are); rare, one read+write pass.
                masters.zero_sumsq()
                masters.scale_only_(masters.touched_entries(), 1.0)
        self.micro_step_counted()

    def micro_step_counted(self) -> None:
        self.consumed.clear()
        self._sumsq_stale = False

    def reset(self) -> None:
        """A new window."""
        self.micro_step_counted()
        self.held_back.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles point at the original params, locks do not copy, the fresh grads of a backward in progress
        # are the original's: a copy starts clean and its wrapper registers its own hooks.
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()


class OpenWindowHooks(BackwardHooks):
    """``accumulation_steps=None``: the window is everything between two ``step()`` calls, for loops and frameworks
    that call ``step()`` once per window (they own the accumulation knob). Each backward's grads go into the
    masters from the hooks, and the backward is counted as a micro-step when it ends (an autograd end-of-backward
    callback); ``step()`` applies the window with its true count, like :meth:`GradAccumulator.flush`."""

    open_window = True

    def __init__(self) -> None:
        super().__init__()
        self._counting = False  # a backward's end is already queued to be counted

    def accumulate(
        self, entry: Entry, grad: torch.Tensor, masters: MasterGrads, window: Window, scaler: ScalerLink,
        reduction: BucketedAllReduce | None,
    ) -> None:
        if not self._counting:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(
                    lambda: self._backward_ended(window, scaler)
                )
                self._counting = True
            except RuntimeError:
                pass  # not inside a backward (a .grad set by hand, found by step()): step() counts it
        super().accumulate(entry, grad, masters, window, scaler, reduction)

    def _backward_ended(self, window: Window, scaler: ScalerLink) -> None:
        with self.lock:
            self._counting = False
            self.micro_step_counted()
            scaler.micro_step_counted()
            window.count(1.0, False, 1.0)

    @staticmethod
    def ends_window(window: Window, grads: list[tuple[Entry, torch.Tensor]]) -> bool:
        """Every step() ends the window, unless nothing was accumulated since the last (then it does nothing)."""
        return window.micro_step > 0 or bool(grads)

    def micro_step(
        self, grads: list[tuple[Entry, torch.Tensor]], w: float, ref: float, masters: MasterGrads, window: Window,
        scaler: ScalerLink, reduction: LocalReduction, groups: list[dict[str, Any]], weighted: bool,
    ) -> None:
        """step(): grads no hook saw (set by hand) join the window as one more micro-step; then, single process,
        the whole window's masters get their 1/W (and the loss scale's inverse) and its norm in one extra pass."""
        if grads:
            masters.check_args(grads, groups)
            for entry, grad in grads:
                BackwardHooks.accumulate(self, entry, grad, masters, window, scaler, reduction.buckets)
            self.micro_step_counted()
            scaler.micro_step_counted()
            window.count(1.0, False, 1.0)
        if window.micro_step and reduction.scales_locally:  # distributed: 1/W and the norm after the reduction
            masters.zero_sumsq()
            masters.scale_only_(masters.touched_entries(), window.post_scale())

    def reset(self) -> None:
        super().reset()
        self._counting = False


def weak_callback(owner: Any, method: str) -> Callable[[torch.Tensor], None]:
    """A hook that calls ``owner.method(param)`` while ``owner`` is alive, holding it weakly."""
    ref = weakref.ref(owner)

    def hook(param: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(param)

    return hook
