"""fusedaccum.ops.accumulate_ and copy_ on every backend that can run here, against a float64 oracle.

The oracle is the reference implementation itself, run on float64 copies of the inputs (scales rounded to
float32 first, as the op documents). Every test draws fresh random data; outputs the op must write are
poisoned first.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedaccum
from fusedaccum import backends, ops, reference

CHUNK = 65536  # the kernels' chunk (csrc/accumulate_math.h); sizes above it span several chunks/blocks
UNIT_ROUNDOFF = 2.0**-24  # float32
GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE_LISTS = {
    "empty": [0],
    "one": [1],
    "97": [97],
    "4097": [4097],
    "two_chunks": [2 * CHUNK + 3],
    # More tensors than one CUDA launch table holds (64), mixed sizes, empty ones among them.
    "many_mixed": [0, 1, 3, 17, 256, 1000, 4097, 31] * 9 + [CHUNK + 5],
}


# The CUDA kernel's own source run on CPU tensors under the SIMT emulation of tests/simt (conftest.py): the
# "cpu" backend, whose kernel is the emulated CUDA kernel while a test marked cuda_emulated runs.
CUDA_EMULATED = pytest.param("cpu", "cpu", marks=pytest.mark.cuda_emulated, id="cuda-emulated")


def backend_params(names=("cpu", "reference", "triton", "cuda")):
    """(backend, device) pairs; cuda-device cases are marked and skip without a GPU."""
    params = []
    for name in names:
        if name == "cuda":
            params.append(pytest.param("cuda", "cuda", marks=pytest.mark.cuda, id="cuda"))
            params.append(CUDA_EMULATED)
            continue
        params.append(pytest.param(name, "cpu", id=name))
        if name in ("triton", "reference"):
            params.append(pytest.param(name, "cuda", marks=pytest.mark.cuda, id=f"{name}-cuda"))
    return params


def skip_unless_available(backend: str, device: str) -> None:
    reason = backends.why_unavailable(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")


def random_tensor(n: int, dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    # Normal values times a per-tensor magnitude spanning several binades: catches wrong scaling/rounding.
    magnitude = 2.0 ** torch.randint(-6, 7, (1,), generator=generator).item()
    return (torch.randn(n, generator=generator, dtype=torch.float64) * magnitude).to(dtype).to(device)


def make_pairs(sizes, grad_dtypes, device, generator):
    masters = [random_tensor(n, torch.float32, device, generator) for n in sizes]
    grads = [random_tensor(n, grad_dtypes[i % len(grad_dtypes)], device, generator) for i, n in enumerate(sizes)]
    return masters, grads


def fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def expected(masters, grads, scale, overwrite, post_scale, sumsq_start):
    """Float64 oracle: the reference implementation on float64 copies."""
    m64 = [m.detach().cpu().double() for m in masters]
    g64 = [g.detach().cpu().double() for g in grads]
    sumsq = torch.tensor([sumsq_start], dtype=torch.float64)
    reference.accumulate_loop_(m64, g64, fp32(scale), overwrite=overwrite, post_scale=fp32(post_scale),
                               zero_grads=False, sumsq=sumsq)
    return m64, sumsq.item()


def assert_masters_close(out, m_start, grads, ref, scale, post_scale, overwrite):
    """Elementwise bound of the float32 computation: three roundings (multiply, add, multiply), each at most
    one unit roundoff of its operands' magnitude, plus second-order terms (4u in all)."""
    s, ps = abs(fp32(scale)), abs(fp32(post_scale))
    for i, (o, m0, g, r) in enumerate(zip(out, m_start, grads, ref)):
        o64 = o.detach().cpu().double()
        magnitude = ((0 if overwrite else m0.cpu().double().abs()) + g.cpu().double().abs() * s) * ps
        bound = 4 * UNIT_ROUNDOFF * magnitude + 2.0**-140
        err = (o64 - r).abs()
        assert torch.all(err <= bound), f"masters[{i}]: max error {err.max().item():.3e} over the float32 bound"


def assert_sumsq_close(got: float, want: float, count: int):
    # Blocked float32 sums (<= 128 terms serially per thread/lane, then trees and a float64 total) plus the
    # 4u error of each squared element: a relative bound of (128 + log2(count) + 8) u.
    tolerance = (128 + math.log2(count + 2) + 8) * UNIT_ROUNDOFF * abs(want) + 2.0**-140
    assert abs(got - want) <= tolerance, f"sumsq {got!r} != {want!r} (tolerance {tolerance:.3e})"


