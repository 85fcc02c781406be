"""Mamba kernels without a CUDA build: Triton on GPUs, chunked PyTorch everywhere else.

API-compatible with mamba_ssm (same names, signatures and semantics), plus `seq_idx` for packed
documents and a per-call or global backend choice ("triton", "torch", "ref").
"""
from ._utils import get_backend, set_backend, use_backend
from .selective_scan import selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "set_backend", "get_backend", "use_backend"]
