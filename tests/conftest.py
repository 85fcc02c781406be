import os
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
os.environ.setdefault("PYTHONHASHSEED", "0")

import torch  # noqa: E402

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter (must be set before
# triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fp32 dots in IEEE precision (not TF32) so kernels can be checked tightly against float64
os.environ.setdefault("KERNELS_DOT_PRECISION", "ieee")
