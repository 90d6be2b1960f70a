"""The fusedaccum ops: one public function each, validated once, dispatched to a backend.

Path of a call: :func:`accumulate_` (here) -> custom op ``torch.ops.fusedaccum.accumulate_`` (here: validate,
pick a backend) -> one of

* ``torch.ops.fusedaccum.accumulate_kernel_`` -> ``csrc/cpu/accumulate_cpu.cpp`` or
  ``csrc/cuda/accumulate_cuda.cpp`` + ``csrc/cuda/accumulate_kernel.cu``,
* ``tritonkernels/accumulate.py`` (``accumulate_triton``),
* ``fusedaccum/reference.py`` (plain PyTorch).

The ops are PyTorch custom operators with their mutated arguments declared and fake kernels registered, so
they pass ``torch.library.opcheck`` and compile under ``torch.compile(fullgraph=True)`` as single nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference

Scale = reference.Scale

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_library = torch.library.Library("fusedaccum", "FRAGMENT")
_library.define(
    "accumulate_(Tensor(a!)[] masters, Tensor(b!)[] grads, float scale, Tensor? scale_tensor, bool overwrite, "
    "float post_scale, Tensor? post_scale_tensor, bool zero_grads, Tensor(c!)? found_inf, Tensor(d!)? sumsq, "
    "str backend) -> ()"
)
_library.define("copy_(Tensor(a!)[] dsts, Tensor[] srcs) -> ()")


# --------------------------------------------------------------------------------------------- validation
def _as_list(name: str, tensors: object) -> list[torch.Tensor]:
    """The argument as a list; what its elements are is checked with the rest (_check_elements)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"fusedaccum: {name} must be a list of tensors, got {type(tensors).__name__}")
    return list(tensors)


def _check_elements(name: str, tensors: Sequence[object]) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fusedaccum: {name}[{i}] is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"fusedaccum: {name}[{i}] is a {t.layout} tensor; only dense (strided) tensors")


def _check_pairs(
    dst_name: str,
    dsts: Sequence[torch.Tensor],
    src_name: str,
    srcs: Sequence[torch.Tensor],
    dst_dtypes: tuple[torch.dtype, ...],
    src_dtypes: tuple[torch.dtype, ...],
) -> torch.device | None:
    """Checks the pairing rules shared by every op; returns the common device (None for empty lists)."""
    _check_elements(dst_name, dsts)
    _check_elements(src_name, srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"fusedaccum: {dst_name} has {len(dsts)} tensors but {src_name} has {len(srcs)}")
    device = dsts[0].device if dsts else None
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.dtype not in dst_dtypes:
            raise TypeError(f"fusedaccum: {dst_name}[{i}] is {d.dtype}; it must be one of {dst_dtypes}")
        if s.dtype not in src_dtypes:
            raise TypeError(f"fusedaccum: {src_name}[{i}] is {s.dtype}; it must be one of {src_dtypes}")
        if d.shape != s.shape:
            raise ValueError(
                f"fusedaccum: {dst_name}[{i}] has shape {tuple(d.shape)} but {src_name}[{i}] has {tuple(s.shape)}"
            )
        if d.device != device or s.device != device:
            raise ValueError(
                f"fusedaccum: all tensors must be on one device; {dst_name}[{i}] is on {d.device}, "
                f"{src_name}[{i}] on {s.device}, {dst_name}[0] on {device}"
            )
        for name, t in ((dst_name, d), (src_name, s)):
            if not t.is_contiguous():
                raise ValueError(f"fusedaccum: {name}[{i}] is not contiguous (call .contiguous() on it)")
    return device


def _check_scalar(name: str, t: torch.Tensor | None, device: torch.device | None) -> None:
    if t is None:
        return
    if t.dtype != torch.float32 or t.numel() != 1 or (device is not None and t.device != device):
        raise ValueError(
            f"fusedaccum: {name} must be a one-element float32 tensor on {device}; got shape {tuple(t.shape)}, "
            f"{t.dtype}, on {t.device}"
        )


