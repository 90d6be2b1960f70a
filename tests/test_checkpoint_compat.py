"""Checkpoints written by earlier code load and continue bit-identically (tests/fixtures/checkpoints_v1.pt was
written by tests/fixtures/make_checkpoint_fixture.py with the wrapper as it was before its split into parts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).with_name("fixtures")
_spec = importlib.util.spec_from_file_location("make_checkpoint_fixture", FIXTURES / "make_checkpoint_fixture.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)
SAVED = torch.load(FIXTURES / "checkpoints_v1.pt", weights_only=True)


@pytest.mark.parametrize("name", list(fixture.CASES))
def test_checkpoint_from_earlier_code_continues_bit_identically(name):
    dtype, options, weighted = fixture.CASES[name]
    saved = SAVED[name]
    model, acc = fixture.build(dtype, options, seed=123)  # other initial weights: everything comes from the file
    model.load_state_dict(saved["model"])
    acc.load_state_dict(saved["acc"])
    assert acc.micro_step == fixture.SAVE_AT % fixture.N
    for batch in fixture.data(dtype)[fixture.SAVE_AT:]:
        fixture.micro_step(model, acc, batch, weighted)
    for p, expected in zip(model.parameters(), saved["final_params"]):
        assert torch.equal(p.detach(), expected)
