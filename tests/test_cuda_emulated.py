"""The CUDA kernel (csrc/cuda/accumulate_kernel.cu) on CPU tensors under the SIMT emulation of tests/simt.

test_ops.py runs its whole op matrix on it too (the "cuda-emulated" cases); this file checks what that matrix
does not: that the emulation reports the classic bugs, that the masters are bit-identical to the C++ CPU
kernel's, that the sum of squares has the same bits whatever the block order, block concurrency and pointer
alignment, the launch-table packing (both table sizes) and the launcher's memset.
"""

from __future__ import annotations

import ctypes
import math
import os

import pytest
import torch

from fusedaccum import ops, reference

CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation

CHUNK = 65536
UNIT_ROUNDOFF = 2.0**-24


def random_tensor(n, dtype, generator, offset=0):
    """n random values (magnitudes over several binades) in a tensor starting `offset` elements into its storage,
    so offset > 0 gives a pointer that is not 16-byte aligned."""
    magnitude = 2.0 ** torch.randint(-6, 7, (1,), generator=generator).item()
    base = (torch.randn(n + offset, generator=generator, dtype=torch.float64) * magnitude).to(dtype)
    return base[offset:]


def make_case(sizes, dtypes, seed, master_offset=0, grad_offset=0):
    generator = torch.Generator().manual_seed(seed)
    masters = [random_tensor(n, torch.float32, generator, master_offset) for n in sizes]
    grads = [random_tensor(n, dtypes[i % len(dtypes)], generator, grad_offset) for i, n in enumerate(sizes)]
    return masters, grads


def clone_at(tensors, offset):
    """Copies with the same values, `offset` elements into fresh storage."""
    out = []
    for t in tensors:
        base = torch.empty(t.numel() + offset, dtype=t.dtype)
        view = base[offset:]
        view.copy_(t)
        out.append(view)
    return out


def run(masters, grads, emulation=None, **kwargs):
    """accumulate_ on copies, by the C++ CPU kernel or (emulation given) the emulated CUDA kernel."""
    m = [clone_at([t], t.storage_offset())[0] for t in masters]  # keeps the (mis)alignment
    g = [clone_at([t], t.storage_offset())[0] for t in grads]
    sumsq = torch.full((1,), 0.25)
    found_inf = torch.zeros(1)
    if emulation is None:
        ops.accumulate_(m, g, sumsq=sumsq, found_inf=found_inf, backend="cpu", **kwargs)
    else:
        with emulation.override_cpu_kernel():
            ops.accumulate_(m, g, sumsq=sumsq, found_inf=found_inf, backend="cpu", **kwargs)
    return m, g, sumsq, found_inf


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ------------------------------------------------------------------------------------ the emulation itself
@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "divergent barrier"),
    ("exit_before_barrier", "threads wait at __syncthreads (emulated_kernel.cpp"),
    ("half_warp_mask", "leaves out its own lane"),
    ("missing_lane", "exited while its warp waits for it"),
])
def test_emulation_reports_classic_bugs(emulation, name, message):
    status, _ = emulation.kernel().selftest(name)
    assert status == -1, f"the emulation missed the bug in {name}"
    assert message in emulation.kernel().error()


def test_emulation_missing_barrier_reads_poison_and_correct_code_passes(emulation):
    status, out = emulation.kernel().selftest("missing_barrier")
    assert status == 0
    # Each thread reads its neighbour's slot without a barrier: some of them run before the neighbour wrote it
    # and see the 0xFF poison (-1), never the neighbour's value for all of them.
    assert any(out[t] != (t + 1) % 64 for t in range(64))
    assert -1 in out[:64]
    status, out = emulation.kernel().selftest("correct_reduction")
    assert status == 0, emulation.kernel().error()
    assert out[:64] == [1032] * 64  # __syncthreads_or: 1; __syncthreads_count of even threads: 32
    assert out[64] == sum(range(64))  # warp sums of the neighbours' values, added atomically


def test_emulation_shuffle_variants(emulation):
    status, out = emulation.kernel().selftest("shuffle_variants", threads=32)
    assert status == 0, emulation.kernel().error()
    lanes = range(32)
    assert out[:32] == [lane - 3 if lane >= 3 else lane for lane in lanes]  # __shfl_up_sync by 3
    assert out[32:64] == [lane ^ 5 for lane in lanes]  # __shfl_xor_sync
    assert out[64:96] == [70] * 32  # __shfl_sync from lane 7
    # __shfl_down_sync by 4 within segments of 8, then __syncthreads_and: all true (2), not all (0)
    assert out[96:] == [(lane + 4 if lane % 8 < 4 else lane) * 10 + 2 for lane in lanes]


