"""Train a small causal LM with 🤗 transformers' Trainer, accumulating through fusedaccum (FusedAccumTrainer).

    python examples/train_trainer.py --tiny                 # CPU, a few seconds: 1 layer, width 64, 16 updates
    python examples/train_trainer.py --tiny --native        # Trainer's own accumulation instead: same numbers
    python examples/train_trainer.py --tiny --stop_after 8  # stop after 8 updates (checkpoint-8 is saved) ...
    python examples/train_trainer.py --tiny --resume        # ... and continue from the last checkpoint: 16 updates
    python examples/train_trainer.py --data input.txt --fp16   # e.g. tiny Shakespeare; fp16 needs a GPU

A character-level Llama built from a config (no download) on any text file, by default this file's own source.
Trainer does everything as usual: ``gradient_accumulation_steps`` windows (with a short last window per epoch),
its AdamW and linear schedule, clipping at ``max_grad_norm``, logging, evaluation, checkpoints every
``--save_steps`` updates and ``resume_from_checkpoint``. The last line printed sums up the run; ``--native`` runs
the plain Trainer on the same data, and in float32 both print the same numbers (tests/test_examples.py runs this
script stopped after 8 updates and resumed, and compares it with a native run that never stopped).

The lines a user adds or changes, in an existing Trainer script::

    -from transformers import Trainer
    +from fusedaccum.integrations.transformers import FusedAccumTrainer as Trainer

or, keeping the name ``Trainer`` for the plain one::

    +from fusedaccum.integrations.transformers import FusedAccumTrainer
    -trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    +trainer = FusedAccumTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)

``TrainingArguments`` stay as they were: ``gradient_accumulation_steps`` is still the knob, ``max_grad_norm``
now clips the window's fused norm, ``fp16=True`` drives the wrapper through accelerate's GradScaler. A custom
Trainer subclass (TRL's ``SFTTrainer``, say) takes the mixin first: ``class MyTrainer(FusedAccumMixin, SFTTrainer)``.
See docs/transformers.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from fusedaccum.integrations.transformers import FusedAccumTrainer

TINY = dict(n_layer=1, n_embd=64, n_head=2, block_size=32, samples=120, batch_size=4, epochs=2, save_steps=8)


class Chunks(torch.utils.data.Dataset):
    """``count`` windows of ``block_size`` characters at random offsets of ``data`` (fixed by ``seed``)."""

    def __init__(self, data: torch.Tensor, block_size: int, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - block_size, (count,), generator=g)
        self.samples = torch.stack([data[s : s + block_size] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.samples[i], "labels": self.samples[i]}  # the model shifts the labels itself


class StopAfter(TrainerCallback):
    """Ends training after ``updates`` updates, keeping the whole run's schedule (to try ``--resume``)."""

    def __init__(self, updates: int) -> None:
        self.updates = updates

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (TrainerCallback's signature)
        if state.global_step >= self.updates:
            control.should_training_stop = True
        return control


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="a CPU run of a few seconds (sets the defaults in TINY)")
    add("--native", action="store_true", help="the plain Trainer and its own accumulation, to compare")
    add("--resume", action="store_true", help="continue from the last checkpoint in --out_dir")
    add("--stop_after", type=int, default=0, help="end training after this many updates (0: run to the end)")
    add("--fp16", action="store_true", help="float16 autocast + GradScaler (accelerate makes no scaler on a CPU)")
    add("--data", default=None, help="a text file to train on (default: this script's own source)")
    add("--out_dir", default="out-train-trainer")
    add("--seed", type=int, default=1337)
    add("--gradient_accumulation_steps", type=int, default=4)
    add("--batch_size", type=int, default=16, help="sequences per micro-batch")
    add("--block_size", type=int, default=256)
    add("--samples", type=int, default=20000, help="training sequences per epoch")
    add("--epochs", type=float, default=1)
    add("--n_layer", type=int, default=4)
    add("--n_head", type=int, default=4)
    add("--n_embd", type=int, default=256)
    add("--learning_rate", type=float, default=3e-3)
    add("--max_grad_norm", type=float, default=1.0, help="0: no clipping")
    add("--save_steps", type=int, default=500)
    if parser.parse_known_args()[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.tiny:
        torch.set_num_threads(1)  # a model this small gains nothing from threads, and loses much on a busy machine
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # the checkpoint writer's bars
    text = Path(args.data or __file__).read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train = Chunks(data[:split], args.block_size, args.samples, seed=args.seed)
    val = Chunks(data[split:], args.block_size, max(args.samples // 10, 8), seed=args.seed + 1)

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(chars), hidden_size=args.n_embd, intermediate_size=4 * args.n_embd,
                         num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                         num_key_value_heads=args.n_head, max_position_embeddings=args.block_size,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config)
    training_args = TrainingArguments(
        args.out_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1,
        max_grad_norm=args.max_grad_norm, fp16=args.fp16, logging_steps=1, save_strategy="steps",
        save_steps=args.save_steps, seed=args.seed, report_to=[], disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer_class = Trainer if args.native else FusedAccumTrainer
    callbacks = [StopAfter(args.stop_after)] if args.stop_after else []
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, eval_dataset=val,
                            callbacks=callbacks)
    if args.fp16 and trainer.accelerator.scaler is None:
        print("note: accelerate made no GradScaler on this device (fp16 needs a GPU): training in float32")

    before = trainer.evaluate()["eval_loss"]
    checkpoints = sorted(Path(args.out_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resume = str(checkpoints[-1]) if args.resume and checkpoints else None
    if resume:
        print(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    after = trainer.evaluate()["eval_loss"]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    skipped = "n/a" if args.native else trainer.accumulator.skipped_windows
    print(f"eval loss {before:.4f} -> {after:.4f}")
    print(f"final: updates {result.global_step}, scheduler steps {trainer.lr_scheduler.last_epoch}, skipped windows "
          f"{skipped}, train loss {result.training_loss:.4f}, eval loss {after:.4f}, last grad norm {norms[-1]:.4f}")


if __name__ == "__main__":
    main()