def run_case(backend, device, sizes, grad_dtypes, *, scale_kind, overwrite, post_scale_kind, zero_grads, seed):
    generator = torch.Generator().manual_seed(seed)
    masters, grads = make_pairs(sizes, grad_dtypes, device, generator)
    if overwrite:  # the op must not read the old masters: poison them
        for m in masters:
            m.fill_(float("nan"))
    m_start = [m.clone() for m in masters]
    g_start = [g.clone() for g in grads]
    scale = 0.1 + torch.rand((), generator=generator).item()
    post_scale = 1.0 / (1 + torch.randint(1, 9, (), generator=generator).item())
    sumsq_start = torch.rand((), generator=generator).item()
    found_inf = torch.zeros(1, device=device)
    sumsq = torch.tensor([sumsq_start], device=device)
    ops.accumulate_(
        masters, grads,
        torch.tensor([scale], device=device) if scale_kind == "tensor" else scale,
        overwrite=overwrite,
        post_scale=torch.tensor([post_scale], device=device) if post_scale_kind == "tensor" else post_scale,
        zero_grads=zero_grads, found_inf=found_inf, sumsq=sumsq, backend=backend,
    )
    ref, ref_sumsq = expected(m_start, g_start, scale, overwrite, post_scale, fp32(sumsq_start))
    assert_masters_close(masters, m_start, g_start, ref, scale, post_scale, overwrite)
    assert_sumsq_close(sumsq.item(), ref_sumsq, sum(sizes))
    assert found_inf.item() == 0.0
    for i, (g, g0) in enumerate(zip(grads, g_start)):
        if zero_grads:
            assert torch.all(g == 0), f"grads[{i}] not zeroed"
        else:
            assert torch.equal(g, g0), f"grads[{i}] changed although zero_grads=False"


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("sizes_name", list(SIZE_LISTS))
@pytest.mark.parametrize("dtype_name", [*GRAD_DTYPES, "mixed"])
def test_sizes_and_dtypes(backend, device, sizes_name, dtype_name):
    skip_unless_available(backend, device)
    dtypes = list(GRAD_DTYPES.values()) if dtype_name == "mixed" else [GRAD_DTYPES[dtype_name]]
    run_case(backend, device, SIZE_LISTS[sizes_name], dtypes, scale_kind="number", overwrite=False,
             post_scale_kind="number", zero_grads=True, seed=hash((backend, sizes_name, dtype_name)) % 2**31)


