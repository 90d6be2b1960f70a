"""fusedaccum.integrations.lightning: Lightning trains through GradAccumulator with accumulate_grad_batches as the knob.

Every comparison runs the real Lightning Trainer twice in the same test on the same random data (a 16-32-4 MLP,
10 batches of 4 per epoch, CPU, fixed seeds): natively, and with ``callbacks=[FusedAccumulation()]``. Both must
give the same number of updates (optimizer steps that really ran), ``global_step``, scheduler steps and
learning rates, the same parameters, and the window norm the callback logs must be the total norm that
``clip_grad_norm_`` computes natively. SGD with momentum: unlike Adam, its update is proportional to the gradient,
so a wrongly scaled window shows in the parameters. ``16-mixed`` runs Lightning's GradScaler path on the CPU through
``MixedPrecision("16-mixed", "cpu", scaler=...)``: ``Trainer(precision="16-mixed")`` on a CPU is turned into
bf16-mixed by Lightning itself.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
lightning_integration = pytest.importorskip("fusedaccum.integrations.lightning")
FusedAccumulation = lightning_integration.FusedAccumulation

from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

import fusedaccum  # noqa: E402

BATCHES, BATCH_SIZE, N = 10, 4, 4  # windows of 4, 4 and a short 2 per epoch
# float32 tolerance: the wrapper adds the same float32 gradients in the same order as autograd does in p.grad
# (fp32 without clipping: bit-identical here); the clipping norm is summed in another order (the fused pass's
# sum of squares vs torch's per-tensor norms), which moves the clip coefficient, and so each clipped update, by a
# few float32 ulps. Measured: at most 1.5e-8 apart after 6 updates; 1e-6 is ~70x that, far below the differences
# a wrong window scale makes (1e-3 and more, checked in test_short_last_window_is_its_true_mean).
ATOL, RTOL = 1e-6, 1e-5


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(LitLogger|litlogger).*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


@functools.cache
def _net_class(package: Any) -> type:
    """A tiny LightningModule of ``package`` (lightning.pytorch or pytorch_lightning) that counts the updates its
    optimizer really applies (a step post-hook on the optimizer it builds)."""

    class Net(package.LightningModule):
        def __init__(self, *, scheduler: bool = True, seed: int = 0) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
            self.scheduler = scheduler
            self.updates = 0
            self.lrs: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def _count(self, optimizer: Any, args: Any, kwargs: Any) -> None:
            self.updates += 1
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            opt.register_step_post_hook(self._count)
            if not self.scheduler:
                return opt
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Net


def Net(**kwargs: Any) -> Any:  # noqa: N802 (a class, made per package)
    return _net_class(pl)(**kwargs)


class TrueCountNet(_net_class(pl)):
    """Native reference for the short last window: Lightning divides every loss by accumulate_grad_batches; this
    module multiplies the short window's losses by N / k first, so Lightning's own accumulation gives their mean."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        n, total = self.trainer.accumulate_grad_batches, self.trainer.num_training_batches
        k = min(n, total - batch_idx // n * n)
        return super().training_step(batch, batch_idx) * (n / k)


class NativeNorms(pl.Callback):
    """Native runs: the window's total gradient norm as clip_grad_norm_ computes it (Lightning calls this hook after
    unscaling and before clipping), kept for the windows whose update really ran."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self._pending: tuple[torch.Tensor, int] | None = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._pending = (torch.nn.utils.get_total_norm(grads), pl_module.updates)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None and pl_module.updates > self._pending[1]:
            self.norms.append(float(self._pending[0]))
        self._pending = None


class RecordingLogger(pl.loggers.Logger):
    """Keeps every logged metric, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))

    def values(self, key: str) -> list[float]:
        return [m[key] for m in self.logged if key in m]


def _data(seed: int, batches: int = BATCHES) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(torch.randn(batches * BATCH_SIZE, 16, generator=g),
                                             torch.randn(batches * BATCH_SIZE, 4, generator=g))
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE)


