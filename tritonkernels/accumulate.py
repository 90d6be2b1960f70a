"""Triton kernel of fusedaccum's accumulate op: ``_accumulate_kernel`` and its launcher ``accumulate_triton``.

Multi-tensor in one launch for any number of tensors: the launcher uploads one int64 table (per tensor:
master address, grad address, numel, grad dtype code; per program: tensor index and chunk index; and a
zeroed completion counter) and the kernel casts the addresses to typed pointers. Each program owns one
chunk of ``CHUNK`` elements and writes one sum-of-squares partial; the last program to finish (counted with
an integer atomic) adds the partials in program order, so the norm is deterministic and no float atomics
are used. Scalars are cast to fp32 explicitly inside the kernel (callers may pass fp64 Python floats).

Arguments arrive validated by ``fusedaccum.ops``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

CHUNK = 65536  # elements per program; the same split as the C++/CUDA kernels (accumulate_math.h)
BLOCK = 1024  # elements per loop step inside a program
TENSOR_FIELDS = 4  # master address, grad address, numel, grad dtype code
GRAD_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _grad_pointer(grad_addr, GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = grad_addr.to(tl.pointer_type(GRAD_DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _accumulate_block(master, grad_base, grad_dtype, offsets, mask, s, ps, sumsq, nonfinite,
                      OVERWRITE: tl.constexpr, ZERO_GRADS: tl.constexpr, ALIGNED: tl.constexpr):
    """One BLOCK of elements: the per-element maths of csrc/accumulate_math.h. Returns (sumsq, nonfinite)."""
    if grad_dtype == 1:
        g = tl.load(_grad_pointer(grad_base, tl.bfloat16, ALIGNED) + offsets, mask=mask, other=0.0).to(tl.float32)
    elif grad_dtype == 2:
        g = tl.load(_grad_pointer(grad_base, tl.float16, ALIGNED) + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(_grad_pointer(grad_base, tl.float32, ALIGNED) + offsets, mask=mask, other=0.0)
    nonfinite = nonfinite | (tl.abs(g) > 3.4028234663852886e38).to(tl.int32) | (g != g).to(tl.int32)
    if OVERWRITE:
        m = g * s
    else:
        m = tl.fma(g, s, tl.load(master + offsets, mask=mask, other=0.0))
    m = m * ps
    tl.store(master + offsets, m, mask=mask)
    sumsq += tl.where(mask, m * m, 0.0)
    if ZERO_GRADS:
        if grad_dtype == 1:
            tl.store(_grad_pointer(grad_base, tl.bfloat16, ALIGNED) + offsets, tl.zeros_like(g).to(tl.bfloat16),
                     mask=mask)
        elif grad_dtype == 2:
            tl.store(_grad_pointer(grad_base, tl.float16, ALIGNED) + offsets, tl.zeros_like(g).to(tl.float16),
                     mask=mask)
        else:
            tl.store(_grad_pointer(grad_base, tl.float32, ALIGNED) + offsets, tl.zeros_like(g), mask=mask)
    return sumsq, nonfinite


@triton.jit
def _accumulate_kernel(
    table_ptr,
    num_tensors,
    scale_ptr,
    scale,
    post_scale_ptr,
    post_scale,
    found_inf_ptr,
    sumsq_ptr,
    partials_ptr,
    HAS_SCALE_PTR: tl.constexpr,
    HAS_POST_SCALE_PTR: tl.constexpr,
    OVERWRITE: tl.constexpr,
    ZERO_GRADS: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_SUMSQ: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    block_map = table_ptr + num_tensors * 4
    tensor = tl.load(block_map + 2 * pid)
    chunk = tl.load(block_map + 2 * pid + 1)
    master_addr = tl.load(table_ptr + tensor * 4)
    grad_addr = tl.load(table_ptr + tensor * 4 + 1)
    numel = tl.load(table_ptr + tensor * 4 + 2)
    grad_dtype = tl.load(table_ptr + tensor * 4 + 3)

    if HAS_SCALE_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = tl.cast(scale, tl.float32)
    if HAS_POST_SCALE_PTR:
        ps = tl.load(post_scale_ptr).to(tl.float32)
    else:
        ps = tl.cast(post_scale, tl.float32)

    start = chunk * CHUNK
    n = tl.minimum(numel - start, CHUNK)
    master = master_addr.to(tl.pointer_type(tl.float32)) + start
    if ALIGNED:
        # Every master and grad starts on a 16-byte boundary (the launcher checked) and chunks start at multiples
        # of CHUNK elements: telling the compiler lets it emit 16-byte vector loads and stores.
        master = tl.multiple_of(master, 16)
    grad_base = grad_addr + start * tl.where(grad_dtype == 0, 4, 2)
    sumsq = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    # Whole blocks first, with a mask the compiler can prove all-true (offsets < CHUNK): with the alignment hints
    # that lets it emit 16-byte loads and stores, which a data-dependent mask (offsets < n) prevents. Then the tail.
    full = n // BLOCK * BLOCK
    for offset in range(0, full, BLOCK):
        offsets = offset + tl.arange(0, BLOCK)
        if ALIGNED:
            offsets = tl.max_contiguous(tl.multiple_of(offsets, BLOCK), BLOCK)
        sumsq, nonfinite = _accumulate_block(master, grad_base, grad_dtype, offsets, offsets < CHUNK, s, ps, sumsq,
                                             nonfinite, OVERWRITE, ZERO_GRADS, ALIGNED)
    if full < n:
        offsets = full + tl.arange(0, BLOCK)
        sumsq, nonfinite = _accumulate_block(master, grad_base, grad_dtype, offsets, offsets < n, s, ps, sumsq,
                                             nonfinite, OVERWRITE, ZERO_GRADS, ALIGNED)

    if HAS_FOUND_INF:
        if tl.max(nonfinite, axis=0) > 0:
            tl.store(found_inf_ptr, 1.0)
    if HAS_SUMSQ:
        tl.store(partials_ptr + pid, tl.sum(sumsq, axis=0))
        counter = table_ptr + num_tensors * 4 + num_programs * 2
        # acq_rel: our partial is visible before the count, and the last program sees every partial.
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == num_programs - 1:
            total = tl.zeros([BLOCK], dtype=tl.float64)
            # Own loop variables: reusing the element loop's (int64) names for these int32 ones fails to compile.
            for first in range(0, num_programs, BLOCK):
                programs = first + tl.arange(0, BLOCK)
                total += tl.load(partials_ptr + programs, mask=programs < num_programs, other=0.0, volatile=True).to(
                    tl.float64
                )
            previous = tl.load(sumsq_ptr).to(tl.float64)
            tl.store(sumsq_ptr, (previous + tl.sum(total, axis=0)).to(tl.float32))


def _launch_table(masters: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """The int64 table (tensor rows, program map, zeroed counter) on the tensors' device, built without a
    per-chunk Python loop and uploaded with one asynchronous copy from pinned memory."""
    pairs = [(m, g) for m, g in zip(masters, grads) if m.numel() > 0]
    rows = torch.tensor(
        [[m.data_ptr(), g.data_ptr(), m.numel(), GRAD_DTYPE_CODES[g.dtype]] for m, g in pairs], dtype=torch.int64
    ).reshape(-1, TENSOR_FIELDS)
    chunks = (rows[:, 2] + CHUNK - 1) // CHUNK
    tensor_of_program = torch.repeat_interleave(torch.arange(len(pairs)), chunks)
    first_program = torch.cumsum(chunks, 0) - chunks
    chunk_of_program = torch.arange(tensor_of_program.numel()) - first_program[tensor_of_program]
    program_map = torch.stack([tensor_of_program, chunk_of_program], dim=1)
    table = torch.cat([rows.reshape(-1), program_map.reshape(-1), torch.zeros(1, dtype=torch.int64)])
    device = masters[0].device
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table, len(pairs), program_map.shape[0]


def accumulate_triton(
    masters: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float,
    scale_tensor: torch.Tensor | None,
    overwrite: bool,
    post_scale: float,
    post_scale_tensor: torch.Tensor | None,
    zero_grads: bool,
    found_inf: torch.Tensor | None,
    sumsq: torch.Tensor | None,
) -> None:
    """Launch :func:`_accumulate_kernel` once for every (master, grad) pair; see ``fusedaccum.ops.accumulate_``."""
    if not any(m.numel() for m in masters):
        return
    table, num_tensors, num_programs = _launch_table(masters, grads)
    # 16-byte vector access needs every base address 16-byte aligned (chunk starts keep it: CHUNK * 2 bytes is a
    # multiple of 16); one misaligned tensor sends the whole launch down the scalar path.
    aligned = all((m.data_ptr() | g.data_ptr()) % 16 == 0 for m, g in zip(masters, grads))
    device = masters[0].device
    partials = torch.empty(num_programs if sumsq is not None else 1, dtype=torch.float32, device=device)
    dummy = partials  # stands in for absent optional pointers; never read (constexpr flags)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _accumulate_kernel[(num_programs,)](
            table,
            num_tensors,
            scale_tensor if scale_tensor is not None else dummy,
            float(scale),
            post_scale_tensor if post_scale_tensor is not None else dummy,
            float(post_scale),
            found_inf if found_inf is not None else dummy,
            sumsq if sumsq is not None else dummy,
            partials,
            HAS_SCALE_PTR=scale_tensor is not None,
            HAS_POST_SCALE_PTR=post_scale_tensor is not None,
            OVERWRITE=overwrite,
            ZERO_GRADS=zero_grads,
            HAS_FOUND_INF=found_inf is not None,
            HAS_SUMSQ=sumsq is not None,
            ALIGNED=aligned,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
        )

