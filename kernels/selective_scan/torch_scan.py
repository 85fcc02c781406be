"""Chunked selective scan in plain PyTorch: the CPU path, and the fallback on GPUs without Triton.

Layout: channels are split as (groups G, channels per group Dg) so that input-dependent B/C of shape
(batch, G, N, L) broadcast without copies. Work tensors are (batch, G, Dg, S, N) for one segment of S
time steps.

- Pieces: the sequence is cut into pieces whose (batch, dim, S, N) work tensors stay in cache on a CPU
  (BACKWARD_BUDGET elements, at least MIN_PIECE_STEPS steps) or under SEGMENT_BUDGET on a GPU; the forward
  saves each piece's start state (and the output before the z gate), so the backward recomputes nothing
  across pieces.
- Forward (zoh, `_piece_forward`, no autograd): the piece's decays exp(dt A) (as exp2, see LOG2E) and inputs
  by two broadcast ops into reused buffers, an in-place chunked scan (`_linear_scan_`: sqrt(S) steps
  vectorised over sqrt(S) sub-chunks, the carry across sub-chunks, one fix-up), one read-out through C.
  The other discretizations use `_segment_fast`, which never forms a (batch, dim, S, N) tensor.
- Backward (zoh, `_segment_backward`): hand-written, one piece at a time from the last: recompute the
  states, run the adjoint recurrence as a reverse scan, form every gradient with a few fused passes, and
  carry the state gradient to the previous piece. The bilinear discretization recomputes each piece
  under autograd instead (`_backward_by_recompute`).
- Packed documents (seq_idx): every reset is a select (masked_fill / where), never a multiply by 0, in the
  forward and in the backward, so a NaN or inf in one document reaches no other document's outputs or
  gradients.
- Only products of decays in [0, 1] appear: no log-space cumsum, no division (both lose precision on long
  sequences; see the README).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import discretize

# elements of one (batch, dim, S, N) work tensor per segment (forward; the bilinear backward holds ~8)
SEGMENT_BUDGET = 1 << 22
# elements of one (batch, dim, piece, N) tensor on the CPU (forward buffers and the hand-written backward: ~6
# live at once): measured fastest near 0.5 MiB on a 2-core x86 VM (2x larger pieces were 1.1-1.5x slower
# forward+backward at L 64..1024). On a GPU, pieces as long as the segments (fewer kernel launches)
BACKWARD_BUDGET = 1 << 17
# exp(x) is formed as exp2(x * log2(e)): torch's CPU exp2 is ~4x faster than its exp (measured on a 2-core AVX-512
# VM: 10 vs 41 us per 65536 floats) and its result is within ~2 ulp of exp's; the decays dominate the scan's cost
LOG2E = 1.4426950408889634
# pieces shorter than this pay more in per-op overhead than they gain in cache locality
MIN_PIECE_STEPS = 16
# _linear_scan_ runs pieces up to this many steps one step per op (fewer ops than the sub-chunked scan)
SEQUENTIAL_STEPS = 32


def _dot_last(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of x * y (broadcast). The product, then a matrix-vector product with ones:
    on the CPU a reduction over a short last axis (N = 16) costs ~4 multiplies; the gemv costs ~1.5."""
    p = x * y
    N = p.shape[-1]
    return (p.view(-1, N) @ p.new_ones(N)).view(p.shape[:-1])


