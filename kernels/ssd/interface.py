"""mamba_chunk_scan_combined: mamba_ssm's Mamba-2 SSD entry point, with triton / torch / ref backends."""
from __future__ import annotations

import math

import torch

from .._utils import FLOAT_DTYPES, check, check_tensor, resolve_backend
from .reference import process_dt, ssd_sequential_ref
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


def validate_varlen(x, cu_seqlens, return_varlen_states, state_dtype) -> list[int] | None:
    """Checks state_dtype, and cu_seqlens when return_varlen_states asks for it (as upstream, cu_seqlens is
    ignored otherwise). Returns the sequence boundaries as host ints (one device sync), or None."""
    check(state_dtype is None or state_dtype in FLOAT_DTYPES,
          f"state_dtype must be None or one of {FLOAT_DTYPES}, got {state_dtype!r}")
    if not return_varlen_states:
        return None
    check(cu_seqlens is not None, "cu_seqlens is required when return_varlen_states=True")
    check_tensor("cu_seqlens", cu_seqlens, (None,), (torch.int32, torch.int64), x.device)
    check(x.shape[0] == 1, f"return_varlen_states needs x with batch 1 (the sequences packed in one row, as in "
                           f"mamba_ssm), got batch {x.shape[0]}")
    bounds = cu_seqlens.tolist()
    L = x.shape[1]
    ordered = all(a <= b for a, b in zip(bounds, bounds[1:]))
    check(len(bounds) >= 2 and bounds[0] == 0 and bounds[-1] == L and ordered,
          f"cu_seqlens must be (num_seqs + 1,) nondecreasing offsets from 0 to L={L}, got {bounds}")
    return bounds


def varlen_states(x, dt, A, B, bounds, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
                  dt_limit=(0.0, float("inf"))):
    """The SSM state at the last token of each packed sequence (num_seqs, heads, headdim, dstate), what
    mamba_ssm's chunk_state_varlen returns, computed here in torch (the backends expose only the row's final
    state). bounds: validate_varlen's offsets; batch 1.

    Each sequence starts from zero at its first token, and also at any seq_idx change inside it; token 0's
    sequence starts from initial_states. This equals upstream's result whenever seq_idx marks the same
    sequences (the way mamba_ssm's Mamba2 calls it); upstream, without seq_idx, lets earlier sequences leak in
    through whole chunks, which depends on chunk_size, and is not reproduced. An empty sequence has state 0.
    state_k = sum_t exp(dA_{t+1} + ... + dA_{e-1}) dt_t x_t B_t^T over its tokens t (+ the decayed initial
    state); the decay exponents are differences of a float64 cumsum, so no digits cancel at any length.
    Differentiable (upstream's is not). fp32 (fp64 for fp64 x); the caller casts to state_dtype.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dtp = process_dt(dt[0], dt_bias, dt_softplus, dt_limit)  # (L, H)
    cs = torch.cumsum(dtp.double() * A.double(), 0)  # (L, H): inclusive decay exponents from token 0
    starts, ends = bounds[:-1], bounds[1:]
    firsts = starts  # per sequence, the first token its final state holds
    if seq_idx is not None:  # ... which is after the last seq_idx change inside it, if any
        pos = torch.arange(L, device=x.device)
        changed = torch.zeros(L, dtype=torch.bool, device=x.device)
        changed[1:] = seq_idx[0, 1:] != seq_idx[0, :-1]
        last_change = torch.cummax(torch.where(changed, pos, 0), 0).values  # (L,), 0 where none yet
        at_end = last_change[torch.tensor([max(e - 1, 0) for e in ends], device=x.device)].tolist()
        firsts = [max(s, c) for s, c in zip(starts, at_end)]
    states = []
    for r, e in zip(firsts, ends):
        if e <= r:  # an empty sequence
            states.append(x.new_zeros((H, P, N), dtype=work))
            continue
        decay = torch.exp(cs[e - 1] - cs[r:e]).to(work)  # (T, H)
        u = (decay * dtp[r:e])[..., None] * x[0, r:e].to(work)  # (T, H, P)
        state = torch.einsum("tgrp,tgn->grpn", u.view(e - r, G, H // G, P), B[0, r:e].to(work)).reshape(H, P, N)
        if r == 0 and initial_states is not None:
            state = state + torch.exp(cs[e - 1]).to(work)[:, None, None] * initial_states[0].to(work)
        states.append(state)
    return torch.stack(states)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False, state_dtype=None, *,
                              backend=None):
    """Mamba-2 SSD, mamba_ssm's signature and argument order (plus the keyword-only `backend`).

    x: (batch, L, heads, headdim); dt: (batch, L, heads); A: (heads,); B, C: (batch, L, groups, dstate),
    head h uses group h // (heads / groups); D: (heads, headdim) or (heads,); z like x; dt_bias: (heads,);
    initial_states: (batch, heads, headdim, dstate); seq_idx: (batch, L) int, documents packed in a row.
    dt <- clamp(softplus(dt + dt_bias), dt_limit) in fp32;  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;
    y_t = h_t C_t + D x_t;  out = y * silu(z). L need not be a multiple of chunk_size; the triton backend
    takes chunk_size 64, 128 or 256 (256 moves the fewest state bytes), the others any positive size.
    cu_seqlens: (num_seqs + 1,) int offsets of sequences packed in a batch-1 row, used only with
    return_varlen_states (as upstream: it does not isolate sequences; seq_idx does).
    state_dtype: dtype of the returned varlen states (default C's dtype, as upstream). Upstream also
    stores its inter-chunk states in it; ours stay fp32 (fp64 for fp64 input), never less precise.
    Returns out (x's dtype), then the fp32 final states (batch, heads, headdim, dstate) if
    return_final_states, then the varlen states (num_seqs, heads, headdim, dstate) if return_varlen_states:
    out, (out, final), (out, varlen) or (out, final, varlen), as upstream.
    """
    if torch.compiler.is_compiling():
        try:
            from ..compile_ops import ssd_compiled
        except ImportError:  # the custom-op wrapper is optional; trace the plain path instead
            pass
        else:  # one opaque graph node: the Triton launches and autograd.Function stay out of the trace
            return ssd_compiled(x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                                initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
                                return_varlen_states=return_varlen_states, state_dtype=state_dtype, backend=backend)
    name = resolve_backend(backend, x)
    validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    bounds = validate_varlen(x, cu_seqlens, return_varlen_states, state_dtype)
    if name == "triton":
        from .triton_ssd import CHUNK_SIZES
        check(x.dtype != torch.float64,
              "the triton backend takes float16/bfloat16/float32 x; use backend='torch' or 'ref' for float64")
        check(chunk_size in CHUNK_SIZES,
              f"chunk_size must be one of {CHUNK_SIZES} for the triton backend, got {chunk_size!r}")
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit,
            return_final_states)
    if name == "ref":
        res = ssd_sequential_ref(*args)
    elif name == "triton":
        from .triton_ssd import ssd_triton
        res = ssd_triton(*args)
    else:
        res = ssd_torch(*args)
    if not return_varlen_states:
        return res
    varlen = varlen_states(x, dt, A, B, bounds, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit)
    return with_varlen_states(res, varlen, C, state_dtype)


def with_varlen_states(res, varlen, C, state_dtype):
    """res (out or (out, final)) followed by the varlen states in state_dtype (default C's dtype, as upstream)."""
    varlen = varlen.to(state_dtype or C.dtype)
    return (*res, varlen) if isinstance(res, tuple) else (res, varlen)
