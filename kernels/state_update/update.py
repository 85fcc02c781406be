"""One decoding step of the selective SSM, updating the state in place (mamba_ssm's selective_state_update).

Shapes, without heads / with heads (Mamba-2):
  state (batch, dim, N) / (batch, nheads, dim, N)      x, dt, z (batch, dim) / (batch, nheads, dim)
  A (dim, N) / (nheads, dim, N)                       B, C (batch, N) / (batch, ngroups, N)
  D, dt_bias (dim,) / (nheads, dim)
Heads use group h // (nheads / ngroups). The math is in fp32; the state keeps its dtype. With
state_batch_indices, state's first size is its number of cache lines (any), not batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, check, check_tensor
from ..causal_conv1d.conv import INDEX_DTYPES, check_cache_lines


def _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    check_tensor("state", state, None, FLOAT_DTYPES)
    check(state.dim() in (3, 4), f"state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), got {tuple(state.shape)}")
    heads = state.dim() == 4
    N = state.shape[-1]
    check(min(state.shape[1:]) >= 1, f"state must have nonzero nheads, dim and dstate, got {tuple(state.shape)}")
    dev = state.device
    # without state_batch_indices, one state line per row of x
    lines = state.shape[0] if state_batch_indices is None else None
    check_tensor("x", x, (lines,) + tuple(state.shape[1:-1]), FLOAT_DTYPES, dev)
    batch = x.shape[0]
    xs = (batch,) + tuple(state.shape[1:-1])
    check_tensor("dt", dt, xs, FLOAT_DTYPES, dev)
    check_tensor("A", A, xs[1:] + (N,), FLOAT_DTYPES, dev)
    for name, M in (("B", B), ("C", C)):
        if heads:
            check_tensor(name, M, (batch, None, N), FLOAT_DTYPES, dev)
            check(M.shape[1] >= 1 and state.shape[1] % M.shape[1] == 0,
                  f"{name} has {M.shape[1]} groups, which must divide nheads={state.shape[1]}")
        else:
            check_tensor(name, M, (batch, N), FLOAT_DTYPES, dev)
    check(B.shape == C.shape, f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    check_tensor("D", D, xs[1:], FLOAT_DTYPES, dev, optional=True)
    check_tensor("z", z, xs, FLOAT_DTYPES, dev, optional=True)
    check_tensor("dt_bias", dt_bias, xs[1:], FLOAT_DTYPES, dev, optional=True)
    if state_batch_indices is not None:
        check_tensor("state_batch_indices", state_batch_indices, (batch,), INDEX_DTYPES, dev)
        check_cache_lines("state_batch_indices", state_batch_indices, state.shape[0])


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """h <- exp(dt A) h + dt B x (in place); returns y = C . h + D x, times silu(z) if z is given.

    state_batch_indices (batch,) int: row b of x, dt, B, C, z reads and updates state[state_batch_indices[b]]
    (continuous batching: state may hold more lines than x has rows); a negative index marks a padding row: its
    output is 0 and no state is touched (as mamba_ssm). Its values are checked on the host (one device sync)."""
    _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if state_batch_indices is not None:
        rows = (state_batch_indices >= 0).nonzero().squeeze(1)
        lines = state_batch_indices[rows].long()
        states = state[lines]  # a copy, written back below
        out = x.new_zeros(x.shape)
        out[rows] = selective_state_update(states, x[rows], dt[rows], A, B[rows], C[rows], D,
                                           None if z is None else z[rows], dt_bias, dt_softplus)
        state.index_copy_(0, lines, states)
        return out
    heads = state.dim() == 4
    if not heads:  # one head: the same code path
        state_h = state.unsqueeze(1)
        out = selective_state_update(state_h, x[:, None], dt[:, None], A[None], B[:, None], C[:, None],
                                     None if D is None else D[None], None if z is None else z[:, None],
                                     None if dt_bias is None else dt_bias[None], dt_softplus)
        return out[:, 0]
    f = lambda t: None if t is None else t.float()  # noqa: E731
    dt = f(dt) if dt_bias is None else f(dt) + f(dt_bias)
    if dt_softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    rep = state.shape[1] // B.shape[1]
    Bh = f(B).repeat_interleave(rep, dim=1)[:, :, None, :]  # (batch, nheads, 1, N)
    Ch = f(C).repeat_interleave(rep, dim=1)[:, :, None, :]
    new = f(state) * torch.exp(dt[..., None] * f(A)) + (dt * f(x))[..., None] * Bh
    state.copy_(new)
    y = (new * Ch).sum(-1)
    if D is not None:
        y = y + f(D) * f(x)
    if z is not None:
        y = y * F.silu(f(z))
    return y.to(x.dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Per-head loop written out; used to test selective_state_update."""
    heads = state.dim() == 4
    if not heads:
        state, x, dt, A, B, C = state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        D = None if D is None else D[None]
        z = None if z is None else z[:, None]
        dt_bias = None if dt_bias is None else dt_bias[None]
    nheads, ngroups = state.shape[1], B.shape[1]
    ys = []
    for h in range(nheads):
        g = h // (nheads // ngroups)
        d = dt[:, h].double() + (dt_bias[h].double() if dt_bias is not None else 0)
        if dt_softplus:
            d = torch.where(d <= 20, torch.log1p(torch.exp(d)), d)
        s = state[:, h].double() * torch.exp(d[..., None] * A[h].double()) + (d * x[:, h].double())[..., None] * B[:, g, None, :].double()
        state[:, h] = s.to(state.dtype)
        y = (s * C[:, g, None, :].double()).sum(-1)
        if D is not None:
            y = y + D[h].double() * x[:, h].double()
        if z is not None:
            y = y * torch.nn.functional.silu(z[:, h].double())
        ys.append(y)
    y = torch.stack(ys, 1)
    return (y if heads else y[:, 0]).to(x.dtype)
