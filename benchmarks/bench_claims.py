"""The classic claims, measured (issue 4): "accumulation equals a large batch" and "accumulation saves memory".

**Equals a large batch.** A small GPT-style model (:class:`benchmarks.bench_end_to_end.TinyGPT`, random tokens)
is trained for K AdamW updates from one initial state on the same data, once with one large batch of N·B
sequences per update and once with N micro-batches of B, and the parameters are compared. Methods:

* ``large-batch``: the reference users mean by the claim (same model dtype, no accumulation);
* ``native-bf16`` / ``native-fp32``: ``(loss / N).backward()`` into ``param.grad`` of the model's dtype;
* ``native-fp32-grad_dtype`` (bf16 model, where torch has ``Tensor.grad_dtype``): autograd accumulates in fp32,
  the grads are cast to bf16 just before ``opt.step()`` (which refuses fp32 grads on bf16 parameters);
* ``fusedaccum``: ``fusedaccum.GradAccumulator(opt, accumulation_steps=N)``, fp32 master gradients;
* ``fusedaccum-master_weights`` (bf16 model): the same with ``master_weights=True`` (fp32 weights and optimizer
  state; the bf16 parameters that the model holds are compared).

Every method is compared with two references: the large batch in the model's own dtype, and the large batch
in float64 (how close to exact). The initial weights are rounded to bf16 for every run, so the bf16 model, the
fp32 model and the float64 reference all start from the very same numbers and one float64 run per N serves
both models. Reported differences, over all parameters: the largest absolute one; ||Δ||₂ relative to the
parameters' scale (||w_ref||₂; a per-tensor max ratio was tried and is dominated by the LayerNorm biases, which
start at zero); and ||Δ||₂ relative to how far the reference's training moved the weights (||w_ref,K − w_0||₂),
which says whether the difference matters: AdamW's update is about lr·sign(g) wherever a gradient element is
tiny, so a rounding difference there moves a weight by up to 2·lr in any method.

**Saves memory** needs a real high-water mark per configuration, which :mod:`benchmarks.bench_end_to_end`
measures (large batch against accumulation at the same effective batch); :func:`memory_rows` reads it from
that section.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

import fusedaccum

from . import common
from .bench_end_to_end import TinyGPT

# lr 1e-3 rather than the end-to-end section's 1e-4: a bf16 weight of magnitude ~0.1 has a unit in the last
# place of ~5e-4, so smaller updates would mostly round away and every method would look alike.
LR = 1e-3
SEED_MODEL, SEED_DATA = 0, 1


def _config(device: torch.device, mode: str) -> dict[str, Any]:
    if mode == "tiny":
        return {"vocab": 64, "d": 32, "layers": 1, "heads": 2, "context": 16, "batch": 2, "updates": 2,
                "ns": [2, 4]}
    # bf16 matmuls on a CPU without native bf16 units run ~5x slower than fp32: this model keeps the default
    # CPU run's share under a minute. N = 16 and 32 would triple it, so only GPUs and --full take them.
    ns = [4, 8, 16, 32] if mode == "full" or device.type == "cuda" else [4, 8]
    return {"vocab": 256, "d": 64, "layers": 2, "heads": 4, "context": 32, "batch": 4, "updates": 5, "ns": ns}


def _methods(dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """The methods that run for a model of ``dtype``, and the ones that do not, with the reason."""
    if dtype == torch.bfloat16:
        methods = ["large-batch", "native-bf16", "native-fp32-grad_dtype", "fusedaccum", "fusedaccum-master_weights"]
        skipped = {}
        if not hasattr(torch.Tensor, "grad_dtype"):
            methods.remove("native-fp32-grad_dtype")
            skipped["native-fp32-grad_dtype"] = f"torch {torch.__version__} has no Tensor.grad_dtype"
        return methods, skipped
    # On an fp32 model grad_dtype = float32 is native accumulation itself, and master weights change nothing.
    return ["large-batch", "native-fp32", "fusedaccum"], {}


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    # Low-precision logits are upcast for the softmax, as training code does; fp32/fp64 stay as they are.
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train(method: str, dtype: torch.dtype, n: int, init: dict[str, torch.Tensor], data: torch.Tensor,
          cfg: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
    """K updates of ``method`` with N micro-batches (or one batch of N·B); returns the final weights (float64).

    ``data`` is (K, at least N·B, context + 1) tokens; update k uses ``data[k, :N·B]``, split in order.
    """
    model = TinyGPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["context"])
    model.load_state_dict(init)
    model.to(device, dtype)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR)
    acc = None
    if method.startswith("fusedaccum"):
        acc = fusedaccum.GradAccumulator(opt, accumulation_steps=n, master_weights=method.endswith("master_weights"))
    grad_dtype = method == "native-fp32-grad_dtype"
    if grad_dtype:
        for p in params:
            p.grad_dtype = torch.float32
    b = cfg["batch"]
    updates = 0
    for k in range(cfg["updates"]):
        batch = data[k, : n * b]
        if method == "large-batch":
            _loss(model, batch).backward()
        elif acc is not None:
            for i in range(n):
                _loss(model, batch[i * b : (i + 1) * b]).backward()  # the wrapper divides by N, once
                acc.step()
                acc.zero_grad()
            updates += acc.stepped
            continue
        else:
            for i in range(n):
                (_loss(model, batch[i * b : (i + 1) * b]) / n).backward()
        common.native_optimizer_step(opt, params, fp32_grads=grad_dtype)
        updates += 1
    if updates != cfg["updates"]:  # a skipped window (inf/nan) would make the comparison meaningless
        raise RuntimeError(f"{method}: {updates} updates instead of {cfg['updates']}")
    return [p.detach().double().cpu() for p in params]


def compare(weights: list[torch.Tensor], ref: list[torch.Tensor], init: list[torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference, and ||Δ||₂ over the parameters' norm and over the reference's movement."""
    max_abs = max(float((w - r).abs().max()) for w, r in zip(weights, ref))
    diff = sum(float((w - r).square().sum()) for w, r in zip(weights, ref)) ** 0.5
    scale = sum(float(r.square().sum()) for r in ref) ** 0.5
    moved = sum(float((r - w0).square().sum()) for r, w0 in zip(ref, init)) ** 0.5
    return {"max_abs": max_abs, "l2_rel_to_param": diff / scale, "l2_rel_to_update": diff / moved if moved else 0.0}


