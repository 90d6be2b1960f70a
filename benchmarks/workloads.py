"""Parameter-list workloads: the shapes of real models' parameters (no model is built, only the shapes)."""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def gpt2_124m() -> list[Shape]:
    """GPT-2 small (HF ``gpt2``): 148 tensors, 124,439,808 elements, the LM head tied to the embedding."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    return shapes + [(d,), (d,)]  # ln_f


def llama_1b() -> list[Shape]:
    """A Llama-3.2-1B-shaped model: 16 layers, d=2048, GQA with 8 KV heads of 64, SwiGLU 8192, vocab 128256,
    tied embedding, RMSNorm weights only: 146 tensors, about 1.24 billion elements."""
    d, vocab, layers, ffn, kv = 2048, 128256, 16, 8192, 8 * 64
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


def many_tiny(layers: int = 512) -> list[Shape]:
    """Norm weights and biases alone, as in a deep narrow model: 4 tensors of 1024-4096 elements per layer
    (2048 tensors, 3.7 M elements for 512 layers). Here launch and per-tensor overhead is everything."""
    shapes: list[Shape] = []
    for _ in range(layers):
        shapes += [(1024,), (1024,), (4096,), (1024,)]
    return shapes


def flat(exponent: int) -> list[Shape]:
    return [(1 << exponent,)]


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
