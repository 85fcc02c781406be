import os
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tools import interpreter_compat  # noqa: E402

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (must be set before
# triton is imported). With a GPU they compile, and Triton-backend tests put their inputs on
# tests.helpers.TRITON_DEVICE, so the same command passes on both machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 dots in IEEE precision (not TF32) so kernels can be checked tightly against float64
os.environ.setdefault("KERNELS_DOT_PRECISION", "ieee")


# Triton <= 3.6's interpreter with numpy >= 2.4 (see tools/interpreter_compat.py)
interpreter_compat.patch()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (added to every test skipped for want of one; "
                                       "tools/gpu_check.py selects them with -m cuda)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(m.name == "skipif" and re.search(r"CUDA|GPU", str(m.kwargs.get("reason", "")))
               for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)