OPTION_GRID = list(itertools.product(["number", "tensor"], [False, True], ["number", "tensor"], [False, True]))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("scale_kind,overwrite,post_scale_kind,zero_grads", OPTION_GRID)
def test_every_option(backend, device, scale_kind, overwrite, post_scale_kind, zero_grads):
    skip_unless_available(backend, device)
    run_case(backend, device, [5, 4097, 130], [torch.bfloat16, torch.float32, torch.float16], scale_kind=scale_kind,
             overwrite=overwrite, post_scale_kind=post_scale_kind, zero_grads=zero_grads,
             seed=int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype_name", list(GRAD_DTYPES))
def test_nonfinite_grads_set_the_flag(backend, device, bad_value, dtype_name):
    skip_unless_available(backend, device)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    sizes = [300, CHUNK + 10, 7]
    masters, grads = make_pairs(sizes, [GRAD_DTYPES[dtype_name]], device, generator)
    found_inf = torch.zeros(1, device=device)
    ops.accumulate_(masters, grads, 0.5, found_inf=found_inf, backend=backend)
    assert found_inf.item() == 0.0, "finite grads must leave the flag at 0"

    masters, grads = make_pairs(sizes, [GRAD_DTYPES[dtype_name]], device, generator)
    victim = torch.randint(0, len(sizes), (), generator=generator).item()
    grads[victim][torch.randint(0, sizes[victim], (), generator=generator).item()] = bad_value
    ops.accumulate_(masters, grads, 0.5, found_inf=found_inf, backend=backend)
    assert found_inf.item() == 1.0
    assert all(torch.all(g == 0) for g in grads), "a non-finite grad must not stop the pass (grads zeroed)"

    # Never reset by the op: a later finite call leaves the 1 in place.
    masters, grads = make_pairs(sizes, [GRAD_DTYPES[dtype_name]], device, generator)
    ops.accumulate_(masters, grads, 0.5, found_inf=found_inf, backend=backend)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend,device", backend_params())
def test_deterministic(backend, device):
    """Two runs on the same inputs give the same bits, norm included."""
    skip_unless_available(backend, device)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    sizes = [3 * CHUNK + 11, 1000, 5, CHUNK]
    masters, grads = make_pairs(sizes, [torch.bfloat16, torch.float32], device, generator)
    results = []
    for _ in range(2):
        m = [t.clone() for t in masters]
        g = [t.clone() for t in grads]
        sumsq = torch.zeros(1, device=device)
        ops.accumulate_(m, g, 0.37, post_scale=0.25, sumsq=sumsq, backend=backend)
        results.append((m, sumsq))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert torch.equal(results[0][1], results[1][1])


def test_cpu_backend_matches_reference_on_masters_bit_for_bit():
    """The C++ kernel does one fused multiply-add and one multiply, like ATen's add(alpha=) with FMA: on fp32
    grads both give the correctly rounded fma, so the masters agree to the last bit (norms may differ)."""
    skip_unless_available("cpu", "cpu")
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    masters, grads = make_pairs([CHUNK + 77, 513], [torch.bfloat16, torch.float32], "cpu", generator)
    m_cpu, g_cpu = [t.clone() for t in masters], [t.clone() for t in grads]
    ops.accumulate_(m_cpu, g_cpu, 0.3, backend="cpu")
    m64 = [torch.addcmul(m.double(), g.double(), torch.tensor(fp32(0.3), dtype=torch.float64)) for m, g in
           zip(masters, grads)]
    # fma(g, s, m) is the float64 value g*s+m (exact for float32 inputs) rounded once to float32.
    assert all(torch.equal(a, b.float()) for a, b in zip(m_cpu, m64))


# --------------------------------------------------------------------------------------- property-based
finite_scale = st.floats(min_value=-8, max_value=8, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("cpu", marks=pytest.mark.cuda_emulated,
                                                                       id="cuda-emulated")])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=6),
    dtype_names=st.lists(st.sampled_from(list(GRAD_DTYPES)), min_size=1, max_size=3),
    scale=finite_scale,
    post_scale=finite_scale,
    scale_is_tensor=st.booleans(),
    overwrite=st.booleans(),
    zero_grads=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_matches_float64(backend, sizes, dtype_names, scale, post_scale, scale_is_tensor, overwrite,
                                  zero_grads, seed):
    skip_unless_available(backend, "cpu")
    generator = torch.Generator().manual_seed(seed)
    masters, grads = make_pairs(sizes, [GRAD_DTYPES[d] for d in dtype_names], "cpu", generator)
    m_start, g_start = [m.clone() for m in masters], [g.clone() for g in grads]
    sumsq = torch.zeros(1)
    ops.accumulate_(masters, grads, torch.tensor([scale]) if scale_is_tensor else scale, overwrite=overwrite,
                    post_scale=post_scale, zero_grads=zero_grads, sumsq=sumsq, backend=backend)
    ref, ref_sumsq = expected(m_start, g_start, scale, overwrite, post_scale, 0.0)
    assert_masters_close(masters, m_start, g_start, ref, scale, post_scale, overwrite)
    assert_sumsq_close(sumsq.item(), ref_sumsq, sum(sizes))
    for g, g0 in zip(grads, g_start):
        assert torch.equal(g, torch.zeros_like(g0) if zero_grads else g0)


# ------------------------------------------------------------------------------------------- bad input
def fresh_valid_args(device="cpu"):
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    masters, grads = make_pairs([10, 20, 30], [torch.bfloat16], device, generator)
    return {"masters": masters, "grads": grads, "found_inf": torch.zeros(1, device=device),
            "sumsq": torch.zeros(1, device=device)}


def _swap(i, value):
    def edit(args):
        args["grads"][i] = value(args)
    return edit


