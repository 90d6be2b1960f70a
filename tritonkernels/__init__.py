"""Triton kernels of fusedaccum, installed as ``fusedaccum.tritonkernels``.

Importing this package imports triton; ``fusedaccum`` imports it only after checking that triton is there.
"""

import os

from .accumulate import CHUNK, accumulate_triton


def _backport_interpreter_index() -> None:
    """Triton 3.6's interpreter makes a tensor a ``range()`` bound with ``int()`` of its one-element array, which
    NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel whose loop
    bound is loaded from memory fails there. Triton 3.8 squeezes the array first; this applies the same fix to
    older interpreters (on 3.8 it changes nothing). Only under ``TRITON_INTERPRET=1``: compiled kernels never run
    this code."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # a Triton whose interpreter is organised otherwise: nothing to backport into
        return

    def patch_tensor_and_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_and_index


# Read once, here, when triton itself reads it (at its import): whether its kernels run under the interpreter, on
# CPU tensors. fusedaccum.backends asks this module rather than the environment, which may have changed since.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRETED:
    _backport_interpreter_index()

__all__ = ["CHUNK", "INTERPRETED", "accumulate_triton"]
