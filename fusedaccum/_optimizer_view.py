"""An Optimizer whose ``param_groups``, ``state`` and ``defaults`` are another optimizer's own objects.

The base of :class:`fusedaccum.GradAccumulator`: to the ecosystem (LR schedulers, GradScaler, libraries that check
``isinstance(opt, Optimizer)``) it is an Optimizer, and a scheduler built on it drives the wrapped optimizer. It
sets up what ``Optimizer.__init__`` would for the base methods (hook registries, the step wrapper) without building
a second set of param groups.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

# Optimizer's hook registries (OrderedDicts, as Optimizer.__init__ makes them: the handles register_*_hook returns
# keep weak references to them).
OPTIMIZER_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                   "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                   "_optimizer_load_state_dict_post_hooks")


class OptimizerView(torch.optim.Optimizer):
    """Delegates the Optimizer's data to ``self._inner`` (set by :meth:`_view`)."""

    def _view(self, optimizer: torch.optim.Optimizer) -> None:
        self._inner = optimizer
        for name in OPTIMIZER_HOOKS:
            setattr(self, name, OrderedDict())

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's ``param_groups`` (the same list)."""
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's ``state`` (with ``master_weights=True`` keyed by the float32 master weights)."""
        return self._inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``defaults``."""
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._inner.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``."""
        torch.optim.Optimizer.zero_grad(self, set_to_none)

    def _through_hooks(self, registry: OrderedDict, *value: Any) -> Any:
        """Optimizer's hook protocol: each hook gets (self, *value); one that returns something replaces value."""
        for hook in registry.values():
            result = hook(self, *value)
            if value and result is not None:
                value = (result,)
        return value[0] if value else None