def chunked_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim -2 of a, b (..., S, N), from h0 (..., N). Returns all h_t."""
    S = a.shape[-2]
    T = chunk or max(1, math.ceil(math.sqrt(S)))
    nc = math.ceil(S / T)
    pad = nc * T - S
    if pad:  # identity steps: a = 1, b = 0
        a = torch.cat([a, a.new_ones(*a.shape[:-2], pad, a.shape[-1])], -2)
        b = torch.cat([b, b.new_zeros(*b.shape[:-2], pad, b.shape[-1])], -2)
    a4 = a.unflatten(-2, (nc, T))  # (..., nc, T, N)
    b4 = b.unflatten(-2, (nc, T))
    # 1. local scans from zero, all sub-chunks at once; p = running product of decays
    # unbind, not per-step indexing: indexing's backward allocates a full-size zero tensor per step
    h = torch.zeros_like(b4[..., 0, :])
    p = torch.ones_like(a4[..., 0, :])
    hs, ps = [], []
    for a_t, b_t in zip(a4.unbind(-2), b4.unbind(-2)):
        h = torch.addcmul(b_t, a_t, h)
        p = p * a_t
        hs.append(h)
        ps.append(p)
    h_loc = torch.stack(hs, -2)
    prod = torch.stack(ps, -2)
    # 2. true start state of each sub-chunk
    starts = [h0]
    for h_end, p_end in list(zip(h_loc[..., -1, :].unbind(-2), prod[..., -1, :].unbind(-2)))[:-1]:
        starts.append(h_end + p_end * starts[-1])
    start = torch.stack(starts, -2)  # (..., nc, N)
    # 3. every step at once
    out = torch.addcmul(h_loc, prod, start.unsqueeze(-2)).flatten(-3, -2)
    return out[..., :S, :] if pad else out


def _live(keep4: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """keep4 (..., nc, T) bool -> True while no reset has happened since the sub-chunk's first step (in
    processing order): where False, a sub-chunk's start state must not reach the step."""
    k = keep4.flip(-1) if reverse else keep4
    live = torch.cumprod(k.to(torch.int32), -1).bool()
    return live.flip(-1) if reverse else live


def _add_chunk_starts_(h_loc, prod, h0, live=None, reverse=False):
    """h_loc, prod (..., nc, T, N): per-sub-chunk scans from zero and running decay products. Carries h0
    across the sub-chunks (in processing order) and adds each one's true start state, in place.
    live (..., nc, T) or None: where False the start state is dropped by a select (see _live)."""
    nc = h_loc.shape[-3]
    end = 0 if reverse else -1
    starts = [None] * nc
    state = h0
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        starts[c] = state
        carried = prod[..., c, end, :] * state
        if live is not None:
            carried = torch.where(live[..., c, end, None], carried, 0.0)
        state = h_loc[..., c, end, :] + carried
    start = torch.stack(starts, -2).unsqueeze(-2)  # (..., nc, 1, N)
    if live is None:
        h_loc.addcmul_(prod, start)
    else:
        h_loc.add_(torch.where(live[..., None], prod * start, 0.0))


def _linear_scan_(a, x, h0, keep=None, reverse=False, scratch=None):
    """In place on x (..., S, N): x_t <- a_t * x_prev + x_t, where x_prev is the result of the step
    before (t - 1, or t + 1 when reverse) and h0 before the first one. keep (..., S) bool or None: where
    False the carried term is dropped (a select). a may be a strided view (e.g. shifted by one step).
    sqrt(S) steps vectorised over sqrt(S) sub-chunks, then the carry across sub-chunks, then one fix-up.
    scratch: a buffer shaped like x for the running decay products (reused: fresh pages cost time)."""
    S = x.shape[-2]
    if S == 0:
        return x
    if S <= SEQUENTIAL_STEPS:  # one op per step beats the three passes below on short pieces
        h = h0
        for t in (range(S - 1, -1, -1) if reverse else range(S)):
            if keep is None:
                h = x[..., t, :].addcmul_(a[..., t, :], h)
            else:
                h = x[..., t, :].add_(torch.where(keep[..., t, None], a[..., t, :] * h, 0.0))
        return x
    T = max(1, math.isqrt(S))
    nc = S // T
    main = nc * T
    body = slice(S - main, S) if reverse else slice(0, main)
    a4, x4 = a[..., body, :].unflatten(-2, (nc, T)), x[..., body, :].unflatten(-2, (nc, T))
    keep4 = keep[..., body].unflatten(-1, (nc, T)) if keep is not None else None
    prod = (torch.empty_like(x) if scratch is None else scratch)[..., body, :].unflatten(-2, (nc, T))
    h = p = None
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        a_t, x_t, p_t = a4[..., t, :], x4[..., t, :], prod[..., t, :]
        reset = ~keep4[..., t, None] if keep4 is not None else None
        if h is None:  # first step of every sub-chunk: the local scan starts from zero
            p_t.copy_(a_t)
        elif reset is None:
            x_t.addcmul_(a_t, h)
            torch.mul(p, a_t, out=p_t)
        else:  # selects (masked_fill), not multiplies by 0: a non-finite state stays in its document
            x_t.add_((a_t * h).masked_fill_(reset, 0.0))
            torch.mul(p, a_t, out=p_t)
        if reset is not None:
            p_t.masked_fill_(reset, 0.0)
        h, p = x_t, p_t
    _add_chunk_starts_(x4, prod, h0, None if keep4 is None else _live(keep4, reverse), reverse)
    h = x[..., S - main, :] if reverse else x[..., main - 1, :]
    for t in (range(S - main - 1, -1, -1) if reverse else range(main, S)):  # the steps left over
        carried = a[..., t, :] * h
        if keep is not None:
            carried = torch.where(keep[..., t, None], carried, 0.0)
        h = x[..., t, :].add_(carried)
    return x