def _check_no_overlap(groups: Sequence[tuple[str, Sequence[torch.Tensor]]],
                      read_only: Sequence[tuple[str, torch.Tensor | None]] = ()) -> None:
    """No two tensors (of any list) may share memory: the kernels read and write them in parallel. The
    ``read_only`` tensors (scales) may share memory with each other, not with anything in ``groups``."""
    spans = []
    for group, (_, tensors) in enumerate(groups):
        for i, t in enumerate(tensors):
            if t.numel() > 0:
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), group, i))
    spans.sort()
    for (_, end, group_a, i_a), (start, _, group_b, i_b) in zip(spans, spans[1:]):
        if start < end:
            (ga, ia), (gb, ib) = sorted([(group_a, i_a), (group_b, i_b)])
            raise ValueError(f"fusedaccum: {groups[ga][0]}[{ia}] and {groups[gb][0]}[{ib}] overlap in memory")
    for name, t in read_only:
        if t is None or t.numel() == 0:
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        for span_start, span_end, group, i in spans:
            if span_start < end and start < span_end:
                raise ValueError(
                    f"fusedaccum: {name} shares memory with {groups[group][0]}[{i}], which the op writes; pass a "
                    f"copy ({name}.clone())"
                )


def _check_writable(lists: Sequence[tuple[str, Sequence[torch.Tensor]]],
                    scalars: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """The op writes these in place: refused where torch would refuse an in-place write (and the reference
    backend would fail halfway), before any backend writes anything."""
    inference_mode = torch.is_inference_mode_enabled()
    named = [(f"{name}[{i}]", t) for name, tensors in lists for i, t in enumerate(tensors)]
    for label, t in named + [(name, t) for name, t in scalars if t is not None]:
        if t.requires_grad:
            raise ValueError(
                f"fusedaccum: {label} requires grad; the op writes it in place (pass a tensor that does not require "
                "grad, e.g. .detach())"
            )
        if t.is_inference() and not inference_mode:
            raise ValueError(
                f"fusedaccum: {label} is an inference tensor (made under torch.inference_mode()); the op writes it "
                "in place, which torch allows only inside inference mode"
            )


def _fast_check(name: str, *args) -> bool:
    """The compiled yes/no pre-check (csrc/argument_checks.h), when the extension is loaded.

    The rules and messages live here; the pre-check only saves walking them attribute by attribute in Python,
    which costs ~2 us per tensor pair (310 us for GPT-2's 150 pairs on the 2-core AMD EPYC CI machine; the
    whole validation with the compiled check: 40 us, timed the same way). On "no", the Python checks below run
    and name the problem.
    """
    extension, _ = backends.compiled_extension()
    if extension is None:
        return False
    try:
        return getattr(extension, name)(*args)
    except TypeError:  # an element that is not a tensor: pybind cannot convert it; the Python checks name it
        return False


def _validate_accumulate(masters, grads, scale_tensor, post_scale_tensor, zero_grads, found_inf, sumsq,
                         real: bool) -> None:
    if real and _fast_check("accumulate_args_valid", masters, grads, scale_tensor, post_scale_tensor, found_inf,
                            sumsq):
        return
    device = _check_pairs("masters", masters, "grads", grads, (torch.float32,), GRAD_DTYPES)
    _check_scalar("scale", scale_tensor, device)
    _check_scalar("post_scale", post_scale_tensor, device)
    _check_scalar("found_inf", found_inf, device)
    _check_scalar("sumsq", sumsq, device)
    _check_writable([("masters", masters), ("grads", grads if zero_grads else [])],
                    [("found_inf", found_inf), ("sumsq", sumsq)])
    if real:  # fake tensors have no memory to compare
        outputs = [t for t in (found_inf, sumsq) if t is not None]
        _check_no_overlap([("masters", masters), ("grads", grads), ("found_inf/sumsq", outputs)],
                          [("scale", scale_tensor), ("post_scale", post_scale_tensor)])


# ------------------------------------------------------------------------------------------- custom ops
def _accumulate_impl(masters, grads, scale, scale_tensor, overwrite, post_scale, post_scale_tensor, zero_grads,
                     found_inf, sumsq, backend):
    _validate_accumulate(masters, grads, scale_tensor, post_scale_tensor, zero_grads, found_inf, sumsq, real=True)
    if not masters:
        return
    chosen = backends.resolve(backend or None, masters[0].device)
    args = (masters, grads, scale, scale_tensor, overwrite, post_scale, post_scale_tensor, zero_grads, found_inf,
            sumsq)
    if chosen in ("cpu", "cuda"):
        torch.ops.fusedaccum.accumulate_kernel_(*args)
    elif chosen == "triton":
        backends.triton_kernels()[0].accumulate_triton(*args)
    else:
        reference.accumulate_(
            masters, grads, scale if scale_tensor is None else scale_tensor, overwrite=overwrite,
            post_scale=post_scale if post_scale_tensor is None else post_scale_tensor, zero_grads=zero_grads,
            found_inf=found_inf, sumsq=sumsq,
        )


def _accumulate_fake(masters, grads, scale, scale_tensor, overwrite, post_scale, post_scale_tensor, zero_grads,
                     found_inf, sumsq, backend):
    _validate_accumulate(masters, grads, scale_tensor, post_scale_tensor, zero_grads, found_inf, sumsq, real=False)


def _copy_impl(dsts, srcs):
    if not _fast_check("copy_args_valid", dsts, srcs):
        _check_pairs("dsts", dsts, "srcs", srcs, GRAD_DTYPES, GRAD_DTYPES)
        _check_no_overlap([("dsts", dsts), ("srcs", srcs)])
    reference.copy_(dsts, srcs)


def _copy_fake(dsts, srcs):
    _check_pairs("dsts", dsts, "srcs", srcs, GRAD_DTYPES, GRAD_DTYPES)


for _key in ("CPU", "CUDA"):
    _library.impl("accumulate_", _accumulate_impl, _key)
    _library.impl("copy_", _copy_impl, _key)
torch.library.register_fake("fusedaccum::accumulate_", _accumulate_fake, lib=_library)
torch.library.register_fake("fusedaccum::copy_", _copy_fake, lib=_library)


# ------------------------------------------------------------------------------------------- public API
def _split_scale(name: str, value: Scale) -> tuple[float, torch.Tensor | None]:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"fusedaccum: {name} must be a dense one-element float32 tensor, got a {value.layout} one")
        return 1.0, value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fusedaccum: {name} must be a number or a one-element float32 tensor, got {value!r}")
    return float(value), None