def test_guard_bytes_catch_a_write_past_the_end(emulation):
    with pytest.raises(AssertionError, match="guard bytes"):
        with emulation.GuardedBuffers() as guarded:
            address = guarded.stage(torch.zeros(10))
            ctypes.memset(address + 40, 0, 1)


# ------------------------------------------------------------------------------------ the kernel
@pytest.mark.parametrize("master_offset,grad_offset", [(0, 0), (1, 0), (0, 1), (3, 5)])
@pytest.mark.parametrize("overwrite,zero_grads,scale_tensor", [(False, True, False), (True, False, True)])
def test_masters_bit_identical_to_cpu_kernel(emulation, master_offset, grad_offset, overwrite, zero_grads,
                                             scale_tensor):
    """Same maths header, same fused multiply-add: the same bits, aligned (vector path) or not (scalar path)."""
    seed = int.from_bytes(os.urandom(4), "little")
    sizes = [2 * CHUNK + 13, 1, 97, 4103, 8, 0, 15]
    masters, grads = make_case(sizes, [torch.bfloat16, torch.float32, torch.float16], seed, master_offset,
                               grad_offset)
    kwargs = {"scale": torch.tensor([0.37]) if scale_tensor else 0.37, "post_scale": 0.125, "overwrite": overwrite,
              "zero_grads": zero_grads}
    m_cpu, g_cpu, s_cpu, f_cpu = run(masters, grads, **kwargs)
    m_emu, g_emu, s_emu, f_emu = run(masters, grads, emulation, **kwargs)
    assert all(m.data_ptr() % 16 == 4 * master_offset % 16 for m in m_emu if m.numel())
    assert all(g.data_ptr() % 16 == g.element_size() * grad_offset % 16 for g in g_emu if g.numel())
    for i in range(len(sizes)):
        assert torch.equal(bits(m_cpu[i]), bits(m_emu[i])), f"masters[{i}] differ (seed {seed})"
        assert torch.equal(bits(g_cpu[i]), bits(g_emu[i])), f"grads[{i}] differ (seed {seed})"
    assert f_emu.item() == f_cpu.item() == 0.0
    # The norms are summed in different orders; both against the float64 oracle.
    m64 = [m.double() for m in masters]
    want = torch.tensor([float(torch.tensor(0.25))], dtype=torch.float64)
    reference.accumulate_loop_(m64, [g.double() for g in grads], float(torch.tensor(0.37)), overwrite=overwrite,
                               post_scale=0.125, zero_grads=False, sumsq=want)
    tolerance = (128 + math.log2(sum(sizes) + 2) + 8) * UNIT_ROUNDOFF * want.item()
    assert abs(s_emu.item() - want.item()) <= tolerance
    assert abs(s_cpu.item() - want.item()) <= tolerance


def test_sumsq_bits_independent_of_block_order_concurrency_and_alignment(emulation):
    """The partials are added in block order by whichever block finishes last, and each thread adds its
    elements in the same order on the vector and the scalar path: one result, bit for bit."""
    seed = int.from_bytes(os.urandom(4), "little")
    sizes = [3 * CHUNK + 11, 1000, 5, CHUNK, 77, 2 * CHUNK]
    masters, grads = make_case(sizes, [torch.bfloat16, torch.float32], seed)
    kernel = emulation.kernel()
    results = []
    for block_seed, workers, shuffle_threads, offset in [(1, 1, False, 0), (2, 2, True, 0), (3, 3, True, 0),
                                                         (4, 2, True, 1), (5, 3, True, 3), (6, 1, True, 2)]:
        kernel.configure(seed=block_seed, workers=workers, shuffle_threads=shuffle_threads)
        m_in, g_in = clone_at(masters, offset), clone_at(grads, offset)
        assert all(t.data_ptr() % 16 == t.element_size() * offset % 16 for t in m_in + g_in)
        m, _, sumsq, _ = run(m_in, g_in, emulation, scale=0.3, post_scale=0.5)
        results.append((m, sumsq))
    m0, s0 = results[0]
    for m, sumsq in results[1:]:
        assert torch.equal(bits(sumsq), bits(s0)), f"sumsq {sumsq.item()!r} != {s0.item()!r} (seed {seed})"
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(m, m0))


def test_nothing_to_launch_launches_and_zeroes_nothing(emulation):
    kernel = emulation.kernel()
    kernel.reset_stats()
    masters = [torch.zeros(0), torch.zeros(0)]
    grads = [torch.zeros(0, dtype=torch.bfloat16), torch.zeros(0)]
    _, _, sumsq, found_inf = run(masters, grads, emulation, scale=2.0)
    assert sumsq.item() == 0.25 and found_inf.item() == 0.0
    stats = kernel.stats()
    assert stats["launches"] == 0 and stats["memsets"] == 0, stats


