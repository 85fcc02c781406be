"""Plain references for Mamba-2's SSD.

- `ssd_sequential_ref`: the recurrence, one time step per loop step, every option (the "ref" backend).
- `ssd_minimal_discrete`: the chunked matrix form without options (no groups, L a multiple of
  block_len), written from the Mamba-2 paper's definition; kept as a second, independent statement.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def process_dt(dt, dt_bias, dt_softplus, dt_limit):
    """fp32 (or float64) dt: + dt_bias, softplus (identity above 20), clamp to dt_limit."""
    work = torch.float64 if dt.dtype == torch.float64 else torch.float32
    dt = dt.to(work)
    if dt_bias is not None:
        dt = dt + dt_bias.to(work)
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def ssd_sequential_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                       seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """Same arguments and results as mamba_chunk_scan_combined; chunk_size is ignored (no chunks)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    rep = H // G
    Bh = B.to(work).repeat_interleave(rep, dim=2)  # (b, L, H, N)
    Ch = C.to(work).repeat_interleave(rep, dim=2)
    xw = x.to(work)
    h = (initial_states.to(work).clone() if initial_states is not None else xw.new_zeros(batch, H, P, N))
    ys = []
    xs, dts, Bs, Cs = xw.unbind(1), dt.unbind(1), Bh.unbind(1), Ch.unbind(1)
    for t in range(L):
        decay = torch.exp(dts[t] * A.to(work))  # (b, H)
        if seq_idx is not None and t > 0:
            # a new document starts from zero: select, not multiply, so a NaN/Inf cannot cross over
            keep = (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
            h = torch.where(keep, h, torch.zeros_like(h))
        h = decay[..., None, None] * h + (dts[t][..., None] * xs[t])[..., None] * Bs[t][:, :, None, :]
        ys.append((h * Cs[t][:, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)  # (b, L, H, P)
    if D is not None:
        Dw = D.to(work)
        y = y + (Dw[:, None] if Dw.dim() == 1 else Dw) * xw
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(x.dtype)
    return (y, h.float() if work == torch.float32 else h) if return_final_states else y


def segsum(a):
    """a (..., T) -> (..., T, T) with [i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal
    (sums of differences inside one block, never a long cumsum minus another)."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~lower, 0)
    s = torch.cumsum(a, dim=-2)
    return s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """X (b, L, H, P) = x * dt; A (b, L, H) = A * dt; B, C (b, L, H, N). L % block_len == 0.
    Returns Y (b, L, H, P) and the final state (b, H, P, N)."""
    b, L, H, P = X.shape
    assert L % block_len == 0, "ssd_minimal_discrete needs L to be a multiple of block_len"
    c = L // block_len
    X, A, B, C = (t.reshape(b, c, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # (b, H, c, l)
    A_cum = torch.cumsum(A, dim=-1)
    Lmat = torch.exp(segsum(A))  # (b, H, c, l, l)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, X)
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states[:, None]
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cum))
    return (Y_diag + Y_off).reshape(b, L, H, P), final_state
