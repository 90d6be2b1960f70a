"""The examples run as documented, so they cannot rot: the torchrun example (DDP and FSDP2, 2 CPU processes,
gloo) and train_gpt.py --tiny, including a resume from its checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_accumulate.py"
TRAIN_GPT = Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_example(flags: list[str]) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "weights identical on every rank, skipped windows: 0" in done.stdout, done.stdout + done.stderr
    assert "update 25:" in done.stdout


def _train_gpt(*flags: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(TRAIN_GPT), "--tiny", *flags], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


FINAL = re.compile(r"final: iter (\d+), updates (\d+), skipped windows (\d+|n/a), train loss ([\d.]+), "
                   r"val loss ([\d.]+), weights sha256 ([0-9a-f]{16})")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_gpt_tiny_trains_and_resumes_bit_identically(dtype: str, tmp_path: Path) -> None:
    """train_gpt.py --tiny: 8 updates in one run learn something (val loss falls), and 4 updates, a checkpoint
    (loaded with torch.load(weights_only=True)) and 4 more in a second process end on the same weights bit for bit.
    float16: autocast + GradScaler on the CPU, the scaler's state in the checkpoint too."""
    common = ["--max_iters", "8", "--dtype", dtype, "--eval_interval", "8"]
    straight = _train_gpt(*common, "--out_dir", str(tmp_path / "a"))
    first_val = float(re.search(r"step 0: train loss [\d.]+, val loss ([\d.]+)", straight).group(1))
    iters, updates, skipped, _, val, weights = FINAL.search(straight).groups()
    assert (int(iters), int(updates), int(skipped)) == (8, 8, 0), straight
    assert float(val) < first_val - 0.2, straight
    assert "grad norm " in straight and "grad norm n/a" not in straight  # clipping on: the window norm is logged

    half = _train_gpt("--max_iters", "4", "--dtype", dtype, "--eval_interval", "8", "--out_dir", str(tmp_path / "b"))
    assert FINAL.search(half).group(1) == "4"
    resumed = _train_gpt(*common, "--out_dir", str(tmp_path / "b"), "--init_from", "resume")
    assert "resumed from" in resumed and "at iter 4" in resumed, resumed
    assert FINAL.search(resumed).groups() == FINAL.search(straight).groups(), straight + resumed


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_train_gpt_matches_nanogpt_native_loop_and_checkpoints_cross_load(tmp_path: Path) -> None:
    """fp32: the wrapper and nanoGPT's own loop (--native: loss / N, unscale_, clip_grad_norm_, step, zero_grad)
    give the same losses and weights up to float32 rounding (measured: 1.2e-7 max after 20 updates), and each
    one's checkpoint resumes in the other (a plain AdamW state dict into the wrapper, the wrapper's into AdamW)."""
    runs = {}
    for name, flags in (("wrapper", []), ("native", ["--native"])):
        runs[name] = _train_gpt("--max_iters", "4", "--eval_interval", "4", "--out_dir", str(tmp_path / name), *flags)
    w, n = (FINAL.search(runs[k]).groups() for k in ("wrapper", "native"))
    assert w[:2] == n[:2] == ("4", "4") and (w[2], n[2]) == ("0", "n/a")
    assert w[3:5] == n[3:5], runs["wrapper"] + runs["native"]  # train and val loss, 4 decimals
    assert _max_diff(_weights(tmp_path / "wrapper" / "ckpt.pt"), _weights(tmp_path / "native" / "ckpt.pt")) < 1e-5
    # cross-load: the native run continues under the wrapper and the wrapper's under native, 4 updates each
    finals = {}
    for name, flags in (("native", []), ("wrapper", ["--native"])):
        out = _train_gpt("--max_iters", "8", "--eval_interval", "4", "--out_dir", str(tmp_path / name),
                         "--init_from", "resume", *flags)
        assert "at iter 4" in out, out
        finals[name] = FINAL.search(out).groups()
    assert finals["native"][:2] == finals["wrapper"][:2] == ("8", "8")
    assert finals["native"][3:5] == finals["wrapper"][3:5], finals
    assert _max_diff(_weights(tmp_path / "wrapper" / "ckpt.pt"), _weights(tmp_path / "native" / "ckpt.pt")) < 1e-5