def _segment_backward(u, delta, A, Bs, Cs, D, z, delta_bias, keep, h0, softplus, dout, carry, y, bufs=None):
    """Hand-written backward of one zoh segment (same layouts as _segment); carry: gradient of the
    segment's last state from the segments after it, or None; y: the forward's output before the z gate
    (None without z). Recomputes the states, then runs the
    adjoint recurrence g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse scan.
    Returns (du, ddelta, dz, dBs, dCs, dA, dD, ddelta_bias, dh0), None for absent options."""
    pre = delta if delta_bias is None else delta + delta_bias[..., None]
    dt = F.softplus(pre) if softplus else pre  # threshold 20: the identity above it
    S = u.shape[-1]
    if bufs is None:  # (decay, scratch) buffers of at least (b, G, Dg, S, N), reused across pieces
        bufs = [torch.empty((*u.shape, A.shape[-1]), dtype=u.dtype, device=u.device) for _ in range(2)]
    a, scratch = (buf[..., :S, :] for buf in bufs)
    torch.mul(dt[..., None], (A * LOG2E)[:, :, None, :], out=a)
    a.exp2_()  # exp(dt A), (b, G, Dg, S, N)
    dtu = dt * u
    h = _linear_scan_(a, dtu[..., None] * Bs, h0, keep, scratch=scratch)  # all states
    dz = None
    dy = dout
    if z is not None:
        sz = torch.sigmoid(z)
        dy = dout * z * sz
        dz = dout * y * sz * (1 + z * (1 - sz))
    g = dy[..., None] * Cs  # direct gradient of each state, then the adjoint scan in place
    if carry is not None:
        g[..., -1, :] += carry
    _linear_scan_(a[..., 1:, :], g[..., :-1, :], g[..., -1, :], keep[..., 1:] if keep is not None else None,
                  reverse=True, scratch=scratch[..., 1:, :])
    q = a.mul_(g)  # dL/d(log-decay) per state: g_t a_t h_{t-1} (a is not needed any more)
    dh0 = q[..., 0, :].clone()
    q[..., 1:, :].mul_(h[..., :-1, :])
    q[..., 0, :].mul_(h0)
    if keep is not None:  # a select: the previous document's state may be non-finite
        q.masked_fill_(~keep[..., None], 0.0)
        dh0.masked_fill_(~keep[..., 0, None], 0.0)
    ddt = _dot_last(q, A[:, :, None, :])
    dA = (q.transpose(-1, -2) @ dt[..., None]).squeeze(-1).sum(0)  # batched matmul over (b, G, Dg): no copies
    ddtu = _dot_last(g, Bs)

    def per_step_matrix_grad(states, coef, M):  # gradient of B or C from sum over channels of states * coef
        return (states * coef[..., None]).sum_to_size(M.shape)
    dBs = per_step_matrix_grad(g, dtu, Bs)
    dCs = per_step_matrix_grad(h, dy, Cs)
    du = ddtu * dt
    ddt = ddt + ddtu * u
    dD = None
    if D is not None:
        du = du + dy * D[..., None]
        dD = (dy * u).sum((0, 3))
    ddelta = ddt * torch.where(pre <= 20.0, torch.sigmoid(pre), 1.0) if softplus else ddt
    dbias = ddelta.sum((0, 3)) if delta_bias is not None else None
    return du, ddelta, dz, dBs, dCs, dA, dD, dbias, dh0