def _precision(name: str) -> dict[str, Any]:
    if name == "16-mixed":
        # A scale that overflows fp16 in the first windows (backoff 2^-16: 2^40 -> 2^24 -> 2^8), then grows every 2
        # good windows: the skip, backoff and growth paths all run, in both runs.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-16, growth_interval=2)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": name}


def _fit(module: Any, loader: Any, tmp_path: Path, callbacks: list[Any], *, epochs: int = 2, package: Any = pl,
         ckpt_path: str | None = None, **trainer_kwargs: Any) -> Any:
    _quiet()
    trainer_kwargs.setdefault("logger", False)
    trainer = package.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        default_root_dir=tmp_path, log_every_n_steps=1, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        _quiet()
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def _params(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{k}: {m}")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------- same as native
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_matches_native_accumulate_grad_batches(precision: str, clip: float | None, tmp_path: Path) -> None:
    """exact_last_window=False (Lightning's own arithmetic): the same updates, global_step, scheduler steps and
    learning rates as native accumulate_grad_batches=4 over 2 epochs of 10 batches (windows 4, 4, 2), the same
    parameters, and (clipping on, so Lightning computes one) the logged window norm is the norm clip_grad_norm_
    computes natively. 16-mixed: the windows the GradScaler skips natively are skipped too, and its scale ends
    equal."""
    loader = _data(seed=11)
    native, wrapped = Net(), Net()
    norms, logger, callback = NativeNorms(), RecordingLogger(), FusedAccumulation(exact_last_window=False,
                                                                                   log_grad_norm="grad_norm")
    t_native = _fit(native, loader, tmp_path / "n", [norms], accumulate_grad_batches=N, gradient_clip_val=clip,
                    **_precision(precision))
    t_wrapped = _fit(wrapped, loader, tmp_path / "w", [callback], accumulate_grad_batches=N, gradient_clip_val=clip,
                     logger=logger, **_precision(precision))

    windows = 2 * math.ceil(BATCHES / N)
    assert t_native.global_step == t_wrapped.global_step == windows
    assert t_wrapped.lr_scheduler_configs[0].scheduler.last_epoch == windows
    assert t_native.lr_scheduler_configs[0].scheduler.last_epoch == windows
    assert wrapped.updates == native.updates and wrapped.lrs == native.lrs
    if precision == "16-mixed":
        assert 0 < native.updates < windows  # the first windows overflowed: the skip path ran
        assert t_wrapped.precision_plugin.scaler.get_scale() == t_native.precision_plugin.scaler.get_scale()
    else:
        assert native.updates == windows
    _assert_close(_params(wrapped), _params(native))
    logged = logger.values("grad_norm")
    assert len(logged) == wrapped.updates
    assert logged == pytest.approx(norms.norms, rel=RTOL, abs=ATOL)
    assert t_wrapped.gradient_clip_val == clip  # given back after fit


# ------------------------------------------------------------------------------------- the short last window
@pytest.mark.parametrize("schedule", [None, {0: 3, 1: 4}], ids=["n4", "gradient_accumulation_scheduler"])
def test_short_last_window_is_its_true_mean(schedule: dict[int, int] | None, tmp_path: Path) -> None:
    """Default exact_last_window=True: the epoch's short window (2 of 4 batches; with a GradientAccumulationScheduler
    of 3 then 4: windows 3,3,3,1 then 4,4,2) is the mean of its batches, which native Lightning gives only when each
    of those losses is multiplied by N / k (TrueCountNet); plain native Lightning divides it by N (issue #19987),
    and differs by far more than the tolerance."""
    loader = _data(seed=12)
    if schedule is None:
        knobs: dict[str, Any] = {"accumulate_grad_batches": N}
        extra: list[Any] = []
    else:
        knobs, extra = {}, [pl.callbacks.GradientAccumulationScheduler(scheduling=schedule)]
    reference, plain, wrapped = TrueCountNet(), Net(), Net()
    t_ref = _fit(reference, loader, tmp_path / "r", [*extra], **knobs)
    extra = [pl.callbacks.GradientAccumulationScheduler(scheduling=schedule)] if schedule else []
    _fit(plain, loader, tmp_path / "p", [*extra], **knobs)
    extra = [pl.callbacks.GradientAccumulationScheduler(scheduling=schedule)] if schedule else []
    t_wrapped = _fit(wrapped, loader, tmp_path / "w", [*extra, FusedAccumulation()], **knobs)

    windows = sum(math.ceil(BATCHES / n) for n in ([N, N] if schedule is None else [3, 4]))
    assert t_ref.global_step == t_wrapped.global_step == windows
    assert reference.updates == wrapped.updates == windows and reference.lrs == wrapped.lrs
    _assert_close(_params(wrapped), _params(reference))
    assert _max_diff(_params(wrapped), _params(plain)) > 1e-3  # the short windows matter here


# ---------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_resume_from_checkpoint(precision: str, tmp_path: Path) -> None:
    """3 epochs uninterrupted vs resumed from the end of epoch 1 with ckpt_path=: the same final parameters bit for
    bit (the wrapper's state dict, scheduler, GradScaler and loops all come back). The checkpoint's optimizer state
    carries the wrapper's "fusedaccum" entry. Checkpoints load both ways: a native run's resumes under the callback,
    and the callback's resumes natively, each ending where the uninterrupted native run does (within ATOL)."""
    loader = _data(seed=13)
    common = {"accumulate_grad_batches": N, "gradient_clip_val": 0.5}

    def run(name: str, wrapped: bool, ckpt: str | None = None) -> tuple[Any, Path]:
        module, out = Net(), tmp_path / name
        saver = pl.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1)
        callbacks = [saver, FusedAccumulation()] if wrapped else [saver]
        _fit(module, loader, out, callbacks, epochs=3, ckpt_path=ckpt, **common, **_precision(precision))
        return module, out / f"epoch=0-step={math.ceil(BATCHES / N)}.ckpt"

    straight, first_ckpt = run("straight", wrapped=True)
    native, native_ckpt = run("native", wrapped=False)
    saved = torch.load(first_ckpt, weights_only=True)["optimizer_states"][0]
    assert "fusedaccum" in saved and saved["state"]  # the wrapper's entry, and SGD's momentum buffers
    resumed, _ = run("resumed", wrapped=True, ckpt=str(first_ckpt))
    for key, value in _params(straight).items():
        assert torch.equal(value, _params(resumed)[key]), key
    _assert_close(_params(straight), _params(native))
    native_into_wrapper, _ = run("native_into_wrapper", wrapped=True, ckpt=str(native_ckpt))
    wrapper_into_native, _ = run("wrapper_into_native", wrapped=False, ckpt=str(first_ckpt))
    _assert_close(_params(native_into_wrapper), _params(native))
    _assert_close(_params(wrapper_into_native), _params(native))