def test_train_lightning_tiny_matches_native_and_resumes(tmp_path: Path) -> None:
    """examples/train_lightning.py --tiny (Lightning, accumulate_grad_batches=4, clipping, a per-update scheduler):
    with the FusedAccumulation callback, 1 epoch, then resumed from its last.ckpt to 2 epochs, it ends where
    Lightning's own accumulation (--native) ends after 2 uninterrupted epochs: the same global_step and validation
    loss (4 decimals); the callback logged the window norm, native Lightning has none."""
    pytest.importorskip("lightning")
    script = Path(__file__).resolve().parents[1] / "examples" / "train_lightning.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    final = re.compile(r"final: epochs (\d+), global_step (\d+), last grad norm ([\d.]+|n/a), val loss ([\d.]+), "
                       r"weights sha256 ([0-9a-f]{16})")

    def run(*flags: str) -> re.Match:
        done = subprocess.run([sys.executable, str(script), "--tiny", *flags], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        match = final.search(done.stdout)
        assert match, done.stdout + done.stderr
        return match

    native = run("--native", "--out_dir", str(tmp_path / "native"))
    first = run("--max_epochs", "1", "--out_dir", str(tmp_path / "fused"))
    resumed = run("--max_epochs", "2", "--resume", "--out_dir", str(tmp_path / "fused"))
    assert (first.group(1), first.group(2)) == ("1", "3") and first.group(3) != "n/a"
    assert (resumed.group(1), resumed.group(2)) == (native.group(1), native.group(2)) == ("2", "6")
    assert native.group(3) == "n/a" and resumed.group(3) != "n/a"
    assert resumed.group(4) == native.group(4)


def test_train_trainer_tiny_resumes_to_native(tmp_path: Path) -> None:
    """examples/train_trainer.py --tiny (Trainer, gradient_accumulation_steps=4 with a short last window per epoch,
    clipping, a linear schedule): FusedAccumTrainer stopped after 8 updates, then resumed from its checkpoint-8 to
    the end, ends where the plain Trainer's own accumulation (--native) ends uninterrupted: the same updates,
    scheduler steps, eval loss and last logged grad norm (4 decimals); and it learned (eval loss fell)."""
    pytest.importorskip("transformers")
    script = Path(__file__).resolve().parents[1] / "examples" / "train_trainer.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    final = re.compile(r"final: updates (\d+), scheduler steps (\d+), skipped windows (\d+|n/a), train loss "
                       r"([\d.]+), eval loss ([\d.]+), last grad norm ([\d.]+)")

    def run(*flags: str) -> tuple[str, re.Match]:
        done = subprocess.run([sys.executable, str(script), "--tiny", *flags], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        match = final.search(done.stdout)
        assert match, done.stdout + done.stderr
        return done.stdout, match

    out, native = run("--native", "--out_dir", str(tmp_path / "native"))
    _, first = run("--stop_after", "8", "--out_dir", str(tmp_path / "fused"))
    resumed_out, resumed = run("--resume", "--out_dir", str(tmp_path / "fused"))
    assert first.group(1, 2, 3) == ("8", "8", "0")
    assert "resuming from" in resumed_out and "checkpoint-8" in resumed_out, resumed_out
    assert resumed.group(1, 2) == native.group(1, 2) == ("16", "16")
    assert (native.group(3), resumed.group(3)) == ("n/a", "0")
    assert resumed.group(5, 6) == native.group(5, 6), out + resumed_out  # eval loss, last grad norm
    before, after = map(float, re.search(r"eval loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before - 0.5, out