def _segment_fast(u, delta, A, Bs, Cs, D, z, delta_bias, keep, h0, softplus, discretization):
    """No-grad forward of one segment, same contract as _segment plus a third result: the output before
    the z gate (what the backward needs from the forward). Each step works on one (b, dim, sub-chunks, N)
    slab for all sub-chunks at once and is read out through C at once: no (b, dim, S, N) tensor is made
    (the sub-chunks' start states reach the outputs through a second, input-free pass)."""
    dt = delta if delta_bias is None else delta + delta_bias[..., None]
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    S = u.shape[-1]
    N = A.shape[-1]
    T = max(1, math.ceil(math.sqrt(S)))
    nc = math.ceil(S / T)
    pad = nc * T - S
    padt = lambda x: F.pad(x, (0, pad)) if (pad and x is not None) else x  # noqa: E731
    dt4, u4 = padt(dt).unflatten(-1, (nc, T)), padt(u).unflatten(-1, (nc, T))  # pad steps: dt = 0 -> identity
    # pad steps keep the state (True): their dt = 0 makes them identity steps
    keep4 = None
    if keep is not None:
        keep4 = torch.cat([keep, keep.new_ones(*keep.shape[:-1], pad)], -1).unflatten(-1, (nc, T))
        reset4 = ~keep4

    def steps(M):  # (b|1, G, 1|Dg, S|1, N) -> per-step (b|1, G, 1|Dg, nc|1, N) views
        if M.shape[-2] == 1:
            return [M] * T
        M = F.pad(M, (0, 0, 0, pad)) if pad else M
        return M.unflatten(-2, (nc, T)).unbind(-2)

    Bsteps, Csteps = steps(Bs), steps(Cs)
    A5 = A[:, :, None, :]
    A5_2 = A5 * LOG2E
    zoh = discretization == "zoh"
    dtu4 = dt4 * u4  # zoh input coefficient, formed once on the small (…, nc, T) tensor

    def decay_at(t):  # (b, G, Dg, nc, N), with the input term when asked
        if zoh:
            return torch.exp2(dt4[..., t, None] * A5_2), None
        return discretize(dt4[..., t, None], A5, discretization)
    # 1. every sub-chunk scanned from a zero state, read out through C as it goes (no state is stored)
    y4 = u.new_empty(u4.shape)  # (b, G, Dg, nc, T)
    h = p = None
    for t in range(T):
        decay, coef = decay_at(t)
        x = dtu4[..., t, None] * Bsteps[t] if zoh else (coef * u4[..., t, None]).mul_(Bsteps[t])
        if h is None:
            h, p = x, decay
        elif keep4 is None:
            h = torch.addcmul(x, decay, h)
            p = p * decay
        else:  # a new document drops the carried state by a select: a NaN there cannot leak through 0 * NaN
            h = (decay * h).masked_fill_(reset4[..., t, None], 0.0).add_(x)
            p = p * decay
        if keep4 is not None:
            p = p.masked_fill(reset4[..., t, None], 0.0)
        y4[..., t] = torch.linalg.vecdot(h, Csteps[t])
    # 2. true start state of every sub-chunk, carried across sub-chunks
    starts = [h0]
    cut = None if keep4 is None else ~_live(keep4)[..., -1, None]  # sub-chunks holding a reset
    for c in range(nc - 1):
        carried = p[..., c, :] * starts[-1]
        if cut is not None:
            carried = carried.masked_fill(cut[..., c, :], 0.0)
        starts.append(h[..., c, :] + carried)
    # 3. the start states' contribution, decayed step by step by the same recurrence with no input
    s = torch.stack(starts, -2)  # (b, G, Dg, nc, N)
    for t in range(T):
        s = s * decay_at(t)[0]
        if keep4 is not None:
            s = s.masked_fill(reset4[..., t, None], 0.0)
        y4[..., t] += torch.linalg.vecdot(s, Csteps[t])
    y = y4.flatten(-2)[..., :S]
    if D is not None:
        y = y + D[..., None] * u
    out = y * F.silu(z) if z is not None else y
    return out, h[..., -1, :] + s[..., -1, :], y  # pad steps are identity steps: the last sub-chunk's end state