def expected_packing(sizes, max_tensors, max_blocks):
    """Launches and blocks of the launch-table packing, modelled independently of the C++."""
    launches = tensors = blocks = total_blocks = 0
    for n in sizes:
        if n == 0:
            continue
        if tensors == max_tensors:
            launches, tensors, blocks = launches + 1, 0, 0
        for _ in range(-(-n // CHUNK)):
            if blocks == max_blocks:  # the tensor goes on in the next table
                launches, tensors, blocks = launches + 1, 0, 0
            blocks += 1
            total_blocks += 1
        tensors += 1
    return launches + (blocks > 0), total_blocks


@pytest.mark.parametrize("driver_version,compute_major,table", [
    (13000, 9, (320, 4096, 32764)),  # CUDA >= 12.1: 32 KB of kernel parameters
    (12000, 9, (64, 256, 4096)),     # an older driver: the classic 4 KiB table
    (13000, 6, (64, 256, 4096)),     # Pascal: 4 KiB whatever the driver
])
def test_launch_tables(emulation, driver_version, compute_major, table):
    """More tensors than a table holds (with empty ones among them), and tensors spanning several chunks; for
    the classic table also more blocks than it holds, a tensor split across two launches."""
    max_tensors, max_blocks, parameter_limit = table
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(0, 40, (2 * max_tensors + 7,), generator=generator)]
    sizes[5] = 3 * CHUNK + 1
    if max_blocks == 256:
        sizes[70:70] = [200 * CHUNK + 3, 60 * CHUNK]  # 261 blocks in two tensors: the second spans two tables
    masters, grads = make_case(sizes, [torch.bfloat16, torch.float32, torch.float16], seed)
    kernel = emulation.kernel()
    kernel.configure(driver_version=driver_version, compute_major=compute_major)
    kernel.reset_stats()
    m_emu, g_emu, s_emu, _ = run(masters, grads, emulation, scale=0.7)
    stats = kernel.stats()
    launches, blocks = expected_packing(sizes, max_tensors, max_blocks)
    assert (stats["launches"], stats["blocks"]) == (launches, blocks), (stats, seed)
    assert stats["max_param_bytes"] <= parameter_limit
    assert (stats["max_param_bytes"] > 4096) == (parameter_limit > 4096)
    m_cpu, g_cpu, s_cpu, _ = run(masters, grads, scale=0.7)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(m_emu, m_cpu)), f"seed {seed}"
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(g_emu, g_cpu)), f"seed {seed}"
    assert s_emu.item() == pytest.approx(s_cpu.item(), rel=1e-5)


def test_opcheck_on_emulated_kernel(emulation):
    masters, grads = make_case([10, 20, 30], [torch.bfloat16], 0)
    args = (masters, grads, 0.5, torch.tensor([2.0]), False, 0.25, None, True, torch.zeros(1), torch.zeros(1), "cpu")
    with emulation.override_cpu_kernel():
        torch.library.opcheck(torch.ops.fusedaccum.accumulate_.default, args)


@pytest.mark.parametrize("driver_version,max_tensors,max_blocks", [(13000, 320, 4096), (12000, 64, 256)])
def test_workspace_sizing_for_tensors_past_2_31_elements(emulation, driver_version, max_tensors, max_blocks):
    """The launcher's plan for tensors far larger than memory here (sizing only: the scratch request is refused,
    so nothing is launched or touched): 2^33 + 5 elements is 131,073 chunks, element offsets past 2^31, split over
    many tables. The launcher plans once and asks for its scratch once, before any launch."""
    kernel = emulation.kernel()
    kernel.configure(driver_version=driver_version)
    sizes = [2**33 + 5, 0, 70000, 2**31 + 1]
    pairs = (emulation.TensorPair * len(sizes))(
        *[emulation.TensorPair(0x10000 * (i + 1), 0x20000 * (i + 1), n, 1) for i, n in enumerate(sizes)])
    launches, blocks = expected_packing(sizes, max_tensors, max_blocks)
    requests = []

    def refuse(nbytes, _context):
        requests.append(nbytes)
        return None  # out of memory: the launcher must stop before launching anything

    sumsq_address = 0x30000  # never dereferenced: the launch stops at the refused scratch
    options = emulation.AccumulateOptions(1.0, None, 1.0, None, False, False, None, sumsq_address)
    kernel.reset_stats()
    status = kernel.lib.fa_launch(pairs, len(sizes), ctypes.byref(options), emulation.ALLOCATE(refuse), None)
    assert status == CUDA_ERROR_MEMORY_ALLOCATION
    assert requests == [4 * blocks + 4 * launches]
    assert kernel.stats()["launches"] == 0 and kernel.stats()["memsets"] == 0
    assert blocks == 131073 + 2 + 32769
