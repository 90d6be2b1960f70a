"""fusedaccum.integrations.transformers: FusedAccumTrainer against transformers' own Trainer accumulation.

Every comparison trains a 1-layer Llama built from a config on random tokens (CPU, fixed seeds) twice in the same
test, with the same TrainingArguments: once with ``Trainer`` and its native accumulation, once with
``FusedAccumTrainer``. 22 sequences of random length, 2 per micro-batch, ``gradient_accumulation_steps=3``:
11 micro-batches per epoch, so each epoch ends with a short window of 2 (windows 3, 3, 3, 2). Compared: the
number of optimizer updates (AdamW's step count), scheduler steps and ``global_step``, the ``grad_norm`` and loss
Trainer logs per update, and the parameters.

Tolerances (float32): parameters within 1e-6 absolute, logged norms within 1e-6 relative. The window's gradient
is the same float32 sum of the same per-micro-batch gradients in both runs (Trainer's ``.grad``, the wrapper's
master), but the norm is summed in another order (the wrapper's fused pass vs ``clip_grad_norm_``), so it and
the clipping coefficient ``max_norm / (norm + 1e-6)`` may differ in their last float32 bits; AdamW turns that
into parameter differences of a few float32 ulps (measured: 7e-9 to 1.5e-7 over 8 updates at lr 1e-2, four data
seeds). The model is a Llama, not a GPT-2: GPT-2's attention key bias has a gradient that is mathematically zero
(softmax ignores a constant shift), so its float32 value is rounding noise, which AdamW normalises into updates
of 1e-5 that differ between any two runs whose parameters differ in one bit (measured: 1.9e-5 after 2 updates).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from packaging.version import Version  # noqa: E402  (after the skips: transformers brings packaging)

if Version(transformers.__version__).release < (5, 3):
    pytest.skip(f"needs transformers >= 5.3, found {transformers.__version__}", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from fusedaccum import GradAccumulator  # noqa: E402
from fusedaccum.integrations.transformers import FusedAccumTrainer  # noqa: E402

VOCAB, LENGTH = 64, 16
SAMPLES, BATCH, N = 22, 2, 3  # 11 micro-batches per epoch: windows of 3, 3, 3 and a short last one of 2
UPDATES_PER_EPOCH = math.ceil(SAMPLES // BATCH / N)
PARAM_ATOL, NORM_RTOL = 1e-6, 1e-6  # see the module docstring
CLIP_FP16 = 0.05  # below any window norm of this untrained model (0.3 to 1.6 seen with transformers 5.3 and 5.24)


@pytest.fixture(autouse=True)
def one_thread_quiet():
    """One intra-op thread: measured on the shared 2-core test machine, a backward of this model takes 0.09 s with 2
    threads (OpenMP threads waiting on each other under load) and 0.7 ms with one. Trainer's warnings off."""
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=LENGTH, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences of random length (4 to 16): labels are -100 past the end, so micro-batches hold
    different token counts and Trainer's num_items_in_batch differs from a mean of per-micro-batch means."""

    def __init__(self, seed: int, count: int = SAMPLES) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (count, LENGTH), generator=g)
        self.lengths = torch.randint(4, LENGTH + 1, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.tokens[i].clone()
        labels[self.lengths[i]:] = -100
        return {"input_ids": self.tokens[i], "labels": labels}


class Snapshots(TrainerCallback):
    """The parameters after every update (on_step_end), to compare runs update by update; at each evaluation, the
    bytes the wrapper's fp32 masters hold (if there is a wrapper)."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.master_bytes_at_eval: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.params.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))

    def on_evaluate(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        acc = getattr(optimizer, "optimizer", None)
        if isinstance(acc, GradAccumulator):
            self.master_bytes_at_eval.append(master_bytes(acc))


def master_bytes(acc: GradAccumulator) -> int:
    """The memory the wrapper's fp32 master buffers hold now (0 once released; read without re-allocating)."""
    return sum(b.untyped_storage().nbytes() for b in acc._masters.buffers.values())


def arguments(out: Path, **overrides: Any) -> TrainingArguments:
    settings = dict(per_device_train_batch_size=BATCH, gradient_accumulation_steps=N, num_train_epochs=2,
                    learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
                    disable_tqdm=True)
    return TrainingArguments(str(out), **{**settings, **overrides})


def make(cls: type, out: Path, data_seed: int, *, optimizers: Any = None, mean_loss: bool = False,
         scaler: torch.amp.GradScaler | None = None, fusedaccum_options: dict[str, Any] | None = None,
         eval_data_seed: int | None = None, **overrides: Any) -> Trainer:
    """A trainer of ``cls`` on a fresh tiny Llama (same init for every run). ``optimizers``: a function of the model
    giving Trainer's ``optimizers=`` pair. ``mean_loss``: the model's loss is its per-micro-batch token mean and
    Trainer divides it by the window's length (the path taken by models that accept no loss kwargs), instead of
    the window's token count ``num_items_in_batch``. ``scaler``: fp16 through accelerate's GradScaler path."""
    model = tiny_llama(seed=0)
    extra: dict[str, Any] = {} if optimizers is None else {"optimizers": optimizers(model)}
    if fusedaccum_options is not None:
        extra["fusedaccum_options"] = fusedaccum_options
    if eval_data_seed is not None:
        extra["eval_dataset"] = RandomTokens(eval_data_seed, count=8)
    trainer = cls(model=model, args=arguments(out, **overrides), train_dataset=RandomTokens(data_seed),
                  callbacks=[Snapshots()], **extra)
    if mean_loss:
        trainer.model_accepts_loss_kwargs = False
    if scaler is not None:
        # accelerate makes no GradScaler on a CPU: Accelerator(mixed_precision="fp16") there has scaler None and
        # native_amp False, and Trainer(fp16=True) silently trains in float32. These are the two attributes its
        # __init__ sets on a GPU, set here with a CPU GradScaler (torch's CPU autocast runs float16), so that the
        # rest of its GPU path runs as it does there: autocast around the model's forward, scaler.scale(loss)
        # .backward(), unscale + clip_grad_norm_ (native), scaler.step(optimizer) + scaler.update() per window.
        if trainer.accelerator.scaler is None:
            trainer.accelerator.scaler = scaler
        trainer.accelerator.native_amp = True
    return trainer


def logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def adam_steps(trainer: Trainer) -> int:
    """How many updates the optimizer applied (AdamW's per-parameter step count; a skipped window adds none)."""
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert len(steps) == 1, steps
    return steps.pop()


def params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def snapshots(trainer: Trainer) -> list[torch.Tensor]:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Snapshots)).params


