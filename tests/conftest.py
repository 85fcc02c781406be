import os
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (must be set before
# triton is imported). With a GPU they compile, and Triton-backend tests put their inputs on
# tests.helpers.TRITON_DEVICE, so the same command passes on both machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 dots in IEEE precision (not TF32) so kernels can be checked tightly against float64
os.environ.setdefault("KERNELS_DOT_PRECISION", "ieee")


def _numpy_refuses_1d_to_scalar() -> bool:
    try:
        int(np.zeros(1))
        return False
    except TypeError:  # numpy >= 2.4
        return True


def _patch_interpreter_index_for_numpy_2_4():
    """Triton <= 3.6's interpreter turns a scalar tl.tensor into a Python int with int(ndarray of shape (1,)),
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars";
    triton-lang/triton#9171, fixed upstream by squeezing first, as 3.9 does). Wrap the interpreter's tensor
    patching so that __index__ squeezes too: the same conversion the fixed versions make, so applying it
    to a fixed Triton changes nothing. Test-only: the interpreter is how this suite runs kernels on a CPU."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1" and _numpy_refuses_1d_to_scalar():
    _patch_interpreter_index_for_numpy_2_4()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (added to every test skipped for want of one; "
                                       "tools/gpu_check.py selects them with -m cuda)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(m.name == "skipif" and re.search(r"CUDA|GPU", str(m.kwargs.get("reason", "")))
               for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)