BAD_INPUTS = {
    "lengths_differ": (lambda a: a["grads"].pop(), ValueError, "masters has 3 tensors but grads has 2"),
    "shape_mismatch": (_swap(1, lambda a: torch.randn(4, 5).bfloat16()), ValueError, "grads[1] has (4, 5)"),
    "numel_mismatch": (_swap(2, lambda a: torch.randn(31).bfloat16()), ValueError, "masters[2] has shape (30,)"),
    "master_not_fp32": (lambda a: a["masters"].__setitem__(0, torch.randn(10, dtype=torch.float64)), TypeError,
                        "masters[0] is torch.float64"),
    "grad_dtype": (_swap(0, lambda a: torch.ones(10, dtype=torch.int32)), TypeError, "grads[0] is torch.int32"),
    "devices_differ": (_swap(1, lambda a: torch.randn(20, device="meta").bfloat16()), ValueError,
                       "grads[1] on meta"),
    "non_contiguous": (_swap(2, lambda a: torch.randn(60).bfloat16()[::2]), ValueError, "grads[2] is not contiguous"),
    "overlap": (_swap(1, lambda a: a["masters"][1].view(torch.bfloat16)[:20]), ValueError,
                "masters[1] and grads[1] overlap"),
    "grad_is_its_master": (_swap(0, lambda a: a["masters"][0]), ValueError, "masters[0] and grads[0] overlap"),
    "sparse": (_swap(0, lambda a: torch.randn(10).bfloat16().to_sparse()), ValueError,
               "grads[0] is a torch.sparse_coo"),
    "not_a_tensor": (_swap(0, lambda a: [1.0] * 10), TypeError, "grads[0] is a list, not a tensor"),
    "scale_shape": (lambda a: a.__setitem__("scale", torch.ones(2)), ValueError, "scale must be a one-element float32"),
    "scale_dtype": (lambda a: a.__setitem__("scale", torch.ones(1, dtype=torch.float64)), ValueError, "scale must"),
    "scale_device": (lambda a: a.__setitem__("scale", torch.ones(1, device="meta")), ValueError, "scale must"),
    "scale_type": (lambda a: a.__setitem__("scale", "2"), TypeError, "scale must be a number"),
    "found_inf_dtype": (lambda a: a.__setitem__("found_inf", torch.zeros(1, dtype=torch.bool)), ValueError,
                        "found_inf must be a one-element float32"),
    "found_inf_shape": (lambda a: a.__setitem__("found_inf", torch.zeros(2)), ValueError, "found_inf must be"),
    "sumsq_shape": (lambda a: a.__setitem__("sumsq", torch.zeros(3)), ValueError, "sumsq must be a one-element"),
    "sumsq_overlaps_master": (lambda a: a.__setitem__("sumsq", a["masters"][0][3:4]), ValueError, "overlap"),
    "unknown_backend": (lambda a: a.__setitem__("backend", "cuda-fast"), ValueError, "unknown backend 'cuda-fast'"),
    # Refused on every backend before anything is written (test_new_refusals_agree_on_every_backend):
    "scale_aliases_master": (lambda a: a.__setitem__("scale", a["masters"][0][4:5]), ValueError,
                             "scale shares memory with masters[0]"),
    "post_scale_aliases_master": (lambda a: a.__setitem__("post_scale", a["masters"][2][7:8]), ValueError,
                                  "post_scale shares memory with masters[2]"),
    "post_scale_aliases_sumsq": (lambda a: a.__setitem__("post_scale", a["sumsq"]), ValueError,
                                 "post_scale shares memory with found_inf/sumsq[1]"),
    "sparse_scale": (lambda a: a.__setitem__("scale", torch.ones(1).to_sparse()), ValueError,
                     "scale must be a dense one-element"),
    "inference_master": (lambda a: a["masters"].__setitem__(1, _inference_copy(a["masters"][1])), ValueError,
                         "masters[1] is an inference tensor"),
    "grad_requires_grad": (_swap(2, lambda a: a["grads"][2].clone().requires_grad_()), ValueError,
                           "grads[2] requires grad"),
    "master_requires_grad": (lambda a: a["masters"].__setitem__(0, a["masters"][0].clone().requires_grad_()),
                             ValueError, "masters[0] requires grad"),
    "overwrite_truthy_string": (lambda a: a.__setitem__("overwrite", "no"), TypeError,
                                "overwrite must be True or False, got 'no'"),
    "zero_grads_truthy_string": (lambda a: a.__setitem__("zero_grads", "False"), TypeError,
                                 "zero_grads must be True or False"),
}


