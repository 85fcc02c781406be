"""Plain sequential selective scan: one loop step per time step, autograd for gradients.

Slow, but short enough to read against the recurrence; the other backends are tested against an
independent float64 version of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


DISCRETIZATIONS = ("zoh", "zoh_exact", "bilinear")


def discretize(dt: torch.Tensor, A: torch.Tensor, discretization: str):
    """(decay, input coefficient) for dt (..., 1) and A (..., N).
    zoh: exp(dt A) and dt (zero-order hold on A, Euler step on B, as in Mamba);
    zoh_exact: exp(dt A) and (exp(dt A) - 1) / A (exact ZOH for diagonal A, Mamba paper eq. 4; expm1 so a
    small dt A loses nothing to cancellation; A must be nonzero, as every Mamba A = -exp(A_log) is);
    bilinear: (1 + dt A / 2) / (1 - dt A / 2) and dt / (1 - dt A / 2) (Tustin, as in S4)."""
    x = dt * A
    if discretization == "zoh":
        return torch.exp(x), dt.expand_as(x)
    if discretization == "zoh_exact":
        return torch.exp(x), torch.expm1(x) / A
    if discretization == "bilinear":
        denom = 1 - x / 2
        return (1 + x / 2) / denom, dt / denom
    raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, seq_idx=None, discretization="zoh"):
    """Same arguments and result as selective_scan_fn (see kernels.selective_scan.interface)."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(work)
    if delta_softplus:
        delta = torch.where(delta <= 20.0, F.softplus(delta), delta)
    batch, dim, L = u.shape
    N = A.shape[1]
    A = A.to(work)
    variable_B, variable_C = B.dim() >= 3, C.dim() >= 3

    def per_channel(M):  # (b, N, L) or (b, G, N, L) -> (b, dim, N, L)
        M = M.to(work)
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    Bc = per_channel(B) if variable_B else B.to(work)
    Cc = per_channel(C) if variable_C else C.to(work)
    h = u.new_zeros(batch, dim, N)
    ys = []
    # unbind the time axis once (per-step indexing would make autograd's backward quadratic in L)
    deltas, us = delta.unbind(-1), u.unbind(-1)
    Bs = Bc.unbind(-1) if variable_B else [Bc] * L
    Cs = Cc.unbind(-1) if variable_C else [Cc] * L
    for t in range(L):
        decay, coef = discretize(deltas[t][:, :, None], A, discretization)
        if seq_idx is not None and t > 0:
            # a new document starts from zero: select, not multiply, so a NaN/Inf cannot cross over
            keep = (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None]
            h = torch.where(keep, h, torch.zeros_like(h))
        h = decay * h + coef * Bs[t] * us[t][:, :, None]
        ys.append((h * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None].to(work)
    out = y if z is None else y * F.silu(z.to(work))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
