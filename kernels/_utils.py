"""Backend selection and argument checks shared by every op."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

BACKENDS = ("triton", "torch", "ref")
_global_backend: str | None = None


def set_backend(name: str | None) -> None:
    """Force one backend for every call ("triton", "torch", "ref"), or None for the default
    (Triton for CUDA tensors, the chunked torch path otherwise). KERNELS_BACKEND sets it too."""
    global _global_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _global_backend = name


def get_backend() -> str | None:
    return _global_backend


@contextmanager
def use_backend(name: str | None):
    previous = _global_backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    name = backend or _global_backend or os.environ.get("KERNELS_BACKEND") or None
    if name is None:
        return "triton" if (x.is_cuda and triton_available()) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton); "
                               "use backend='torch' on machines without it")
        if not x.is_cuda and not interpreting():
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels "
                             "on the CPU through Triton's interpreter (slow; for tests)")
    return name


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(name: str, t, shape: tuple | None = None, dtypes=None, device: torch.device | None = None,
                 optional: bool = False) -> None:
    """ValueError naming the argument, the expectation and what was given. `shape` entries may be None
    (any size)."""
    # messages are built only on failure: this runs on every op call (about 15% of a call at L 1)
    if t is None:
        if not optional:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and not (t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d).replace('torch.', '') for d in dtypes]}, "
                         f"got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