def _inference_copy(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def checkable_tensors(args):
    """Every tensor of the arguments whose values can be compared afterwards."""
    found = []
    for value in args.values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
                found.append(t)
    return found


@pytest.mark.parametrize("kernel", ["cpu", pytest.param("cuda-emulated", marks=pytest.mark.cuda_emulated)])
@pytest.mark.parametrize("compiled_precheck", [True, False], ids=["precheck", "python-only"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_changes_nothing(case, compiled_precheck, kernel, monkeypatch):
    """With the compiled pre-check (it must say no) and without it (no extension): the same error."""
    if not compiled_precheck:
        monkeypatch.setattr(ops, "_fast_check", lambda *args: False)
    edit, error, message = BAD_INPUTS[case]
    args = fresh_valid_args()
    edit(args)
    snapshot = [(t, t.clone()) for t in checkable_tensors(args)]
    with pytest.raises(error, match=re.escape(message)):
        ops.accumulate_(**args)
    for t, before in snapshot:
        # Bits, not values: a bf16 view of float32 memory can hold NaN patterns, and NaN != NaN.
        assert torch.equal(t.detach().contiguous().view(torch.uint8), before.contiguous().view(torch.uint8)), (
            "a rejected call changed a tensor"
        )


NEW_REFUSALS = [case for case in BAD_INPUTS if case.startswith(("scale_aliases", "post_scale_aliases", "inference",
                                                                 "grad_requires", "master_requires"))]


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton",
                                     pytest.param("cpu", marks=pytest.mark.cuda_emulated, id="cuda-emulated")])
@pytest.mark.parametrize("case", NEW_REFUSALS)
def test_new_refusals_agree_on_every_backend(case, backend):
    """Aliased scales, inference-mode masters and grads that require grad: before, cpu/triton wrote them and
    reference raised halfway (after writing). Now every backend refuses before writing."""
    reason = backends.why_unavailable(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    edit, error, message = BAD_INPUTS[case]
    args = fresh_valid_args()
    edit(args)
    args["backend"] = backend
    snapshot = [(t, t.detach().clone()) for t in checkable_tensors(args)]
    with pytest.raises(error, match=re.escape(message)):
        ops.accumulate_(**args)
    for t, before in snapshot:
        assert torch.equal(t.detach().view(torch.uint8), before.view(torch.uint8)), "a rejected call changed a tensor"


def test_read_only_grads_may_require_grad():
    """With zero_grads=False the op only reads the grads (a create_graph backward leaves grads that require grad)."""
    args = fresh_valid_args()
    grads = [g.clone().requires_grad_() for g in args["grads"]]
    masters = [m.clone() for m in args["masters"]]
    ops.accumulate_(masters, grads, 0.5, overwrite=True, zero_grads=False)
    for m, g in zip(masters, grads):
        assert torch.equal(m, g.detach().float() * 0.5)


def test_one_chunk_size_everywhere():
    """The C++/CUDA kernels' chunk (accumulate_math.h, exported by _C), the Triton kernel's and the tests' agree:
    the per-chunk sumsq partials, and so the norm's bits, depend on it."""
    extension, reason = backends.compiled_extension()
    if extension is None:
        pytest.skip(reason)
    assert extension.chunk_elements == CHUNK
    kernels, reason = backends.triton_kernels()
    if kernels is not None:
        assert kernels.CHUNK == CHUNK


def test_compiled_precheck_accepts_valid_arguments():
    """A pre-check that said no to good input would only cost speed, silently: make it loud here."""
    extension, reason = backends.compiled_extension()
    if extension is None:
        pytest.skip(reason)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for sizes in SIZE_LISTS.values():
        masters, grads = make_pairs(sizes, list(GRAD_DTYPES.values()), "cpu", generator)
        assert extension.accumulate_args_valid(masters, grads, torch.ones(1), torch.ones(()), torch.zeros(1),
                                               torch.zeros(1))
        assert extension.accumulate_args_valid(masters, grads, None, None, None, None)
        assert extension.copy_args_valid([g.clone() for g in grads], masters)


def test_zero_dim_scalars_are_accepted():
    args = fresh_valid_args()
    ops.accumulate_(args["masters"], args["grads"], torch.tensor(2.0), found_inf=torch.zeros(()),
                    sumsq=torch.zeros(()))


def test_empty_lists_are_a_no_op():
    found_inf, sumsq = torch.zeros(1), torch.full((1,), 2.5)
    ops.accumulate_([], [], 3.0, found_inf=found_inf, sumsq=sumsq)
    assert found_inf.item() == 0.0 and sumsq.item() == 2.5
    ops.copy_([], [])


def test_cuda_backend_on_cpu_tensors_lists_every_backend():
    args = fresh_valid_args()
    with pytest.raises(backends.BackendUnavailableError) as raised:
        ops.accumulate_(args["masters"], args["grads"], backend="cuda")
    text = str(raised.value)
    for name in backends.BACKENDS:
        assert f"  {name}: " in text
    assert all(torch.equal(g, g) for g in args["grads"])


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VARIABLE, "reference")
    assert backends.resolve(None, torch.device("cpu")) == "reference"
    assert backends.resolve("cpu", torch.device("cpu")) == "cpu" or backends.why_unavailable("cpu", torch.device("cpu"))
    monkeypatch.setenv(backends.ENV_VARIABLE, "nonsense")
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense' \(from \$FUSEDACCUM_BACKEND\)"):
        backends.resolve(None, torch.device("cpu"))
    monkeypatch.delenv(backends.ENV_VARIABLE)
    expected_auto = "cpu" if backends.why_unavailable("cpu", torch.device("cpu")) is None else "reference"
    assert backends.resolve(None, torch.device("cpu")) == expected_auto


# ---------------------------------------------------------------------------------------------- copy_
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_copy_casts_like_torch(device):
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    srcs = [random_tensor(n, torch.float32, device, generator) for n in (0, 1, 97, 4097, 3)]
    dsts = [torch.full((n,), float("nan"), dtype=d, device=device)
            for n, d in zip((0, 1, 97, 4097, 3), (torch.bfloat16, torch.float16, torch.bfloat16, torch.float32,
                                                  torch.bfloat16))]
    ops.copy_(dsts, srcs)
    assert all(torch.equal(d, s.to(d.dtype)) for d, s in zip(dsts, srcs))


def test_copy_bad_input():
    with pytest.raises(ValueError, match=r"dsts\[0\] has shape \(3,\) but srcs\[0\] has \(4,\)"):
        ops.copy_([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(TypeError, match=r"srcs\[0\] is torch.int64"):
        ops.copy_([torch.zeros(3)], [torch.zeros(3, dtype=torch.int64)])


# ------------------------------------------------------------------------- custom op: opcheck, compile
def opcheck_args(device="cpu"):
    args = fresh_valid_args(device)
    return (args["masters"], args["grads"], 0.5, torch.tensor([2.0], device=device), False, 0.25, None, True,
            args["found_inf"], args["sumsq"])


@pytest.mark.parametrize("backend,device", backend_params(("cpu", "reference", "triton")))
def test_opcheck_accumulate(backend, device):
    skip_unless_available(backend, device)
    torch.library.opcheck(torch.ops.fusedaccum.accumulate_.default, (*opcheck_args(device), backend))


def test_opcheck_kernel_op_and_copy():
    skip_unless_available("cpu", "cpu")
    torch.library.opcheck(torch.ops.fusedaccum.accumulate_kernel_.default, opcheck_args(),
                          test_utils=("test_schema", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.fusedaccum.copy_.default,
                          ([torch.zeros(5, dtype=torch.bfloat16), torch.zeros(3)], [torch.randn(5), torch.randn(3)]))


def test_torch_compile_fullgraph():
    """The op is one node in the graph: fullgraph=True raises on any graph break."""
    torch._dynamo.reset()

    def micro_step(masters, grads, found_inf, sumsq):
        scaled = [g * 1.0 for g in grads]  # some ordinary ops around it
        ops.accumulate_(masters, scaled, 0.5, post_scale=0.25, found_inf=found_inf, sumsq=sumsq)
        return sumsq * 2

    compiled = torch.compile(micro_step, fullgraph=True, backend="inductor")
    args = fresh_valid_args()
    m_eager, m_comp = [m.clone() for m in args["masters"]], [m.clone() for m in args["masters"]]
    s_eager, s_comp = torch.zeros(1), torch.zeros(1)
    f_eager, f_comp = torch.zeros(1), torch.zeros(1)
    out_eager = micro_step(m_eager, args["grads"], f_eager, s_eager)
    out_comp = compiled(m_comp, args["grads"], f_comp, s_comp)
    assert all(torch.equal(a, b) for a, b in zip(m_eager, m_comp))
    assert torch.equal(out_eager, out_comp) and torch.equal(s_eager, s_comp)


# ---------------------------------------------------------------------------------------- build, import
def test_cuda_kernels_compiled_when_toolkit_present():
    """With a CUDA torch and a CUDA toolkit at build time, the CUDA backend must have been compiled."""
    try:
        from fusedaccum import _build_info
    except ImportError:
        pytest.fail("fusedaccum was not built (no _build_info)")
    toolkit_expected = os.environ.get("FUSEDACCUM_BUILD_CUDA") == "1"
    if torch.version.cuda is None or not (toolkit_expected or _build_info.CUDA_TOOLKIT):
        pytest.skip("no CUDA torch or no toolkit at build time")
    assert "cuda" in _build_info.COMPILED_BACKENDS
    extension, reason = backends.compiled_extension()
    assert extension is not None, reason
    assert extension.built_with_cuda
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedaccum::accumulate_kernel_", "CUDA")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("breakage", ["stale", "missing"])
def test_import_survives_a_broken_extension(breakage):
    patch = {
        "stale": "m = types.ModuleType('fusedaccum._build_info'); m.TORCH_VERSION = '0.0.0'; "
                 "sys.modules['fusedaccum._build_info'] = m",
        "missing": "sys.modules['fusedaccum._C'] = None",
    }[breakage]
    code = f"""
import sys, types, warnings, torch
{patch}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import fusedaccum
assert len([w for w in caught if 'fusedaccum._C' in str(w.message)]) == 1, [str(w.message) for w in caught]
from fusedaccum import backends, ops
reason = backends.why_unavailable('cpu', torch.device('cpu'))
assert reason and 'fusedaccum._C' in reason, reason
assert backends.resolve(None, torch.device('cpu')) == 'reference'
m, g = [torch.zeros(4)], [torch.ones(4)]
ops.accumulate_(m, g, 2.0)
assert torch.equal(m[0], torch.full((4,), 2.0))
print('ok')
"""
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_info_reports_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "fusedaccum.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for expected_text in (f"fusedaccum {fusedaccum.__version__}", f"torch      {torch.__version__}",
                          "backends for cpu tensors", "reference: available"):
        assert expected_text in result.stdout


TRITON_COMPILE_CHECK = """
import itertools, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fusedaccum.tritonkernels import accumulate as kernels
signature = {"table_ptr": "*i64", "num_tensors": "i32", "scale_ptr": "*fp32", "scale": "fp32",
             "post_scale_ptr": "*fp32", "post_scale": "fp32", "found_inf_ptr": "*fp32", "sumsq_ptr": "*fp32",
             "partials_ptr": "*fp32"}
flag_names = ["HAS_SCALE_PTR", "HAS_POST_SCALE_PTR", "OVERWRITE", "ZERO_GRADS", "HAS_FOUND_INF", "HAS_SUMSQ",
              "ALIGNED"]
for flags in itertools.product([False, True], repeat=len(flag_names)):
    constexprs = dict(zip(flag_names, flags), CHUNK=kernels.CHUNK, BLOCK=kernels.BLOCK)
    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(full)
    source = ASTSource(fn=kernels._accumulate_kernel, signature=full,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx, flags
    if dict(zip(flag_names, flags))["ALIGNED"]:
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, ("no 16-byte access when aligned", flags)
print("compiled", 2 ** len(flag_names))
"""


def test_triton_kernel_compiles_for_a_gpu_without_one():
    """The interpreter runs the kernel's Python, not Triton's compiler: compile it for sm_90 here (no GPU needed;
    triton ships ptxas), for every combination of its compile-time flags, so a compiled-mode-only error (types of
    loop-carried values, pointer casts) fails on every machine. In a subprocess: this one runs the interpreter."""
    module, reason = backends.triton_kernels()
    if module is None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRITON_COMPILE_CHECK], capture_output=True, text=True,
                            timeout=600, env=env)
    if result.returncode != 0 and "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this triton has no triton.backends.compiler.GPUTarget")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "compiled 128"
