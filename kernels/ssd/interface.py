"""mamba_chunk_scan_combined: mamba_ssm's Mamba-2 SSD entry point, with triton / torch / ref backends."""
from __future__ import annotations

import math

import torch

from .._utils import FLOAT_DTYPES, check, check_tensor, resolve_backend
from .reference import ssd_sequential_ref
from .torch_ssd import ssd_torch


def validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit):
    check_tensor("x", x, (None, None, None, None), FLOAT_DTYPES)
    batch, L, H, P = x.shape
    dev = x.device
    check(L >= 1, f"x must have at least one time step, got shape {tuple(x.shape)}")
    check(isinstance(chunk_size, int) and chunk_size >= 1, f"chunk_size must be a positive int, got {chunk_size!r}")
    check_tensor("dt", dt, (batch, L, H), FLOAT_DTYPES, dev)
    check_tensor("A", A, (H,), (torch.float32, torch.float64), dev)
    check_tensor("B", B, (batch, L, None, None), FLOAT_DTYPES, dev)
    G, N = B.shape[2], B.shape[3]
    check(G >= 1 and H % G == 0, f"B has {G} groups, which must divide nheads={H} (B: (batch, L, groups, dstate))")
    check(N >= 1, f"B and C must have d_state >= 1, got B of shape {tuple(B.shape)}")
    check_tensor("C", C, (batch, L, G, N), FLOAT_DTYPES, dev)
    if D is not None:
        check_tensor("D", D, None, (torch.float32, torch.float64), dev)
        check(tuple(D.shape) in ((H,), (H, P)), f"D must have shape ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    check_tensor("z", z, (batch, L, H, P), FLOAT_DTYPES, dev, optional=True)
    check_tensor("dt_bias", dt_bias, (H,), (torch.float32, torch.float64), dev, optional=True)
    check_tensor("initial_states", initial_states, (batch, H, P, N), FLOAT_DTYPES, dev, optional=True)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, (batch, L), (torch.int32, torch.int64), dev)
    check(len(dt_limit) == 2 and 0 <= dt_limit[0] <= dt_limit[1] and not math.isnan(dt_limit[1]),
          f"dt_limit must be (low, high) with 0 <= low <= high, got {dt_limit!r}")


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, backend=None):
    """Mamba-2 SSD, mamba_ssm's signature (plus `backend`).

    x: (batch, L, heads, headdim); dt: (batch, L, heads); A: (heads,); B, C: (batch, L, groups, dstate),
    head h uses group h // (heads / groups); D: (heads, headdim) or (heads,); z like x; dt_bias: (heads,);
    initial_states: (batch, heads, headdim, dstate); seq_idx: (batch, L) int, documents packed in a row.
    dt <- clamp(softplus(dt + dt_bias), dt_limit) in fp32;  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;
    y_t = h_t C_t + D x_t;  out = y * silu(z). L need not be a multiple of chunk_size; the triton backend
    takes chunk_size 64, 128 or 256 (256 moves the fewest state bytes), the others any positive size.
    Returns out (x's dtype), and the fp32 final states (batch, heads, headdim, dstate) if requested.
    """
    if torch.compiler.is_compiling():
        try:
            from ..compile_ops import ssd_compiled
        except ImportError:  # the custom-op wrapper is optional; trace the plain path instead
            pass
        else:  # one opaque graph node: the Triton launches and autograd.Function stay out of the trace
            return ssd_compiled(x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                                dt_limit=dt_limit, return_final_states=return_final_states, backend=backend)
    name = resolve_backend(backend, x)
    validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    if name == "triton":
        from .triton_ssd import CHUNK_SIZES
        check(x.dtype != torch.float64,
              "the triton backend takes float16/bfloat16/float32 x; use backend='torch' or 'ref' for float64")
        check(chunk_size in CHUNK_SIZES,
              f"chunk_size must be one of {CHUNK_SIZES} for the triton backend, got {chunk_size!r}")
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
            return_final_states)
    if name == "ref":
        return ssd_sequential_ref(*args)
    if name == "triton":
        from .triton_ssd import ssd_triton
        return ssd_triton(*args)
    return ssd_torch(*args)