def count_clip_calls(trainer: Trainer) -> list[float]:
    """Records every accelerator.clip_grad_norm_ call (how Trainer clips and measures p.grad natively)."""
    calls: list[float] = []
    original = trainer.accelerator.clip_grad_norm_

    def spy(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        calls.append(max_norm)
        return original(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy
    return calls


def adamw_with_linear_decay(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10)


@pytest.mark.parametrize("loss", ["token_count", "window_mean"])
def test_matches_native_trainer_accumulation(loss: str, tmp_path: Path) -> None:
    """Updates, scheduler steps, global_step, logged grad norms and losses, and the parameters, with short last
    windows. ``token_count``: the model's loss over Trainer's num_items_in_batch, Trainer's own AdamW and schedule,
    clipping at the median window norm of an unclipped native run (some windows clipped, some not, whatever
    norms this transformers version's initialisation gives). ``window_mean``: per-micro-batch means divided by the
    window's length (2 for the short window), an optimizer and scheduler given in ``optimizers=``, no clipping
    (max_grad_norm=0: none in the wrapper either), the wrapper's plain-PyTorch "reference" backend. Trainer never
    clips or measures p.grad under FusedAccumTrainer (the wrapper does), and no p.grad is left behind."""
    if loss == "token_count":
        probe = make(Trainer, tmp_path / "probe", data_seed=11, max_grad_norm=0.0)
        probe.train()
        max_norm = statistics.median(logged(probe, "grad_norm"))
        setup: dict[str, Any] = {"max_grad_norm": max_norm}
        fused_setup: dict[str, Any] = {}
    else:
        setup = {"mean_loss": True, "optimizers": adamw_with_linear_decay, "max_grad_norm": 0.0,
                 "eval_data_seed": 15, "eval_strategy": "steps", "eval_steps": N}
        fused_setup = {"fusedaccum_options": {"backend": "reference"}}
    runs = {}
    for name, cls, extra in (("native", Trainer, {}), ("fused", FusedAccumTrainer, fused_setup)):
        trainer = make(cls, tmp_path / name, data_seed=11, **setup, **extra)
        clip_calls = count_clip_calls(trainer)
        trainer.train()
        runs[name] = (trainer, clip_calls)
    (native, native_clips), (fused, fused_clips) = runs["native"], runs["fused"]

    expected_updates = 2 * UPDATES_PER_EPOCH
    assert native.state.global_step == fused.state.global_step == expected_updates
    assert adam_steps(native) == adam_steps(fused) == expected_updates
    assert native.lr_scheduler.last_epoch == fused.lr_scheduler.last_epoch == expected_updates
    native_norms, fused_norms = logged(native, "grad_norm"), logged(fused, "grad_norm")
    assert len(native_norms) == len(fused_norms) == expected_updates
    if loss == "token_count":
        assert min(native_norms) < max_norm < max(native_norms), (max_norm, native_norms)
    else:
        assert "max_grad_norm=None" in repr(fused.accumulator)
    torch.testing.assert_close(fused_norms, native_norms, rtol=NORM_RTOL, atol=0.0)
    torch.testing.assert_close(logged(fused, "loss"), logged(native, "loss"), rtol=1e-6, atol=0.0)
    for after_native, after_fused in zip(snapshots(native), snapshots(fused), strict=True):
        torch.testing.assert_close(after_fused, after_native, atol=PARAM_ATOL, rtol=0.0)

    assert len(native_clips) == expected_updates  # natively, Trainer clips/measures p.grad once per update
    assert fused_clips == []  # under the wrapper it never does: the wrapper clips and measures the window
    assert all(p.grad is None for p in fused.model.parameters())
    assert fused.accumulator.micro_step == 0 and fused.accumulator.skipped_windows == 0
    assert master_bytes(fused.accumulator) == 0  # freed at the end of training (a window boundary)
    if loss == "window_mean":  # evaluated after updates 3 and 6 (5.24 also after the last; 5.3 does not): the
        # masters were freed for each evaluation
        evaluated = [e["step"] for e in fused.state.log_history if "eval_loss" in e]
        assert evaluated[:2] == [N, 2 * N]
        assert evaluated == [e["step"] for e in native.state.log_history if "eval_loss" in e]
        assert next(cb for cb in fused.callback_handler.callbacks if isinstance(cb, Snapshots)) \
            .master_bytes_at_eval == [0] * len(evaluated)
        torch.testing.assert_close(logged(fused, "eval_loss"), logged(native, "eval_loss"), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
def test_fp16_through_accelerates_grad_scaler(clip: bool, tmp_path: Path) -> None:
    """fp16 autocast + GradScaler as accelerate drives it (scaler.step(optimizer) + scaler.update() once per
    window), with a scale so large that the first window overflows, and windows overflow again as the scale
    regrows (growth_interval=3): the same windows are skipped, the scheduler is not stepped for them (AdamW
    non-fused: see docs/transformers.md for the fused one), the scale ends equal, a skipped window logs a
    non-finite norm in both.

    no_clip: the runs are bit-identical (the wrapper unscales each micro-step by the power-of-two 1/scale, exact,
    where Trainer unscales the sum). clip: the norm of the first applied window (clip_grad_norm_ on the unscaled
    gradient natively) and the parameters after it, within the float32 tolerances; from then on the float16
    forward passes turn the clipping coefficient's last-bit difference into different roundings, so the runs are
    not compared further."""
    runs = {}
    for name, cls in (("native", Trainer), ("fused", FusedAccumTrainer)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=3)
        trainer = make(cls, tmp_path / name, data_seed=11, scaler=scaler, fp16=True, optim="adamw_torch",
                       max_grad_norm=CLIP_FP16 if clip else 0.0)
        trainer.train()
        runs[name] = trainer
    native, fused = runs["native"], runs["fused"]
    native_norms, fused_norms = logged(native, "grad_norm"), logged(fused, "grad_norm")
    skipped = [i for i, norm in enumerate(native_norms) if not math.isfinite(norm)]
    assert skipped[0] == 0  # 2**20 times the loss overflows float16 in the first window
    first = next(i for i in range(len(native_norms)) if i not in skipped)  # the first applied window
    assert [i for i, norm in enumerate(fused_norms[:first + 1]) if not math.isfinite(norm)] == skipped[:first]
    torch.testing.assert_close(fused_norms[first], native_norms[first], rtol=NORM_RTOL, atol=0.0)
    if clip:
        assert native_norms[first] > CLIP_FP16  # clipped
        torch.testing.assert_close(snapshots(fused)[first], snapshots(native)[first], atol=PARAM_ATOL, rtol=0.0)
        return
    assert len(skipped) > first  # an overflow again after updates: the scale regrew past what float16 holds
    assert [i for i, norm in enumerate(fused_norms) if not math.isfinite(norm)] == skipped
    finite = [i for i in range(len(native_norms)) if i not in skipped]
    torch.testing.assert_close([fused_norms[i] for i in finite], [native_norms[i] for i in finite],
                               rtol=NORM_RTOL, atol=0.0)
    updates = 2 * UPDATES_PER_EPOCH - len(skipped)
    assert native.state.global_step == fused.state.global_step == 2 * UPDATES_PER_EPOCH
    assert adam_steps(native) == adam_steps(fused) == updates
    assert native.lr_scheduler.last_epoch == fused.lr_scheduler.last_epoch == updates
    assert fused.accumulator.skipped_windows == len(skipped)
    assert native.accelerator.scaler.get_scale() == fused.accelerator.scaler.get_scale()
    assert torch.equal(params(fused), params(native))


def poison_call(which: int) -> Any:
    """A tensor hook that makes the gradient of its ``which``-th call (1-based) NaN."""
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(None)
        return grad * float("nan") if len(calls) == which else grad

    return poison


def test_a_window_with_a_nan_gradient_is_skipped(tmp_path: Path) -> None:
    """float32, no GradScaler: one micro-batch of the second window gets a NaN gradient (a tensor hook on one
    weight). Natively Trainer applies that window and AdamW turns the parameters into NaN. FusedAccumTrainer skips
    the whole window: the parameters, AdamW's step count and the LR schedule stay as they were (Trainer is told
    the step was skipped, as with a GradScaler overflow), global_step still counts it, the logged norm is NaN, and
    training goes on. Up to that window both runs agree."""
    runs = {}
    for name, cls in (("native", Trainer), ("fused", FusedAccumTrainer)):
        trainer = make(cls, tmp_path / name, data_seed=14, num_train_epochs=1)
        trainer.model.model.layers[0].mlp.down_proj.weight.register_hook(poison_call(N + 2))  # 2nd of the 2nd window
        trainer.train()
        runs[name] = trainer
    native, fused = runs["native"], runs["fused"]
    torch.testing.assert_close(snapshots(fused)[0], snapshots(native)[0], atol=PARAM_ATOL, rtol=0.0)
    assert torch.isnan(snapshots(native)[1]).any()  # natively: the NaN window is applied
    assert torch.equal(snapshots(fused)[1], snapshots(fused)[0])  # skipped: nothing moved
    assert native.state.global_step == fused.state.global_step == UPDATES_PER_EPOCH
    assert fused.accumulator.skipped_windows == 1
    assert adam_steps(fused) == fused.lr_scheduler.last_epoch == UPDATES_PER_EPOCH - 1
    assert native.lr_scheduler.last_epoch == UPDATES_PER_EPOCH
    norms = logged(fused, "grad_norm")
    assert math.isnan(norms[1]) and all(math.isfinite(n) for i, n in enumerate(norms) if i != 1)
    assert torch.isfinite(params(fused)).all() and not torch.equal(snapshots(fused)[-1], snapshots(fused)[1])


def test_resume_from_checkpoint(tmp_path: Path) -> None:
    """Trainer saves after updates, so at window boundaries: the wrapper's entry in optimizer.pt then holds no
    master gradients (the file is about as large as native's), and resuming from it (Trainer loads it with
    torch.load(weights_only=True)) ends on the uninterrupted run's parameters bit for bit. Checkpoints also load
    both ways: a native run continues under FusedAccumTrainer and a fused one under Trainer, within tolerance of
    the uninterrupted run of the other kind."""
    save = {"save_strategy": "steps", "save_steps": N}
    full = {}
    for name, cls in (("native", Trainer), ("fused", FusedAccumTrainer)):
        trainer = make(cls, tmp_path / name, data_seed=12, **save)
        trainer.train()
        full[name] = trainer
    checkpoint = {name: tmp_path / name / f"checkpoint-{N}" for name in full}  # after the 3rd update, mid-epoch

    saved = torch.load(checkpoint["fused"] / "optimizer.pt", weights_only=True)
    entry = saved["fusedaccum"]
    assert entry["micro_step"] == 0 and entry["master_grads"] == []
    native_size = (checkpoint["native"] / "optimizer.pt").stat().st_size
    fused_size = (checkpoint["fused"] / "optimizer.pt").stat().st_size
    # AdamW's state is 8 B/param: the masters would add 4 B/param (+50%); measured: +1.1% (the layout's description).
    assert fused_size < 1.1 * native_size, (fused_size, native_size)

    for cls, source, reference, exact in ((FusedAccumTrainer, "fused", "fused", True),
                                          (FusedAccumTrainer, "native", "fused", False),
                                          (Trainer, "fused", "native", False)):
        resumed = make(cls, tmp_path / f"{source}-in-{cls.__name__}", data_seed=12)
        resumed.train(resume_from_checkpoint=str(checkpoint[source]))
        uninterrupted = full[reference]
        assert resumed.state.global_step == uninterrupted.state.global_step == 2 * UPDATES_PER_EPOCH
        assert adam_steps(resumed) == 2 * UPDATES_PER_EPOCH
        assert resumed.lr_scheduler.last_epoch == uninterrupted.lr_scheduler.last_epoch
        norms_after = logged(resumed, "grad_norm")[N:]
        assert len(norms_after) == 2 * UPDATES_PER_EPOCH - N
        if exact:
            assert norms_after == logged(uninterrupted, "grad_norm")[N:]
            assert torch.equal(params(resumed), params(uninterrupted))
        else:
            torch.testing.assert_close(norms_after, logged(uninterrupted, "grad_norm")[N:], rtol=NORM_RTOL, atol=0.0)
            torch.testing.assert_close(params(resumed), params(uninterrupted), atol=PARAM_ATOL, rtol=0.0)


def test_master_weights_option_reaches_the_wrapper(tmp_path: Path) -> None:
    """fusedaccum_options={"master_weights": True} with a bf16 model: the wrapper keeps float32 copies and AdamW
    steps them (its state is float32); the bf16 parameters are written back each update."""
    trainer = make(FusedAccumTrainer, tmp_path, data_seed=13, num_train_epochs=1,
                   fusedaccum_options={"master_weights": True})
    trainer.model.to(torch.bfloat16)
    before = params(trainer).clone()
    trainer.train()
    assert trainer.state.global_step == UPDATES_PER_EPOCH
    assert "master_weights=True" in repr(trainer.accumulator)
    assert {v["exp_avg"].dtype for v in trainer.optimizer.state.values()} == {torch.float32}
    assert params(trainer).dtype == torch.bfloat16 and not torch.equal(params(trainer), before)


class TwoProcesses(TrainingArguments):
    @property
    def world_size(self) -> int:  # what torchrun with 2 processes makes it
        return 2


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("case, match", [
    ("accumulator_with_steps", "double accumulation"),
    ("open_window_accumulator", "already a GradAccumulator"),
    ("owned_option", r"fusedaccum_options\['max_grad_norm'\] is set by the trainer"),
    ("unknown_option", "unknown fusedaccum_options key 'accumulation'"),
    ("unknown_backend", "unknown backend 'cuda_fast'"),
    ("lomo", "optim='lomo'"),
    ("multi_process", "multi-process training"),
])
def test_refuses_what_would_go_silently_wrong(case: str, match: str, tmp_path: Path) -> None:
    """Each is refused when the trainer is built, with a message that names it and says what to do."""
    model = tiny_llama(seed=0)
    args = arguments(tmp_path)
    kwargs: dict[str, Any] = {}
    if case == "accumulator_with_steps":  # Trainer's N times the wrapper's 4 micro-batches per update
        kwargs["optimizers"] = (GradAccumulator(_sgd(model), 4), None)
    elif case == "open_window_accumulator":
        kwargs["optimizers"] = (GradAccumulator(_sgd(model), None, reduction="sum"), None)
    elif case == "owned_option":
        kwargs["fusedaccum_options"] = {"max_grad_norm": 1.0}
    elif case == "unknown_option":
        kwargs["fusedaccum_options"] = {"accumulation": 4}
    elif case == "unknown_backend":
        kwargs["fusedaccum_options"] = {"backend": "cuda_fast"}
    elif case == "lomo":
        args = arguments(tmp_path, optim="lomo")
    elif case == "multi_process":
        args = TwoProcesses(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=match):
        FusedAccumTrainer(model=model, args=args, train_dataset=RandomTokens(0), **kwargs)
