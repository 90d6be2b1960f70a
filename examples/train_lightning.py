"""Train a small character-level language model with Lightning, accumulating through fusedaccum.GradAccumulator.

    python examples/train_lightning.py --tiny                   # CPU, a few seconds: 2 epochs of 12 batches, N = 4
    python examples/train_lightning.py --tiny --native          # Lightning's own accumulation: the same result
    python examples/train_lightning.py --tiny --max_epochs 3 --resume   # continue from out-train-lightning/last.ckpt
    python examples/train_lightning.py --tiny --precision 16-mixed      # fp16 autocast + GradScaler, also on CPU

The whole change to a Lightning script is one callback; ``Trainer(accumulate_grad_batches=N)`` stays the knob, and
the LightningModule (its ``configure_optimizers``, its LR scheduler) is untouched::

     trainer = L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0, ...)
    +trainer = L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0,
    +                    callbacks=[FusedAccumulation(log_grad_norm="grad_norm")], ...)

The callback wraps the optimizer Lightning builds in a GradAccumulator (open window, fp32 sums), moves
``gradient_clip_val`` onto the wrapper's fused window norm, hands the wrapper Lightning's GradScaler, and logs the
window's norm (Lightning cannot: ``p.grad`` is None). The model is an MLP over the previous 8 characters, trained
on this file's own source (or ``--data``). The windows of text are drawn once at random (seeded), in a fixed
order, so a run resumed from ``last.ckpt`` ends on the uninterrupted run's weights bit for bit; ``--native`` ends
on the same validation loss (fp32: the same sums in the same order).

Lightning turns ``Trainer(precision="16-mixed")`` on a CPU into bf16-mixed; ``--precision 16-mixed`` without a
GPU therefore passes ``plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]``, which
runs Lightning's real fp16 path (autocast, the scaler's step and update) on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as L
    from lightning.pytorch.plugins import MixedPrecision
except ImportError:  # the standalone package has the same API
    import pytorch_lightning as L
    from pytorch_lightning.plugins import MixedPrecision

from fusedaccum.integrations.lightning import FusedAccumulation

# --tiny: the defaults for a CPU run of a few seconds (any of them can still be given on the command line).
TINY = dict(context=8, n_embd=16, hidden=64, batch_size=16, batches_per_epoch=12, max_epochs=2,
            lr_decay_updates=12)


class CharMLP(L.LightningModule):
    """Next-character prediction from the previous ``context`` characters: embedding, one hidden layer."""

    def __init__(self, vocab: int, context: int, n_embd: int, hidden: int, lr: float, lr_decay_updates: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = torch.nn.Embedding(vocab, n_embd)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(context * n_embd, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).float(), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)  # a mean over the batch; Lightning divides it by accumulate_grad_batches

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=False)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.lr_decay_updates)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}  # stepped per update


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="a CPU run of a few seconds (sets the defaults in TINY)")
    add("--data", default=None, help="a text file to train on (default: this script's own source)")
    add("--out_dir", default="out-train-lightning")
    add("--resume", action="store_true", help="continue from out_dir/last.ckpt (Trainer.fit(ckpt_path=...))")
    add("--native", action="store_true", help="Lightning's own accumulation, without the callback, to compare")
    add("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    add("--accumulate_grad_batches", type=int, default=4)
    add("--gradient_clip_val", type=float, default=1.0, help="0: no clipping")
    add("--max_epochs", type=int, default=10)
    add("--batches_per_epoch", type=int, default=200)
    add("--batch_size", type=int, default=64)
    add("--context", type=int, default=16)
    add("--n_embd", type=int, default=32)
    add("--hidden", type=int, default=256)
    add("--lr", type=float, default=3e-3)
    add("--lr_decay_updates", type=int, default=2000, help="cosine schedule length, in updates (not batches)")
    add("--seed", type=int, default=1337)
    if parser.parse_known_args()[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args()


def windows(data: torch.Tensor, count: int, context: int, gen: torch.Generator) -> torch.utils.data.TensorDataset:
    """``count`` (context, next character) pairs at random positions, drawn once."""
    ix = torch.randint(len(data) - context, (count,), generator=gen)
    return torch.utils.data.TensorDataset(torch.stack([data[i:i + context] for i in ix]), data[ix + context])


def main() -> None:
    args = parse_args()
    if args.tiny:
        torch.set_num_threads(1)  # a model this small gains nothing from threads, and loses much on a busy machine
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    out_dir = Path(args.out_dir)
    text = Path(args.data or __file__).read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    train = windows(data, args.batches_per_epoch * args.batch_size, args.context, gen)
    val = windows(data, 4 * args.batch_size, args.context, gen)
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size)  # fixed order: exact resumes
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size)

    gpu = torch.cuda.is_available()
    precision: dict[str, Any] = {"precision": args.precision}
    if args.precision == "16-mixed" and not gpu:
        # Lightning would run bf16 instead on a CPU; this plugin is its fp16 path, with a CPU GradScaler.
        precision = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    callbacks: list[Any] = [L.callbacks.ModelCheckpoint(dirpath=out_dir, save_last=True, save_top_k=0)]
    if not args.native:
        callbacks.append(FusedAccumulation(log_grad_norm="grad_norm"))

    torch.manual_seed(args.seed)
    model = CharMLP(len(chars), args.context, args.n_embd, args.hidden, args.lr, args.lr_decay_updates)
    trainer = L.Trainer(
        max_epochs=args.max_epochs, accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.gradient_clip_val or None, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir,
        accelerator="gpu" if gpu else "cpu", devices=1, **precision,
    )
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(chars)}, "
          f"{'native' if args.native else 'fusedaccum'} accumulation of {args.accumulate_grad_batches} x "
          f"{args.batch_size} per update, {args.precision}")
    ckpt = out_dir / "last.ckpt"
    trainer.fit(model, train_loader, val_loader, ckpt_path=str(ckpt) if args.resume else None)
    if args.resume:
        print(f"resumed from {ckpt}")
    norm = trainer.callback_metrics.get("grad_norm")  # the last applied window's, logged by the callback

    val_loss = trainer.validate(model, val_loader, verbose=False)[0]["val_loss"]
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(bytes(tensor.detach().cpu().contiguous().clone().untyped_storage()))
    norm_text = "n/a" if norm is None else f"{float(norm):.4f}"
    print(f"final: epochs {trainer.current_epoch}, global_step {trainer.global_step}, last grad norm {norm_text}, "
          f"val loss {val_loss:.4f}, weights sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