def run(device: torch.device, mode: str = "default") -> dict[str, Any]:
    """Every model dtype, N and method; a method that fails is recorded and the others still run."""
    if not hasattr(fusedaccum, "GradAccumulator"):
        return {"skipped": "fusedaccum.GradAccumulator does not exist"}
    started = time.perf_counter()
    cfg = _config(device, mode)
    torch.manual_seed(SEED_MODEL)
    model = TinyGPT(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], cfg["context"])
    init = {name: t.detach().bfloat16().float() for name, t in model.state_dict().items()}
    init64 = [t.double() for t in init.values()]  # same order as parameters(): TinyGPT has no buffers
    generator = torch.Generator().manual_seed(SEED_DATA)
    data = torch.randint(0, cfg["vocab"], (cfg["updates"], max(cfg["ns"]) * cfg["batch"], cfg["context"] + 1),
                         generator=generator).to(device)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for n in cfg["ns"]:
        exact = train("large-batch", torch.float64, n, init, data, cfg, device)
        for dtype in (torch.bfloat16, torch.float32):
            methods, why = _methods(dtype)
            skipped.update(why)
            results = {}
            for method in methods:
                try:
                    results[method] = train(method, dtype, n, init, data, cfg, device)
                except Exception as error:
                    failures.append({"model_dtype": str(dtype).removeprefix("torch."), "N": n, "method": method,
                                     "error": f"{type(error).__name__}: {error}"[:300]})
            large = results.get("large-batch")
            for method, weights in results.items():
                row: dict[str, Any] = {"model_dtype": str(dtype).removeprefix("torch."), "N": n, "method": method}
                if large is not None:
                    row.update({f"{k}_vs_large_batch": v for k, v in compare(weights, large, init64).items()})
                row.update({f"{k}_vs_float64": v for k, v in compare(weights, exact, init64).items()})
                rows.append(row)
        print(f"claims: N={n} done ({time.perf_counter() - started:.0f} s)", flush=True)
    return {
        "config": {**cfg, "lr": LR, "optimizer": "AdamW (defaults otherwise)", "seed_model": SEED_MODEL,
                   "seed_data": SEED_DATA},
        "backend": fusedaccum.backends.resolve(None, device),
        "metrics": {
            "max_abs": "max over all parameter elements of |w - w_ref|",
            "l2_rel_to_param": "||w - w_ref||_2 / ||w_ref||_2 over all parameters",
            "l2_rel_to_update": "||w - w_ref||_2 / ||w_ref - w_init||_2 over all parameters",
        },
        "references": {"large_batch": "one batch of N*B in the model's own dtype",
                       "float64": "one batch of N*B, float64 model from the same (bf16-rounded) initial weights"},
        "rows": rows,
        "skipped": skipped,
        "failures": failures,
        "elapsed_s": time.perf_counter() - started,
    }


