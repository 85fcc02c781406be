"""Shared test helpers."""
import torch

# Where Triton-backend tests put their tensors: the GPU when there is one (compiled kernels), else the CPU
# (conftest.py turns on Triton's interpreter there). Tests of the triton backend must build their inputs on
# this device so that the same suite passes on a CUDA machine and a CPU-only one.
CUDA = torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if CUDA else "cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of a against the reference b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
