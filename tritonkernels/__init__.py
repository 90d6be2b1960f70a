"""Triton kernels of fusedaccum, installed as ``fusedaccum.tritonkernels``.

Importing this package imports triton; ``fusedaccum`` imports it only after checking that triton is there.
"""

from .accumulate import accumulate_triton

__all__ = ["accumulate_triton"]