class ResumableLoader:
    """A loader whose position survives a checkpoint (Lightning's stateful-loader protocol: state_dict and
    load_state_dict), so that a run resumed mid-epoch sees the batches an uninterrupted one would. Its position is
    the number of batches the training loop has taken (set by a callback at each batch's start: Lightning fetches a
    batch ahead, so the loader's own count would be one too many)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.taken, self._skip = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(self.loader):
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["taken"]


class SaveMidWindow(pl.Callback):
    """Counts the batches taken for a ResumableLoader, and saves a checkpoint after one batch (mid-window)."""

    def __init__(self, loader: ResumableLoader, epoch: int, batch_idx: int, path: Path) -> None:
        self.loader, self.at, self.path = loader, (epoch, batch_idx), path

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.loader.taken = batch_idx + 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_resume_from_a_mid_window_checkpoint(precision: str, tmp_path: Path) -> None:
    """A checkpoint saved in the middle of a window (epoch 2, after batch 6: 2 of the window's 4 batches done)
    carries the window's fp32 partial sums in the wrapper's entry (native Lightning keeps p.grad nowhere: its
    partial window is lost), and the run resumed from it ends on the uninterrupted run's parameters bit for bit."""
    loader = _data(seed=18)
    straight_loader = ResumableLoader(loader)
    ckpt = tmp_path / "mid.ckpt"
    common = {"accumulate_grad_batches": N, "gradient_clip_val": 0.5, **_precision(precision)}
    straight = Net()
    _fit(straight, straight_loader, tmp_path / "s", [SaveMidWindow(straight_loader, 1, 5, ckpt),
                                                      FusedAccumulation()], **common)
    entry = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["fusedaccum"]
    assert entry["micro_step"] == 5 % N + 1
    resumed_loader = ResumableLoader(loader)
    resumed = Net(seed=1)  # other initial weights: the checkpoint must bring them back
    _fit(resumed, resumed_loader, tmp_path / "r", [SaveMidWindow(resumed_loader, -1, -1, ckpt),
                                                    FusedAccumulation()], ckpt_path=str(ckpt), **common)
    per_epoch = math.ceil(BATCHES / N)
    assert resumed.updates == 2 * per_epoch - (per_epoch + 6 // N)  # the updates after the checkpoint
    for key, value in _params(straight).items():
        assert torch.equal(value, _params(resumed)[key]), key


# ------------------------------------------------------------------------------------------ after fit
class KeepAccumulator(pl.Callback):
    """Holds on to the wrapper after fit, as user code reading its statistics might."""

    def __init__(self, fused: Any) -> None:
        self.fused, self.kept = fused, None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.kept = self.fused.accumulator


def test_after_fit_the_trainer_and_the_gradients_are_the_users_again(tmp_path: Path) -> None:
    """At the end of fit the trainer holds the optimizer configure_optimizers built (the one its scheduler drives),
    its gradient_clip_val is back, and a backward leaves its gradients in p.grad: the wrapper's hooks are removed,
    and its masters freed, even while something still holds the wrapper."""
    module, callback = Net(), FusedAccumulation()
    keeper = KeepAccumulator(callback)
    trainer = _fit(module, _data(seed=14), tmp_path, [callback, keeper], accumulate_grad_batches=N,
                   gradient_clip_val=1.0)
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and not isinstance(optimizer, fusedaccum.GradAccumulator)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert trainer.gradient_clip_val == 1.0 and callback.accumulator is None
    assert isinstance(keeper.kept, fusedaccum.GradAccumulator) and keeper.kept.optimizer is optimizer
    assert keeper.kept._masters.released  # masters freed (no public view: master_grad_buffers() re-allocates them)
    module.zero_grad(set_to_none=True)
    module.net(torch.randn(2, 16)).sum().backward()
    assert all(p.grad is not None for p in module.parameters())


# ---------------------------------------------------------------------------------------------- refused
class ManualNet(_net_class(pl)):
    def __init__(self) -> None:
        super().__init__(scheduler=False)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()
        opt.zero_grad()


class PrewrappedNet(_net_class(pl)):
    def __init__(self, steps: int | None) -> None:
        super().__init__(scheduler=False)
        self.steps = steps

    def configure_optimizers(self) -> Any:
        return fusedaccum.GradAccumulator(torch.optim.SGD(self.parameters(), lr=0.1), self.steps, reduction="sum")


class CustomClipNet(_net_class(pl)):
    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.1, gradient_clip_algorithm="norm")


@pytest.mark.parametrize(("make", "knobs", "error", "match"), [
    (ManualNet, {}, RuntimeError, "manual optimization"),
    (lambda: PrewrappedNet(2), {"accumulate_grad_batches": N}, RuntimeError, "double accumulation"),
    (lambda: PrewrappedNet(None), {"accumulate_grad_batches": N}, RuntimeError, "return the plain optimizer"),
    (Net, {"accumulate_grad_batches": N, "gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, ValueError,
     "gradient_clip_algorithm='value'"),
    (CustomClipNet, {"accumulate_grad_batches": N}, RuntimeError, "overrides configure_gradient_clipping"),
    (Net, {"accumulate_grad_batches": N, "precision": "64-true"}, RuntimeError, "DoublePrecision"),
], ids=["manual", "double_accumulation", "prewrapped", "clip_by_value", "custom_clipping", "double_precision"])
def test_refused_before_any_batch(make: Any, knobs: dict[str, Any], error: type, match: str, tmp_path: Path) -> None:
    """What would silently train wrong is refused at fit start with a message that says what to do; no batch ran:
    the parameters are the initial ones and the trainer's clipping setting is untouched."""
    module = make()
    before = _params(module)
    with pytest.raises(error, match=match):
        _fit(module, _data(seed=15), tmp_path, [FusedAccumulation()], **knobs)
    after = _params(module)
    assert all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def test_module_hooks_that_read_grads_warn(tmp_path: Path) -> None:
    """A LightningModule that reads p.grad in on_after_backward would see None: warned, by name, and training runs."""

    class GradLogger(_net_class(pl)):
        def on_after_backward(self) -> None:
            self.seen = [p.grad for p in self.parameters()]

    module = GradLogger()
    with pytest.warns(UserWarning, match="GradLogger.on_after_backward reads no gradients"):
        _fit(module, _data(seed=16), tmp_path, [FusedAccumulation()], accumulate_grad_batches=N)
    assert module.updates == 2 * math.ceil(BATCHES / N) and all(g is None for g in module.seen)


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="exact_last_window must be a bool"):
        FusedAccumulation(exact_last_window="yes")
    with pytest.raises(TypeError, match="log_grad_norm must be a metric name"):
        FusedAccumulation(log_grad_norm=True)


# ------------------------------------------------------------------------------ the pytorch_lightning name
def test_pytorch_lightning_package(tmp_path: Path) -> None:
    """The same callback under the standalone ``pytorch_lightning`` package's Trainer: the native result."""
    ptl = pytest.importorskip("pytorch_lightning")
    loader = _data(seed=17)
    native, wrapped = _net_class(ptl)(), _net_class(ptl)()
    _fit(native, loader, tmp_path / "n", [], package=ptl, accumulate_grad_batches=N, gradient_clip_val=0.05)
    t = _fit(wrapped, loader, tmp_path / "w", [FusedAccumulation(exact_last_window=False)], package=ptl,
             accumulate_grad_batches=N, gradient_clip_val=0.05)
    assert t.global_step == 2 * math.ceil(BATCHES / N) and wrapped.updates == native.updates == t.global_step
    _assert_close(_params(wrapped), _params(native))


class SkipsNet(_net_class(pl)):
    """training_step returns None (Lightning: skip this batch) on the last batch of the first window of each epoch."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch_idx == N - 1 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_window_whose_last_batch_is_skipped(precision: str, tmp_path: Path) -> None:
    """A training_step that returns None on a window's last batch: natively, fp32 still steps on the window's other
    batches, while 16-mixed skips the step (no unscale, no scaler.step) and the next window's zero_grad drops them.
    The callback does the same in both (16-mixed: dropping the window's fp32 sums, with a warning): the same
    updates and parameters as native."""
    loader = _data(seed=19)
    native, wrapped = SkipsNet(), SkipsNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(native, loader, tmp_path / "n", [], accumulate_grad_batches=N, **_precision(precision))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(wrapped, loader, tmp_path / "w", [FusedAccumulation(exact_last_window=False)],
             accumulate_grad_batches=N, **_precision(precision))
    dropped = [w for w in caught if "ended without an optimizer step" in str(w.message)]
    assert len(dropped) == (2 if precision == "16-mixed" else 0)  # once per epoch
    assert wrapped.updates == native.updates
    _assert_close(_params(wrapped), _params(native))


class ReplaceOptimizer(pl.Callback):
    """Puts the wrapped optimizer back in the trainer's hands after FusedAccumulation wrapped it."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.strategy.optimizers = [trainer.optimizers[0].optimizer]


def test_optimizer_replaced_after_fit_start_is_refused(tmp_path: Path) -> None:
    """An optimizer swapped in behind the callback would step on p.grad, which the hooks keep empty: the first update
    raises instead of applying nothing."""
    module = Net()
    before = _params(module)
    with pytest.raises(RuntimeError, match="something replaced trainer.strategy.optimizers"):
        _fit(module, _data(seed=20), tmp_path, [FusedAccumulation(), ReplaceOptimizer()], accumulate_grad_batches=N)
    assert module.updates == 0 and all(torch.equal(v, _params(module)[k]) for k, v in before.items())
