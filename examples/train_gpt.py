"""Train a small GPT with gradient accumulation through fusedaccum.GradAccumulator: nanoGPT's loop, ported.

    python examples/train_gpt.py --tiny                        # CPU, a few seconds: 2 layers, width 32, 20 updates
    python examples/train_gpt.py --tiny --max_iters 40 --init_from resume   # continue from out-train-gpt/ckpt.pt
    python examples/train_gpt.py --tiny --native               # nanoGPT's own accumulation instead: same losses
    python examples/train_gpt.py --data input.txt              # e.g. tiny Shakespeare; GPU (bf16 autocast) if present

A character-level GPT (nanoGPT's model: pre-LayerNorm blocks, causal self-attention, tied embeddings) on any text
file, by default this file's own source. AdamW with nanoGPT's weight-decay groups, its warmup + cosine learning
rate as a LambdaLR built on the wrapper and stepped once per update (``if acc.stepped``), clipping and fp16 loss
scaling done by the wrapper, and a checkpoint that resumes bit-identically, loaded with
``torch.load(weights_only=True)``. ``--native`` runs nanoGPT's own lines instead of the wrapper, for comparison:
in float32 both print the same losses and end within float32 rounding of each other (tests/test_examples.py),
and either one's checkpoint resumes in the other.

Porting nanoGPT's train.py (karpathy/nanoGPT): 4 lines added, 9 removed, 1 changed. The optimizer, the loss and
the GradScaler stay; the wrapper takes over the division by the window, the unscaling, the clipping, the
optimizer step, the scaler update and the zeroing::

     import torch
    +import fusedaccum
     ...
     optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    +optimizer = fusedaccum.GradAccumulator(optimizer, gradient_accumulation_steps, max_grad_norm=grad_clip or None, scaler=scaler)
     if init_from == 'resume':
         optimizer.load_state_dict(checkpoint['optimizer'])
     ...
         for micro_step in range(gradient_accumulation_steps):
    -        if ddp:
    -            model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
             with ctx:
                 logits, loss = model(X, Y)
    -            loss = loss / gradient_accumulation_steps # scale the loss to account for gradient accumulation
             X, Y = get_batch('train')
             scaler.scale(loss).backward()
    +        optimizer.step()          # accumulates; the update happens on the window's last micro-step
    +        optimizer.zero_grad(set_to_none=True)
    -    if grad_clip != 0.0:
    -        scaler.unscale_(optimizer)
    -        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    -    scaler.step(optimizer)
    -    scaler.update()
    -    optimizer.zero_grad(set_to_none=True)
     ...
    -        lossf = loss.item() * gradient_accumulation_steps
    +        lossf = loss.item()       # the loss is no longer divided

Comment lines of nanoGPT's that go with removed lines are not counted; this script calls the wrapper ``acc``.
nanoGPT's per-iteration ``param_group['lr'] = lr`` keeps working (the wrapper's param_groups are the
optimizer's); this script shows the scheduler form instead. Under DDP (torchrun), create the wrapper, and load
its state when resuming, after ``model = DDP(model, ...)``, with ``ddp_module=model``; and do delete the
``require_backward_grad_sync`` line: the wrapper switches DDP's per-backward all-reduce off and reduces once per
window itself, and that line would switch DDP's back on for the last micro-step, averaging twice (see
docs/distributed.md and examples/ddp_accumulate.py).

The parameters here are float32 (``--dtype bfloat16``/``float16`` computes under autocast): autograd already
accumulates their gradients in float32, so the wrapper does not change the numbers beyond the order of
additions; it brings the fused pass, window-wide clipping and inf/NaN skipping, and exact mid-window
checkpoints. With bf16 parameters it also removes the bf16 summation error (README, "When it changes the
numbers").
"""  # noqa: E501 (the porting diff quotes nanoGPT's lines whole)

from __future__ import annotations

import argparse
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedaccum

# --tiny: the defaults for a CPU run of a few seconds (any of them can still be given on the command line).
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, gradient_accumulation_steps=4,
            max_iters=20, lr_decay_iters=20, warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, eval_interval=10,
            eval_iters=4, log_interval=5, device="cpu", dtype="float32")


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
                                 nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # nanoGPT's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="a CPU run of a few seconds (sets the defaults in TINY)")
    add("--data", default=None, help="a text file to train on (default: this script's own source)")
    add("--out_dir", default="out-train-gpt")
    add("--init_from", default="scratch", choices=["scratch", "resume"])
    add("--eval_interval", type=int, default=250)
    add("--eval_iters", type=int, default=200)
    add("--log_interval", type=int, default=10)
    add("--checkpoint_interval", type=int, default=0, help="also save every this many updates (0: at the end only)")
    add("--seed", type=int, default=1337)
    add("--gradient_accumulation_steps", type=int, default=4)
    add("--batch_size", type=int, default=16, help="sequences per micro-batch")
    add("--block_size", type=int, default=256)
    add("--n_layer", type=int, default=6)
    add("--n_head", type=int, default=6)
    add("--n_embd", type=int, default=384)
    add("--dropout", type=float, default=0.0)
    add("--learning_rate", type=float, default=1e-3)
    add("--max_iters", type=int, default=5000, help="updates (windows of gradient_accumulation_steps micro-batches)")
    add("--weight_decay", type=float, default=0.1)
    add("--beta1", type=float, default=0.9)
    add("--beta2", type=float, default=0.99)
    add("--grad_clip", type=float, default=1.0, help="0: no clipping")
    add("--warmup_iters", type=int, default=100)
    add("--lr_decay_iters", type=int, default=5000)
    add("--min_lr", type=float, default=1e-4)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--native", action="store_true",
        help="nanoGPT's own accumulation instead of the wrapper (the lines the port removes), to compare")
    add("--dtype", choices=["float32", "bfloat16", "float16"],
        default="bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32")
    if parser.parse_known_args()[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.tiny:
        torch.set_num_threads(1)  # a model this small gains nothing from threads, and loses much on a busy machine
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device, device_type = args.device, "cuda" if "cuda" in args.device else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    ctx = nullcontext() if ptdtype is torch.float32 else torch.autocast(device_type, dtype=ptdtype)

    # Character-level data: 90% train, 10% val. Batches come from their own generator, saved in checkpoints.
    text = Path(args.data or __file__).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split_at = int(0.9 * len(data))
    splits = {"train": data[:split_at], "val": data[split_at:]}
    data_gen = torch.Generator().manual_seed(args.seed)

    def get_batch(split: str, gen: torch.Generator = data_gen) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - args.block_size, (args.batch_size,), generator=gen)
        x = torch.stack([d[i:i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + args.block_size] for i in ix])
        return x.to(device), y.to(device)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        gen = torch.Generator().manual_seed(0)  # the same eval batches every time, training's data untouched
        out = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(args.eval_iters):
                X, Y = get_batch(split, gen)
                with ctx:
                    losses.append(model(X, Y)[1].item())
            out[split] = sum(losses) / len(losses)
        model.train()
        return out

    def get_lr(update: int) -> float:  # nanoGPT's: linear warmup, cosine decay to min_lr
        if update < args.warmup_iters:
            return args.learning_rate * (update + 1) / (args.warmup_iters + 1)
        if update > args.lr_decay_iters:
            return args.min_lr
        ratio = (update - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)

    checkpoint = None
    config = GPTConfig(block_size=args.block_size, vocab_size=len(chars), n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, dropout=args.dropout)
    if args.init_from == "resume":
        # weights_only=True: only tensors and plain containers; everything saved below is that.
        checkpoint = torch.load(out_dir / "ckpt.pt", map_location=device, weights_only=True)
        config = GPTConfig(**checkpoint["model_args"])
    model = GPT(config).to(device)
    scaler = torch.amp.GradScaler(device_type, enabled=args.dtype == "float16")
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                           device_type)
    if args.native:  # --native: no wrapper; nanoGPT's own lines drive the AdamW (native_update below)
        acc = optimizer
    else:
        acc = fusedaccum.GradAccumulator(optimizer, args.gradient_accumulation_steps,
                                         max_grad_norm=args.grad_clip or None, scaler=scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(acc, lambda update: get_lr(update) / args.learning_rate)
    iter_num, best_val_loss = 0, float("inf")
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        acc.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        data_gen.set_state(checkpoint["rng"]["data"].cpu())
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        print(f"resumed from {out_dir / 'ckpt.pt'} at iter {iter_num}")
        checkpoint = None  # free it
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(chars)}, {device} {args.dtype}, "
          f"{args.gradient_accumulation_steps} x {args.batch_size} sequences of {args.block_size} per update")

    def save_checkpoint() -> None:
        torch.save({
            "model": model.state_dict(),
            "optimizer": acc.state_dict(),  # the wrapped AdamW's state dict plus the wrapper's window
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "model_args": asdict(config),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": vars(args),
            "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state()},
        }, out_dir / "ckpt.pt")
        print(f"saved checkpoint at iter {iter_num} to {out_dir / 'ckpt.pt'}")

    def native_update() -> torch.Tensor | None:
        """--native: what nanoGPT does after the micro-steps, which the wrapper does inside acc.step()."""
        grad_norm = None
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        return grad_norm

    t0 = time.time()
    while iter_num < args.max_iters:
        if iter_num % args.eval_interval == 0:
            losses = estimate_loss()
            best_val_loss = min(best_val_loss, losses["val"])
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

        for _micro_step in range(args.gradient_accumulation_steps):
            X, Y = get_batch("train")
            with ctx:
                logits, loss = model(X, Y)
            if args.native:
                scaler.scale(loss / args.gradient_accumulation_steps).backward()
                continue
            scaler.scale(loss).backward()  # not divided by gradient_accumulation_steps: the wrapper averages
            acc.step()                     # accumulates; the update happens on the window's last micro-step
            acc.zero_grad(set_to_none=True)
            if acc.stepped:                # an update was applied (not when the window had an inf/NaN gradient)
                sched.step()
        if args.native:
            grad_norm = native_update()
        iter_num += 1

        if iter_num % args.log_interval == 0:
            dt, t0 = time.time() - t0, time.time()
            window_norm = grad_norm if args.native else acc.grad_norm
            norm = "n/a" if window_norm is None else f"{window_norm.item():.3f}"
            print(f"iter {iter_num}: loss {loss.item():.4f}, grad norm {norm}, lr {sched.get_last_lr()[0]:.2e}, "
                  f"{dt * 1000 / args.log_interval:.1f} ms/update")
        if iter_num == args.max_iters or (args.checkpoint_interval and iter_num % args.checkpoint_interval == 0):
            save_checkpoint()

    losses = estimate_loss()
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(bytes(tensor.detach().cpu().contiguous().clone().untyped_storage()))
    skipped = "n/a" if args.native else acc.skipped_windows
    print(f"final: iter {iter_num}, updates {sched.last_epoch}, skipped windows {skipped}, "
          f"train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, weights sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
