"""Triton's interpreter with numpy >= 2.4, for the code that runs kernels on a CPU (tests, gpu_check's dry run).

Triton <= 3.6's interpreter turns a scalar tl.tensor into a Python int with int(ndarray of shape (1,)),
which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars";
triton-lang/triton#9171, fixed upstream by squeezing first, as Triton 3.9 does). `patch()` wraps the
interpreter's tensor patching so that __index__ squeezes too: the same conversion the fixed versions
make, so applying it to a fixed Triton changes nothing.
"""
from __future__ import annotations

import os


def numpy_refuses_1d_to_scalar() -> bool:
    import numpy as np
    try:
        int(np.zeros(1))
        return False
    except TypeError:  # numpy >= 2.4
        return True


def patch() -> bool:
    """Apply the squeeze when the interpreter is on and numpy needs it; True if applied (or already)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not numpy_refuses_1d_to_scalar():
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_squeezes_index", False):
        return True

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