def _segment(u, delta, A, Bs, Cs, D, z, delta_bias, keep, h0, softplus, discretization):
    """One segment. u, delta, z: (b, G, Dg, S); A: (G, Dg, N); Bs, Cs: (b|1, G, 1|Dg, S|1, N);
    D, delta_bias: (G, Dg); keep: (b, 1, 1, S) 0/1 (0 where a new document starts) or None;
    h0: (b, G, Dg, N). Returns out (b, G, Dg, S) and the last state."""
    dt = delta if delta_bias is None else delta + delta_bias[..., None]
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    decay, coef = discretize(dt[..., None], A[:, :, None, :], discretization)  # (b, G, Dg, S, N)
    if keep is not None:
        decay = decay * keep[..., None]
    h = chunked_linear_scan(decay, coef * u[..., None] * Bs, h0)
    y = (h * Cs).sum(-1)
    if D is not None:
        y = y + D[..., None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h[..., -1, :]


class _Layout:
    """Reshape (batch, dim, L) inputs into the grouped layout and slice segments."""

    def __init__(self, u, A, B, C, seq_idx):
        self.batch, self.dim, self.L = u.shape
        self.N = A.shape[1]
        groups = [M.shape[1] if M.dim() == 4 else 1 for M in (B, C) if M.dim() >= 3]
        self.G = groups[0] if groups else 1
        self.Dg = self.dim // self.G
        self.keep = None
        if seq_idx is not None:
            same = torch.ones_like(seq_idx, dtype=torch.bool)
            same[:, 1:] = seq_idx[:, 1:] == seq_idx[:, :-1]
            self.keep = same[:, None, None, :]

    def chan(self, x):  # (b, dim, L) -> (b, G, Dg, L); (dim,) -> (G, Dg); (dim, N) -> (G, Dg, N)
        if x is None:
            return None
        if x.dim() == 3:
            return x.view(x.shape[0], self.G, self.Dg, x.shape[-1])
        return x.view(self.G, self.Dg, *x.shape[1:])

    def state_matrix(self, M):  # B or C -> (b|1, G, 1|Dg, L|1, N)
        if M.dim() == 2:  # fixed (dim, N)
            return M.view(1, self.G, self.Dg, 1, self.N)
        if M.dim() == 3:
            M = M[:, None]
        # a contiguous copy (small: no channel axis): broadcasting a (.., L, N) view whose N axis has stride L
        # made every op that reads it ~5x slower than a contiguous one on the CPU (100 vs 21 us, (256, 64, 16))
        return M.transpose(-1, -2).contiguous().unsqueeze(2)  # (b, G, 1, L, N)

    def unstate(self, dM, M):  # gradient in the state_matrix layout -> M's own layout
        if M.dim() == 2:
            return dM.reshape(M.shape)
        if M.dim() == 3:
            return dM[:, 0, 0].transpose(-1, -2)
        return dM[:, :, 0].transpose(-1, -2)

    def piece_len(self, cuda: bool) -> int:
        return piece_steps(self.batch, self.dim, self.N, self.L, cuda)


def piece_steps(batch, dim, N, L, cuda: bool):
    """Steps per piece: the forward saves each piece's start state and the backward runs piece by piece.
    CPU: pieces of ~BACKWARD_BUDGET elements per (b, dim, S, N) tensor (in cache), at least MIN_PIECE_STEPS
    steps (per-piece overhead); GPU: whole segments of ~SEGMENT_BUDGET elements (fewer kernel launches).
    Plain int arithmetic (also on symbolic sizes: compile_ops' fake implementation counts the pieces)."""
    per_step = max(1, batch * dim * N)
    S = max(1, min(L, SEGMENT_BUDGET // per_step))
    if cuda:
        return S
    return min(S, max(MIN_PIECE_STEPS, BACKWARD_BUDGET // per_step))


def _sl(x, s, e, dim=-1):
    return None if x is None else x.narrow(dim, s, e - s)


def _time_slice(M, s, e):  # grouped-layout B/C: slice time only if input-dependent
    return M if M.shape[-2] == 1 else M[..., s:e, :]


def _piece_forward(u, delta, A, Bs, Cs, D, z, delta_bias, keep, h0, softplus, bufs=None):
    """No-grad zoh forward of one piece (same layouts and results as _segment_fast): the decays and inputs
    of the whole piece are formed by two broadcast ops, scanned in place by _linear_scan_ (sqrt(S) steps
    over sqrt(S) sub-chunks), then read out through C by one op. Used for pieces whose (b, dim, S, N)
    tensors fit the piece budget (~0.5 MiB: in cache); bufs: (decay, state, scratch) buffers of at least this
    size, reused across pieces (fresh pages cost time)."""
    dt = delta if delta_bias is None else delta + delta_bias[..., None]
    if softplus:
        dt = F.softplus(dt)  # threshold 20: the identity above it, as the kernels' dt <= 20 test
    S = u.shape[-1]
    shape = (*u.shape, A.shape[-1])
    if bufs is None:
        bufs = [torch.empty(shape, dtype=u.dtype, device=u.device) for _ in range(3)]
    a, x, scratch = (buf[..., :S, :] for buf in bufs)
    torch.mul(dt[..., None], (A * LOG2E)[:, :, None, :], out=a)
    a.exp2_()  # exp(dt A)
    torch.mul((dt * u)[..., None], Bs, out=x)
    _linear_scan_(a, x, h0, keep, scratch=scratch)  # x now holds every state
    y = _dot_last(x, Cs)
    if D is not None:
        y = y + D[..., None] * u
    out = y * F.silu(z) if z is not None else y
    return out, x[..., -1, :].clone(), y


def scan_forward(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus, discretization):
    """No-grad forward on work-dtype inputs (fp32 or float64; validated, as selective_scan_fn's).
    Returns (out (batch, dim, L), last state (batch, dim, N), y_pre, starts): the residuals that scan_backward
    needs besides the inputs. y_pre (batch, dim, L): the output before the z gate (zoh with z; else None),
    cheaper to keep than to recompute for dz; starts (pieces, batch, dim, N): every piece's start state
    (pieces = ceil(L / piece_steps(...))), so the backward recomputes nothing across pieces. All dense."""
    lay = _Layout(u, A, B, C, seq_idx)
    S = lay.piece_len(u.is_cuda)
    uu, dd, zz = lay.chan(u), lay.chan(delta), lay.chan(z)
    AA, DD, bb = lay.chan(A), lay.chan(D), lay.chan(delta_bias)
    BB, CC = lay.state_matrix(B), lay.state_matrix(C)
    h = u.new_zeros(lay.batch, lay.G, lay.Dg, lay.N)
    outs, starts, pre_gate = [], [], []
    zoh = discretization == "zoh"
    bufs = [u.new_empty(lay.batch, lay.G, lay.Dg, min(S, lay.L), lay.N) for _ in range(3)] if zoh else None
    for s in range(0, lay.L, S):
        e = min(s + S, lay.L)
        starts.append(h)
        args = (_sl(uu, s, e), _sl(dd, s, e), AA, _time_slice(BB, s, e), _time_slice(CC, s, e), DD, _sl(zz, s, e),
                bb, _sl(lay.keep, s, e), h, softplus)
        y, h, y_pre = _piece_forward(*args, bufs=bufs) if zoh else _segment_fast(*args, discretization)
        outs.append(y)
        pre_gate.append(y_pre)
    y_pre = torch.cat(pre_gate, -1).reshape(lay.batch, lay.dim, lay.L) if z is not None and zoh else None
    out = torch.cat(outs, -1).reshape(lay.batch, lay.dim, lay.L)
    return out, h.reshape(lay.batch, lay.dim, lay.N), y_pre, torch.stack(starts).view(-1, lay.batch, lay.dim, lay.N)


def scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, y_pre, starts, softplus, discretization,
                  needs_grad=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of scan_forward's out (None for absent options)
    from dout and scan_forward's inputs and residuals; the last state's gradient is not propagated (as
    upstream). zoh: hand-written, piece by piece from the last; the other discretizations recompute each
    piece under autograd (the caller must let autograd record; needs_grad False skips that work)."""
    lay = _Layout(u, A, B, C, seq_idx)
    S = lay.piece_len(u.is_cuda)
    pieces = -(-lay.L // S)
    if tuple(starts.shape) != (pieces, lay.batch, lay.dim, lay.N):
        raise ValueError(f"starts must have shape {(pieces, lay.batch, lay.dim, lay.N)} (one start state per "
                         f"piece of {S} steps), got {tuple(starts.shape)}")
    if discretization == "zoh" and z is not None and (y_pre is None or y_pre.shape != u.shape):
        raise ValueError(f"y_pre must have shape {tuple(u.shape)} (zoh with z), got "
                         f"{None if y_pre is None else tuple(y_pre.shape)}")
    starts = starts.view(pieces, lay.batch, lay.G, lay.Dg, lay.N)
    if discretization != "zoh":
        return _backward_by_recompute(needs_grad, dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, starts,
                                      softplus, discretization, S)
    uu, dd, zz = lay.chan(u), lay.chan(delta), lay.chan(z)
    AA, DD, bb = lay.chan(A), lay.chan(D), lay.chan(delta_bias)
    BB, CC = lay.state_matrix(B), lay.state_matrix(C)
    dout = lay.chan(dout.contiguous())
    y_pre = lay.chan(y_pre)
    du, ddelta = torch.empty_like(uu), torch.empty_like(dd)
    dz = torch.empty_like(zz) if z is not None else None
    dBB, dCC = torch.zeros(BB.shape, dtype=u.dtype, device=u.device), torch.zeros(CC.shape, dtype=u.dtype,
                                                                                   device=u.device)
    dA = torch.zeros_like(AA)
    dD = torch.zeros_like(DD) if D is not None else None
    dbias = torch.zeros_like(bb) if delta_bias is not None else None
    carry = None
    # the forward saved every piece's start state: the backward runs piece by piece from the last
    bufs = [u.new_empty(lay.batch, lay.G, lay.Dg, min(S, lay.L), lay.N) for _ in range(2)]
    for i in reversed(range(pieces)):
        s, e = i * S, min(i * S + S, lay.L)
        g_u, g_delta, g_z, g_B, g_C, g_A, g_D, g_bias, carry = _segment_backward(
            _sl(uu, s, e), _sl(dd, s, e), AA, _time_slice(BB, s, e), _time_slice(CC, s, e), DD, _sl(zz, s, e),
            bb, _sl(lay.keep, s, e), starts[i], softplus, dout[..., s:e], carry, _sl(y_pre, s, e), bufs)
        du[..., s:e], ddelta[..., s:e] = g_u, g_delta
        if dz is not None:
            dz[..., s:e] = g_z
        for full, part in ((dBB, g_B), (dCC, g_C)):
            if full.shape[-2] == 1:  # one matrix for every step: sum over pieces
                full += part
            else:
                full[..., s:e, :] = part
        dA += g_A
        if dD is not None:
            dD += g_D
        if dbias is not None:
            dbias += g_bias
    flat = lambda x, ref: None if x is None else x.reshape(ref.shape)  # noqa: E731
    return (flat(du, u), flat(ddelta, delta), flat(dA, A), lay.unstate(dBB, B), lay.unstate(dCC, C), flat(dD, D),
            flat(dz, z), flat(dbias, delta_bias))


class _SelectiveScanTorch(torch.autograd.Function):
    """Thin autograd wrapper over scan_forward / scan_backward (kernels/compile_ops.py calls them directly)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus, discretization):
        out, last, y_pre, starts = scan_forward(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus,
                                                discretization)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, y_pre, starts)
        ctx.cfg = (softplus, discretization)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):  # the last state's gradient is not propagated (as upstream)
        grads = scan_backward(dout, *ctx.saved_tensors, *ctx.cfg, needs_grad=any(ctx.needs_input_grad))
        return (*grads, None, None, None)


def _backward_by_recompute(need, dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, starts, softplus, discretization,
                           S):
    """Backward for the bilinear and zoh_exact discretizations: recompute each piece under autograd from its
    saved start state (starts (pieces, b, G, Dg, N)). need: whether any gradient is wanted."""
    lay = _Layout(u, A, B, C, seq_idx)
    leaf = lambda x: None if x is None else x.detach().requires_grad_()  # noqa: E731
    A_, B_, C_, D_, bias_ = leaf(A), leaf(B), leaf(C), leaf(D), leaf(delta_bias)
    grads = {k: None for k in ("u", "delta", "z")}
    du, ddelta = torch.zeros_like(u), torch.zeros_like(delta)
    dz = torch.zeros_like(z) if z is not None else None
    dout = lay.chan(dout.contiguous())
    carry = None
    segs = list(range(0, lay.L, S))
    for i in reversed(range(len(segs))):
        s, e = segs[i], min(segs[i] + S, lay.L)
        with torch.enable_grad():
            us, ds = leaf(u[..., s:e]), leaf(delta[..., s:e])
            zs = leaf(z[..., s:e]) if z is not None else None
            Bs = leaf(B[..., s:e]) if B.dim() >= 3 else B_
            Cs = leaf(C[..., s:e]) if C.dim() >= 3 else C_
            h0 = leaf(starts[i])
            y, h_end = _segment(lay.chan(us), lay.chan(ds), lay.chan(A_), lay.state_matrix(Bs), lay.state_matrix(Cs),
                                lay.chan(D_), lay.chan(zs), lay.chan(bias_), _sl(lay.keep, s, e), h0, softplus,
                                discretization)
            outputs, grad_outputs = [y], [dout[..., s:e]]
            if carry is not None:
                outputs.append(h_end)
                grad_outputs.append(carry)
            inputs = [x for x in (us, ds, zs, Bs, Cs, A_, D_, bias_, h0) if x is not None]
            # segment-local leaves (us, ds, zs, B/C slices) get fresh grads; shared ones accumulate in .grad
            shared = [x for x in (A_, D_, bias_) + ((B_,) if B.dim() == 2 else ()) + ((C_,) if C.dim() == 2 else ())
                      if x is not None]
            local = [x for x in inputs if all(x is not y for y in shared)]
            g = torch.autograd.grad(outputs, local + shared, grad_outputs, allow_unused=True)
        gl = dict(zip(map(id, local), g[:len(local)]))
        for sh, gs in zip(shared, g[len(local):]):
            if gs is not None:
                sh.grad = gs if sh.grad is None else sh.grad + gs
        du[..., s:e] = gl[id(us)]
        ddelta[..., s:e] = gl[id(ds)]
        if zs is not None:
            dz[..., s:e] = gl[id(zs)]
        if B.dim() >= 3:
            grads.setdefault("B", torch.zeros_like(B))[..., s:e] = gl[id(Bs)]
        if C.dim() >= 3:
            grads.setdefault("C", torch.zeros_like(C))[..., s:e] = gl[id(Cs)]
        carry = gl[id(h0)]
    dB = grads.get("B") if B.dim() >= 3 else B_.grad
    dC = grads.get("C") if C.dim() >= 3 else C_.grad
    def g_or_zero(x, ref):
        return (x if x is not None else torch.zeros_like(ref)) if ref is not None else None
    return (du, ddelta, g_or_zero(A_.grad, A), g_or_zero(dB, B), g_or_zero(dC, C),
            g_or_zero(D_.grad if D_ is not None else None, D), dz,
            g_or_zero(bias_.grad if bias_ is not None else None, delta_bias)) if need else (None,) * 8


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, seq_idx=None, discretization="zoh"):
    """Inputs already validated. Computes in fp32 (float64 stays float64); returns out in u's dtype."""
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = lambda x: None if x is None else x.to(work)  # noqa: E731
    out, last = _SelectiveScanTorch.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z),
                                          cast(delta_bias), seq_idx, delta_softplus, discretization)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
