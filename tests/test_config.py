"""GradAccumulator's constructor options (fusedaccum/_config.py): bad arguments are refused and nothing is built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from wrapper_helpers import N_SMALL, make_model, small_model

from fusedaccum import GradAccumulator


def test_constructor_bad_input():
    """accumulation_steps < 1 or not an int, not an optimizer, a wrapper, bad options: clear errors, and the
    optimizer is left as it was."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    cases = [
        ((opt, 0), {}, ValueError, ">= 1"),
        ((opt, -3), {}, ValueError, ">= 1"),
        ((opt, 2.0), {}, TypeError, "int"),
        ((opt, "4"), {}, TypeError, "int"),
        ((opt, True), {}, TypeError, "int"),
        ((model, 4), {}, TypeError, "torch.optim.Optimizer"),
        ((list(model.parameters()), 4), {}, TypeError, "torch.optim.Optimizer"),
        ((GradAccumulator(opt, 2), 4), {}, TypeError, "another GradAccumulator"),
        ((opt, 4), {"reduction": "avg"}, ValueError, "reduction"),
        ((opt, 4), {"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ((opt, 4), {"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ((opt, 4), {"backend": "gpu"}, ValueError, "backend"),
        ((opt, 4), {"scaler": object()}, TypeError, "GradScaler"),
        ((torch.optim.LBFGS(model.parameters()), 4), {}, TypeError, "LBFGS"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            GradAccumulator(*args, **kwargs)
    with pytest.raises(TypeError, match="float64"):
        GradAccumulator(torch.optim.SGD(make_model().double().parameters(), lr=0.1), 4)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert len(opt.state) == 0


@pytest.mark.parametrize("option", ["master_weights", "accumulate_in_backward"])
def test_boolean_options_refuse_truthy_strings(option):
    model = small_model()
    with pytest.raises(TypeError, match=f"{option} must be a bool"):
        GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), N_SMALL, **{option: "no"})
