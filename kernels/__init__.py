"""Mamba kernels without a CUDA build: Triton on GPUs, chunked PyTorch everywhere else.

API-compatible with mamba_ssm (same names, signatures and semantics), plus `seq_idx` for packed
documents and a per-call or global backend choice ("triton", "torch", "ref").
"""
from ._utils import get_backend, set_backend, use_backend
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_varlen_states
from .modules import InferenceParams, Mamba, Mamba2, RMSNormGated
from .selective_scan import mamba_inner_fn, selective_scan_fn, selective_scan_ref
from .ssd import mamba_chunk_scan_combined, ssd_minimal_discrete, ssd_sequential_ref
from .state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "selective_scan_fn", "selective_scan_ref", "mamba_inner_fn", "causal_conv1d_fn", "causal_conv1d_ref",
    "causal_conv1d_update", "causal_conv1d_varlen_states", "selective_state_update", "selective_state_update_ref", "Mamba", "InferenceParams",
    "mamba_chunk_scan_combined", "ssd_minimal_discrete", "ssd_sequential_ref", "Mamba2", "RMSNormGated",
    "set_backend", "get_backend", "use_backend",
]