def memory_rows(end_to_end: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Peak memory of each accumulation mode against the large batch of the same effective batch (N·B).

    Read from the end-to-end section's rows; empty when that section did not run or measured no memory.
    """
    if not end_to_end or "rows" not in end_to_end:
        return []
    peak = {(r["mode"], r["N"]): r["peak_memory_bytes"] for r in end_to_end["rows"]}
    rows = []
    for (mode, n), value in peak.items():
        large = peak.get(("large-batch", n))
        if mode == "large-batch" or n == 1 or value is None or not large:
            continue
        rows.append({"N": n, "effective_batch": n * end_to_end["config"]["batch"], "mode": mode,
                     "peak_memory_bytes": value, "large_batch_peak_memory_bytes": large,
                     "fraction_of_large_batch": value / large})
    return rows


def summary_table(section: dict[str, Any], end_to_end: dict[str, Any] | None = None) -> str:
    if "skipped" in section and "rows" not in section:
        return f"skipped: {section['skipped']}"
    cfg = section["config"]
    lines = [f"accumulation equals a large batch? parameter difference after {cfg['updates']} AdamW updates "
             f"(lr {cfg['lr']}), micro-batch {cfg['batch']} x {cfg['context']} tokens",
             "max|d|: largest absolute difference; /|w|: ||d|| / ||w_ref||; /update: ||d|| / ||w_ref - w_init||",
             f"{'model':<9} {'N':>3} {'method':<26} {'vs large batch: max|d|':>22} {'/|w|':>8} {'/update':>8} "
             f"{'vs float64: max|d|':>19} {'/|w|':>8} {'/update':>8}"]
    for r in section["rows"]:
        large = (f"{r['max_abs_vs_large_batch']:>22.2e} {r['l2_rel_to_param_vs_large_batch']:>8.1e} "
                 f"{r['l2_rel_to_update_vs_large_batch']:>8.1e}") if "max_abs_vs_large_batch" in r else f"{'-':>40}"
        lines.append(f"{r['model_dtype']:<9} {r['N']:>3} {r['method']:<26} {large} {r['max_abs_vs_float64']:>19.2e} "
                     f"{r['l2_rel_to_param_vs_float64']:>8.1e} {r['l2_rel_to_update_vs_float64']:>8.1e}")
    lines += [f"skipped: {m}: {why}" for m, why in section["skipped"].items()]
    lines += [f"failed: {f['model_dtype']} N={f['N']} {f['method']}: {f['error']}" for f in section["failures"]]
    memory = memory_rows(end_to_end)
    if memory:
        lines.append("\naccumulation saves memory? peak memory (end-to-end section) against the large batch of the "
                     "same effective batch")
        lines.append(f"{'N':>3} {'eff. batch':>10} {'mode':<24} {'peak MB':>8} {'large MB':>9} {'ratio':>6}")
        for r in memory:
            lines.append(f"{r['N']:>3} {r['effective_batch']:>10} {r['mode']:<24} "
                         f"{r['peak_memory_bytes'] / 2**20:>8.1f} {r['large_batch_peak_memory_bytes'] / 2**20:>9.1f} "
                         f"{r['fraction_of_large_batch']:>6.2f}")
    return "\n".join(lines)