def _check_flag(name: str, value: object) -> None:
    # A truthy string ("no", "False") silently meaning True is worse than an error.
    if not isinstance(value, bool):
        raise TypeError(f"fusedaccum: {name} must be True or False, got {value!r}")


def _call_op(op: torch._ops.OpOverload, lists: tuple[tuple[str, list[object]], ...], *args: object) -> None:
    """``op(*args)``, with the list elements checked only when the call fails.

    A list element that is not a dense tensor is refused by the op's schema (not a tensor) or by the dispatcher
    (no kernel for sparse) before any kernel runs, in their own words; then the element checks name it. Walking
    every element up front instead cost ~0.2 us per tensor (52 us for GPT-2's 148 pairs on the 2-core AMD EPYC
    CI machine, torch.utils.benchmark), and the compiled pre-check looks at the layouts anyway.
    """
    try:
        op(*args)
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        try:
            for name, tensors in lists:
                _check_elements(name, tensors)
        except (TypeError, ValueError) as named:
            raise named from None
        raise


def accumulate_(
    masters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: Scale = 1.0,
    *,
    overwrite: bool = False,
    post_scale: Scale = 1.0,
    zero_grads: bool = True,
    found_inf: torch.Tensor | None = None,
    sumsq: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Add scaled gradients into float32 master buffers, in place, in one fused pass and (on CUDA) one launch.

    For every pair ``(m, g)`` of ``masters`` and ``grads``::

        m = (0 if overwrite else m) + g * scale     # one fused multiply-add
        m = m * post_scale
        g = 0                     if zero_grads
        found_inf[0] = 1.0        if any element of any g is inf or nan   (never reset by this op)
        sumsq[0] += sum of m * m  over every element of every resulting m

    Args:
        masters: float32 tensors, updated in place.
        grads: float32, bfloat16 or float16 tensors (the list may mix them), each of its master's shape, on
            the same device, contiguous, sharing no memory with any other argument.
        scale: a number, or a one-element float32 tensor on the tensors' device (e.g. a loss scaler's inverse
            scale: read on the device, no host sync). Applied in float32.
        overwrite: ignore the masters' old values (a window's first micro-step: the masters are not read).
        post_scale: like ``scale``, multiplied in after the add (e.g. 1/N on a window's last micro-step).
        zero_grads: set the grads to zero after reading them.
        found_inf: optional one-element float32 tensor, set to 1.0 when a grad is not finite.
        sumsq: optional one-element float32 tensor, incremented by the sum of squares of the new masters
            (the squared grad norm for clipping). Deterministic: the same inputs give the same bits.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; default ``$FUSEDACCUM_BACKEND``, else
            the fastest available for the tensors' device (see :mod:`fusedaccum.backends`).

    Raises:
        TypeError / ValueError: bad input, naming the list index and what is wrong; no tensor is changed.
        fusedaccum.backends.BackendUnavailableError: the requested backend cannot serve these tensors.
    """
    masters = _as_list("masters", masters)
    grads = _as_list("grads", grads)
    _check_flag("overwrite", overwrite)
    _check_flag("zero_grads", zero_grads)
    scale_value, scale_tensor = _split_scale("scale", scale)
    post_scale_value, post_scale_tensor = _split_scale("post_scale", post_scale)
    backends.check_name(backend)
    if not masters and not grads:
        return
    _call_op(
        torch.ops.fusedaccum.accumulate_.default, (("masters", masters), ("grads", grads)),
        masters, grads, scale_value, scale_tensor, overwrite, post_scale_value, post_scale_tensor,
        zero_grads, found_inf, sumsq, backend or "",
    )


def check_accumulate_args(
    masters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: Scale = 1.0,
    *,
    post_scale: Scale = 1.0,
    zero_grads: bool = True,
    found_inf: torch.Tensor | None = None,
    sumsq: torch.Tensor | None = None,
) -> None:
    """Raise the error :func:`accumulate_` would raise for these arguments, and touch nothing.

    For callers that must decide before changing their own state (the GradAccumulator validates a micro-step's
    whole batch of tensors before it counts the micro-step). The same checks as :func:`accumulate_`.
    """
    masters = _as_list("masters", masters)
    grads = _as_list("grads", grads)
    _, scale_tensor = _split_scale("scale", scale)
    _, post_scale_tensor = _split_scale("post_scale", post_scale)
    _check_flag("zero_grads", zero_grads)
    _validate_accumulate(masters, grads, scale_tensor, post_scale_tensor, zero_grads, found_inf, sumsq, real=True)


def copy_(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """Cast-copy ``srcs[i]`` into ``dsts[i]`` for every i (e.g. float32 master weights into bf16 params).

    float32, bfloat16 and float16 tensors, pairwise of one shape, on one device, contiguous, not
    overlapping. One multi-tensor launch per (dst dtype, src dtype) group on CUDA (``torch._foreach_copy_``
    already does this; see :func:`fusedaccum.reference.copy_`).
    """
    dsts = _as_list("dsts", dsts)
    srcs = _as_list("srcs", srcs)
    if not dsts and not srcs:
        return
    _call_op(torch.ops.fusedaccum.copy_.default, (("dsts", dsts), ("srcs", srcs)), dsts, srcs)
