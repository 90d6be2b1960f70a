"""The ``"fusedaccum"`` entry of a GradAccumulator state dict: its fields, and their checks before any load.

Format version 1: the window (``Window.saved``), ``master_weights``, ``found_inf``, the ``layout`` (what another
layout is told apart by), ``touched``, the flat ``master_grads`` buffers (an empty list at a window boundary, where
they hold nothing of use) and the ``master_weight_tensors`` by layout index. ``weight_ref`` is optional (absent from
entries written before it existed: 1).
"""

from __future__ import annotations

from typing import Any

import torch

from ._master_grads import MasterGrads, first_difference
from ._master_weights import MasterWeights
from ._window import Window

STATE_KEY = "fusedaccum"
STATE_VERSION = 1

# The fields of a saved entry and their types.
FIELDS: dict[str, tuple[type, ...]] = {
    "accumulation_steps": (int, type(None)),
    "reduction": (str,),
    "master_weights": (bool,),
    "micro_step": (int,),
    "weight_sum": (float, int),
    "weighted": (bool, type(None)),
    "stepped": (bool,),
    "skipped_windows": (int,),
    "grad_norm": (torch.Tensor, type(None)),
    "found_inf": (bool,),
    "layout": (dict,),
    "touched": (list,),
    "master_grads": (list,),
    "master_weight_tensors": (dict,),
}


def assemble(window: Window, masters: MasterGrads, weights: MasterWeights, groups: list[dict[str, Any]]) -> dict:
    """The wrapper's entry of its state dict (tensors are references, as in Optimizer.state_dict). Reading the
    window's inf flag costs one host sync."""
    found = masters.found()
    return {
        "version": STATE_VERSION,
        **window.saved(),
        "master_weights": weights.enabled,
        "found_inf": bool(found.item()) if found is not None else False,
        "layout": masters.describe(groups),
        "touched": list(masters.touched),
        # At a window boundary the masters hold nothing of use (a window's first grad overwrites them): not saved.
        "master_grads": [b.buffer for b in masters.buffer_list()] if window.micro_step else [],
        "master_weight_tensors": weights.saved([e.param for e in masters.entries]),
        # Optional (absent before it existed): the copies of frozen params, by position in the flattened groups.
        "frozen_master_weights": weights.saved(_group_params(groups), skip={id(e.param) for e in masters.entries}),
    }


def _group_params(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def load(
    saved: dict[str, Any], window: Window, masters: MasterGrads, weights: MasterWeights, groups: list[dict[str, Any]]
) -> None:
    """Loads a checked entry into the parts (whose window has just been reset)."""
    masters.load(saved["master_grads"], saved["touched"])
    weights.load([e.param for e in masters.entries], saved["master_weight_tensors"])
    weights.load(_group_params(groups), saved.get("frozen_master_weights", {}))
    window.load(saved)
    masters.set_found(None, saved["found_inf"])


def check(
    entry: Any, window: Window, masters: MasterGrads, weights: MasterWeights, groups: list[dict[str, Any]],
    in_backward: bool,
) -> None:
    """Every field of a saved entry, checked against its type, its range, the other fields and this wrapper's
    layout and settings, before anything is loaded: a refusal (ValueError, naming the field) changes nothing."""
    layout = masters.describe(groups)
    master_weights = weights.enabled
    buffers = list(masters.buffers.values())
    params = [e.param for e in masters.entries]
    master_weight_shapes = {i: p.shape for i, p in enumerate(params) if weights.master_of(p) is not None}
    if not isinstance(entry, dict):
        raise ValueError(
            f"fusedaccum: the state dict's {STATE_KEY!r} entry must be a dict, got a {type(entry).__name__}"
        )
    if entry.get("version") != STATE_VERSION:
        raise ValueError(f"fusedaccum: unknown GradAccumulator state version {entry.get('version')!r}")
    for name, kinds in FIELDS.items():
        if name not in entry:
            raise ValueError(f"fusedaccum: the state dict's {STATE_KEY!r} entry has no {name!r} field")
        value = entry[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(
                f"fusedaccum: the state dict's {STATE_KEY}[{name!r}] is a {type(value).__name__}; expected "
                f"{' or '.join('None' if k is type(None) else k.__name__ for k in kinds)}"
            )
    if entry["layout"] != layout:
        try:
            difference = first_difference(entry["layout"], layout)
        except (KeyError, TypeError, ValueError):
            difference = f"{entry['layout']!r} saved vs {layout!r} here"
        raise ValueError(
            f"fusedaccum: this state dict comes from another parameter layout and cannot be loaded here: {difference}"
        )
    if entry["master_weights"] != master_weights:
        raise ValueError(
            f"fusedaccum: the state dict was saved with master_weights={entry['master_weights']}, this wrapper "
            f"has master_weights={master_weights}"
        )
    window.check_saved(entry)

    def refuse(what: str) -> None:
        raise ValueError(f"fusedaccum: the state dict's {STATE_KEY!r} entry is inconsistent: {what}")

    touched = entry["touched"]
    entries = len(layout["params"])
    if len(touched) != entries or not all(isinstance(t, bool) for t in touched):
        refuse(f"'touched' must be {entries} bools (one per trainable param), got {touched!r}")
    if entry["micro_step"] == 0 and any(touched):
        refuse("params marked as touched at micro_step 0")
    saved_buffers = entry["master_grads"]
    if (saved_buffers or entry["micro_step"]) and len(saved_buffers) != len(buffers):  # none saved at a boundary
        refuse(f"{len(saved_buffers)} master_grads buffers saved, this layout has {len(buffers)}")
    for i, (tensor, buffer) in enumerate(zip(saved_buffers, buffers)):
        _check_float32(refuse, f"master_grads[{i}]", tensor, buffer.shape)
    saved_weights = entry["master_weight_tensors"]
    if {k for k in saved_weights if isinstance(k, int)} != set(master_weight_shapes) or len(saved_weights) != len(
        master_weight_shapes
    ):
        refuse(f"master_weight_tensors for params {sorted(saved_weights, key=str)}, expected "
               f"{sorted(master_weight_shapes)}")
    for i, tensor in saved_weights.items():
        _check_float32(refuse, f"master_weight_tensors[{i}]", tensor, master_weight_shapes[i])
    frozen = entry.get("frozen_master_weights", {})  # optional: absent from entries written before it existed
    group_params = _group_params(groups)
    in_layout = {id(p) for p in params}
    frozen_shapes = {i: p.shape for i, p in enumerate(group_params)
                     if weights.master_of(p) is not None and id(p) not in in_layout}
    if not isinstance(frozen, dict) or not set(frozen) <= set(frozen_shapes):
        refuse(f"frozen_master_weights for params {sorted(frozen, key=str) if isinstance(frozen, dict) else frozen!r}"
               f", expected some of {sorted(frozen_shapes)}")
    for i, tensor in frozen.items():
        _check_float32(refuse, f"frozen_master_weights[{i}]", tensor, frozen_shapes[i])
    if entry["micro_step"] and entry["weighted"] and in_backward:
        raise ValueError(
            "fusedaccum: the state dict holds a half-finished weighted window (step(weight=...)); "
            "accumulate_in_backward=True cannot continue it (weights are refused in that mode). Load it at a "
            "window boundary or into a wrapper with accumulate_in_backward=False"
        )


def _check_float32(refuse: Any, name: str, tensor: Any, shape: torch.Size) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.shape != shape:
        got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        refuse(f"{name} must be a float32 tensor of shape {tuple(shape)}, got {got}")
