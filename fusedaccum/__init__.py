"""fusedaccum: fused gradient accumulation for PyTorch.

* :mod:`fusedaccum.ops` — the kernels' public functions (:func:`~fusedaccum.ops.accumulate_`,
  :func:`~fusedaccum.ops.copy_`), backed by C++ CPU, CUDA, Triton and plain-PyTorch implementations.
* :class:`fusedaccum.GradAccumulator` — wraps any ``torch.optim.Optimizer`` for exact, fused gradient accumulation.
* :mod:`fusedaccum.backends` — which backends exist here and why not; ``python -m fusedaccum.info``.
"""

from . import backends, ops, reference
from .accumulator import GradAccumulator, MasterGradBuffer
from .backends import BackendUnavailableError

__version__ = "0.1.0"

# Load the compiled kernels now so a missing or stale build warns once, at import, and never raises.
backends.compiled_extension()

__all__ = [
    "BackendUnavailableError", "GradAccumulator", "MasterGradBuffer", "__version__", "backends", "ops", "reference",
]
