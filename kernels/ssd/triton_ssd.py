"""Triton SSD (Mamba-2), forward and backward.

dt processing (bias, softplus, limits), the D skip and the z gate are elementwise and stay in torch around
a Triton core that computes, per head, y_t = sum_{s<=t} C_t.B_s exp(cs_t - cs_s) dt_s x_s + C_t exp(cs_t) h_in,
cs being the in-chunk, in-document cumsum of dt * A. Chunks are Q = 64 steps internally (the result does
not depend on the chunk size the caller passes). Kernels, each over (batch * heads, chunks) unless noted:

  forward   1. chunk states   S_c = sum_s exp(cs_end - cs_s) dt_s x_s B_s^T, the chunk decay, cs
            2. state passing  h_in[c] for every chunk, the final state      (batch * heads, P*N blocks)
            3. chunk output   masked (C B^T) @ (dt x) + (C h_in^T) * exp(cs)
  backward  4. dh_in[c] = (dy * exp(cs))^T C
            5. reverse state passing: dS_c, d(decay_c), d(initial state)    (batch * heads, P*N blocks)
            6. everything else for the chunk: dx, d(dt), dA, dB, dC

With seq_idx, C.B^T terms, decays and state flow between different documents are masked inside the
exponent (exp(-inf) = 0), and cs restarts at each document start, so isolation is exact.
Per-head dB/dC are written per head and summed over a group's heads in torch; per-chunk dA partials and
decay gradients likewise: no atomics, deterministic.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import process_dt

TRITON_SSD_AVAILABLE = True
Q_CHUNK = 64
# fp32 dots on tensor cores use TF32 by default (about 1e-3 relative); tests force "ieee"
DOT_PRECISION = os.environ.get("KERNELS_DOT_PRECISION", "tf32")


@triton.jit
def _chunk_common(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, pid_bh, c, L, H, G, P, N,
                  sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b,
                  Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Loads one chunk of one head: x (Q, BP), dt (Q), B, C (Q, BN), the in-document cumsum cs (Q), the
    same-document causal mask (Q, Q), document ids, the chunk's end index and its incoming document."""
    b = pid_bh // H
    h = pid_bh % H
    g = h // (H // G)
    t = c * Q + tl.arange(0, Q)
    tm = t < L
    p = tl.arange(0, BP)
    n = tl.arange(0, BN)
    x = tl.load(x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :], mask=tm[:, None] & (p[None, :] < P),
                other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * sd_b + t * sd_l + h, mask=tm, other=0.0)
    Bm = tl.load(B_ptr + b * sb_b + t[:, None] * sb_l + g * sb_g + n[None, :], mask=tm[:, None] & (n[None, :] < N),
                 other=0.0).to(tl.float32)
    Cm = tl.load(C_ptr + b * sb_b + t[:, None] * sb_l + g * sb_g + n[None, :], mask=tm[:, None] & (n[None, :] < N),
                 other=0.0).to(tl.float32)
    A = tl.load(A_ptr + h)
    dA = dt * A
    i = tl.arange(0, Q)
    causal = i[:, None] >= i[None, :]
    t_end = tl.minimum(c * Q + Q, L) - 1
    if HAS_SEQ:
        tc = tl.minimum(t, L - 1)  # padding steps take the last document id
        sq = tl.load(seq_ptr + b * ss_b + tc)
        same = causal & (sq[:, None] == sq[None, :])
        cs = tl.sum(tl.where(same, dA[None, :], 0.0), axis=1)  # cumsum restarted at document starts
        seq_end = tl.load(seq_ptr + b * ss_b + t_end)
        seq_in = tl.load(seq_ptr + b * ss_b + tl.maximum(c * Q - 1, 0))
    else:
        sq = tl.zeros((Q,), dtype=tl.int32)
        same = causal
        cs = tl.cumsum(dA, 0)
        seq_end = 0
        seq_in = 0
    return b, h, g, t, tm, p, n, x, dt, Bm, Cm, A, cs, same, sq, t_end, seq_end, seq_in


@triton.jit
def _weight_in(cs, tm, sq, seq_in, HAS_SEQ: tl.constexpr):
    """exp(cs_t): how the state entering the chunk reaches step t (0 outside its document)."""
    into = tm
    if HAS_SEQ:
        into = into & (sq == seq_in)
    return tl.exp(tl.where(into, cs, float("-inf")))


@triton.jit
def _weight_end(cs, t, tm, sq, t_end, seq_end, HAS_SEQ: tl.constexpr):
    """(exp(cs_end - cs_s), cs_end): how step s reaches the chunk's end state (0 outside its document)."""
    cs_end = tl.sum(tl.where(t == t_end, cs, 0.0), axis=0)
    keep = tm
    if HAS_SEQ:
        keep = keep & (sq == seq_end)
    return tl.exp(tl.where(keep, cs_end - cs, float("-inf"))), cs_end


@triton.jit
def _ssd_chunk_state_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, S_ptr, decay_ptr, L, H, G, P, N, NC,
                         sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b,
                         Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr,
                         PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b, h, g, t, tm, p, n, x, dt, Bm, Cm, A, cs, same, sq, t_end, seq_end, seq_in = _chunk_common(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, pid_bh, c, L, H, G, P, N,
        sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b, Q, BP, BN, HAS_SEQ)
    w_end, cs_end = _weight_end(cs, t, tm, sq, t_end, seq_end, HAS_SEQ)
    xw = x * (dt * w_end)[:, None]
    S = tl.dot(tl.trans(xw), Bm, input_precision=PREC)  # (BP, BN)
    base = (pid_bh * NC + c) * P * N
    tl.store(S_ptr + base + p[:, None] * N + n[None, :], S, mask=(p[:, None] < P) & (n[None, :] < N))
    decay = tl.exp(cs_end)
    if HAS_SEQ:
        decay = tl.where(seq_end == seq_in, decay, 0.0)
    tl.store(decay_ptr + pid_bh * NC + c, decay)


@triton.jit
def _ssd_state_passing_fwd(S_ptr, decay_ptr, h0_ptr, hin_ptr, final_ptr, PN, NC, BLOCK: tl.constexpr,
                           HAS_H0: tl.constexpr):
    pid_bh = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    km = k < PN
    h = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_bh * PN + k, mask=km, other=0.0).to(tl.float32)
    for c in range(0, NC):
        tl.store(hin_ptr + (pid_bh * NC + c) * PN + k, h, mask=km)
        d = tl.load(decay_ptr + pid_bh * NC + c)
        h = d * h + tl.load(S_ptr + (pid_bh * NC + c) * PN + k, mask=km, other=0.0)
    tl.store(final_ptr + pid_bh * PN + k, h, mask=km)


@triton.jit
def _ssd_chunk_scan_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, hin_ptr, y_ptr, L, H, G, P, N, NC,
                        sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr,
                        PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b, h, g, t, tm, p, n, x, dt, Bm, Cm, A, cs, same, sq, t_end, seq_end, seq_in = _chunk_common(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, pid_bh, c, L, H, G, P, N,
        sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b, Q, BP, BN, HAS_SEQ)
    E = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
    y = tl.dot(CB * E, x * dt[:, None], input_precision=PREC)
    hin = tl.load(hin_ptr + (pid_bh * NC + c) * P * N + p[:, None] * N + n[None, :],
                  mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)
    w_in = _weight_in(cs, tm, sq, seq_in, HAS_SEQ)
    y += tl.dot(Cm, tl.trans(hin), input_precision=PREC) * w_in[:, None]
    tl.store(y_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :], y, mask=tm[:, None] & (p[None, :] < P))


@triton.jit
def _ssd_dhin_bwd(dy_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, dhin_ptr, x_ptr, L, H, G, P, N, NC,
                  sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b,
                  Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b, h, g, t, tm, p, n, dy, dt, Bm, Cm, A, cs, same, sq, t_end, seq_end, seq_in = _chunk_common(
        dy_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, pid_bh, c, L, H, G, P, N,
        sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b, Q, BP, BN, HAS_SEQ)
    w_in = _weight_in(cs, tm, sq, seq_in, HAS_SEQ)
    dhin = tl.dot(tl.trans(dy * w_in[:, None]), Cm, input_precision=PREC)  # (BP, BN)
    tl.store(dhin_ptr + (pid_bh * NC + c) * P * N + p[:, None] * N + n[None, :], dhin,
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _ssd_state_passing_bwd(dhin_ptr, hin_ptr, decay_ptr, dfinal_ptr, dS_ptr, ddecay_ptr, dh0_ptr, PN, NC, NBLK,
                           BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr):
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    k = blk * BLOCK + tl.arange(0, BLOCK)
    km = k < PN
    G = tl.zeros((BLOCK,), dtype=tl.float32)  # gradient of the state at the end of chunk c
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + pid_bh * PN + k, mask=km, other=0.0)
    for ci in range(0, NC):
        c = NC - 1 - ci
        tl.store(dS_ptr + (pid_bh * NC + c) * PN + k, G, mask=km)
        hin = tl.load(hin_ptr + (pid_bh * NC + c) * PN + k, mask=km, other=0.0)
        tl.store(ddecay_ptr + (pid_bh * NC + c) * NBLK + blk, tl.sum(G * hin, axis=0))
        d = tl.load(decay_ptr + pid_bh * NC + c)
        G = tl.load(dhin_ptr + (pid_bh * NC + c) * PN + k, mask=km, other=0.0) + d * G
    tl.store(dh0_ptr + pid_bh * PN + k, G, mask=km)


@triton.jit
def _ssd_chunk_bwd(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, hin_ptr, dy_ptr, dS_ptr, ddecay_ptr, decay_ptr,
                   dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, L, H, G, P, N, NC,
                   sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b,
                   Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b, h, g, t, tm, p, n, x, dt, Bm, Cm, A, cs, same, sq, t_end, seq_end, seq_in = _chunk_common(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, pid_bh, c, L, H, G, P, N,
        sx_b, sx_l, sx_h, sd_b, sd_l, sb_b, sb_l, sb_g, ss_b, Q, BP, BN, HAS_SEQ)
    pm = (p[:, None] < P) & (n[None, :] < N)
    dy = tl.load(dy_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :],
                 mask=tm[:, None] & (p[None, :] < P), other=0.0).to(tl.float32)
    xdt = x * dt[:, None]
    # 1. inside the chunk: y = (CB * E) @ xdt
    E = tl.exp(tl.where(same, cs[:, None] - cs[None, :], float("-inf")))
    CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)
    M = CB * E
    dxdt = tl.dot(tl.trans(M), dy, input_precision=PREC)
    dM = tl.dot(dy, tl.trans(xdt), input_precision=PREC)
    dCB = dM * E
    dseg = dM * CB * E
    dcs = tl.sum(dseg, axis=1) - tl.sum(dseg, axis=0)
    dC = tl.dot(dCB, Bm, input_precision=PREC)
    dB = tl.dot(tl.trans(dCB), Cm, input_precision=PREC)
    # 2. the incoming state: y += (C h_in^T) * w_in
    hin = tl.load(hin_ptr + (pid_bh * NC + c) * P * N + p[:, None] * N + n[None, :], mask=pm, other=0.0)
    w_in = _weight_in(cs, tm, sq, seq_in, HAS_SEQ)
    Z = tl.dot(Cm, tl.trans(hin), input_precision=PREC)
    dC += tl.dot(dy * w_in[:, None], hin, input_precision=PREC)
    dcs += tl.sum(dy * Z, axis=1) * w_in
    # 3. the chunk's own end state: S = (xdt * w_end)^T B
    is_end = t == t_end
    w_end, cs_end = _weight_end(cs, t, tm, sq, t_end, seq_end, HAS_SEQ)
    dS = tl.load(dS_ptr + (pid_bh * NC + c) * P * N + p[:, None] * N + n[None, :], mask=pm, other=0.0)
    BdS = tl.dot(Bm, tl.trans(dS), input_precision=PREC)  # (Q, BP)
    dxdt += w_end[:, None] * BdS
    dB += w_end[:, None] * tl.dot(xdt, dS, input_precision=PREC)
    gw = tl.sum(xdt * BdS, axis=1) * w_end
    dcs_end = tl.sum(gw, axis=0)
    dcs -= gw
    # 4. the chunk decay exp(cs_end) (zero, and without gradient, across a document change)
    dcs_end += tl.load(ddecay_ptr + pid_bh * NC + c) * tl.load(decay_ptr + pid_bh * NC + c)
    dcs += tl.where(is_end, dcs_end, 0.0)
    # 5. through the cumsum to dA = dt * A
    if HAS_SEQ:
        ddA = tl.sum(tl.where(same, dcs[:, None], 0.0), axis=0)
    else:
        ddA = tl.sum(dcs, axis=0) - tl.cumsum(dcs, 0) + dcs
    ddA = tl.where(tm, ddA, 0.0)
    ddt = ddA * A + tl.sum(dxdt * x, axis=1)
    tl.store(dA_ptr + pid_bh * NC + c, tl.sum(ddA * dt, axis=0))
    tl.store(dx_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + p[None, :], dxdt * dt[:, None],
             mask=tm[:, None] & (p[None, :] < P))
    tl.store(ddt_ptr + b * sd_b + t * sd_l + h, ddt, mask=tm)
    # dB, dC per head: (batch, L, H, N), summed over each group's heads in torch
    off = ((b * L + t[:, None]) * H + h) * N + n[None, :]
    tl.store(dB_ptr + off, dB, mask=tm[:, None] & (n[None, :] < N))
    tl.store(dC_ptr + off, dC, mask=tm[:, None] & (n[None, :] < N))


def _geometry(x, B):
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    BP, BN = max(16, triton.next_power_of_2(P)), max(16, triton.next_power_of_2(N))
    NC = triton.cdiv(L, Q_CHUNK)
    return batch, L, H, P, G, N, BP, BN, NC


def _strides(x, dt, B, seq):
    return (x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
            seq.stride(0) if seq is not None else 0)


class _SSDCore(torch.autograd.Function):
    """x (b, L, H, P), dt (b, L, H) fp32 processed, A (H,), B/C (b, L, G, N), h0 (b, H, P, N) or None."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, seq, precision):
        batch, L, H, P, G, N, BP, BN, NC = _geometry(x, B)
        f32 = dict(device=x.device, dtype=torch.float32)
        S = torch.empty(batch * H, NC, P, N, **f32)
        decay = torch.empty(batch * H, NC, **f32)
        st = _strides(x, dt, B, seq)
        seq_arg = seq if seq is not None else dt
        common = dict(Q=Q_CHUNK, BP=BP, BN=BN, HAS_SEQ=seq is not None)
        _ssd_chunk_state_fwd[(batch * H, NC)](x, dt, A, B, C, seq_arg, S, decay, L, H, G, P, N, NC, *st,
                                              PREC=precision, **common)
        hin = torch.empty(batch * H, NC, P, N, **f32)
        final = torch.empty(batch, H, P, N, **f32)
        block = min(1024, triton.next_power_of_2(P * N))
        _ssd_state_passing_fwd[(batch * H, triton.cdiv(P * N, block))](
            S, decay, h0 if h0 is not None else S, hin, final, P * N, NC, BLOCK=block, HAS_H0=h0 is not None)
        y = torch.empty(batch, L, H, P, **f32)
        _ssd_chunk_scan_fwd[(batch * H, NC)](x, dt, A, B, C, seq_arg, hin, y, L, H, G, P, N, NC, *st,
                                             PREC=precision, **common)
        ctx.save_for_backward(x, dt, A, B, C, seq, hin, decay)
        ctx.has_h0, ctx.precision = h0 is not None, precision
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, seq, hin, decay = ctx.saved_tensors
        batch, L, H, P, G, N, BP, BN, NC = _geometry(x, B)
        f32 = dict(device=x.device, dtype=torch.float32)
        dy = dy.contiguous().float()
        if dy.stride() != x.stride():
            raise RuntimeError("internal: dy must share x's contiguous layout")
        st = _strides(x, dt, B, seq)
        seq_arg = seq if seq is not None else dt
        common = dict(Q=Q_CHUNK, BP=BP, BN=BN, HAS_SEQ=seq is not None, PREC=ctx.precision)
        dhin = torch.empty(batch * H, NC, P, N, **f32)
        _ssd_dhin_bwd[(batch * H, NC)](dy, dt, A, B, C, seq_arg, dhin, x, L, H, G, P, N, NC, *st, **common)
        block = min(1024, triton.next_power_of_2(P * N))
        nblk = triton.cdiv(P * N, block)
        dS = torch.empty(batch * H, NC, P, N, **f32)
        ddecay = torch.empty(batch * H, NC, nblk, **f32)
        dh0 = torch.empty(batch, H, P, N, **f32)
        _ssd_state_passing_bwd[(batch * H, nblk)](
            dhin, hin, decay, dfinal.contiguous() if dfinal is not None else dhin, dS, ddecay, dh0, P * N, NC, nblk,
            BLOCK=block, HAS_DFINAL=dfinal is not None)
        ddecay = ddecay.sum(-1).contiguous()
        dx = torch.empty(batch, L, H, P, **f32)
        ddt = torch.empty(batch, L, H, **f32)
        dA = torch.empty(batch * H, NC, **f32)
        dBh = torch.empty(batch, L, H, N, **f32)
        dCh = torch.empty(batch, L, H, N, **f32)
        _ssd_chunk_bwd[(batch * H, NC)](x, dt, A, B, C, seq_arg, hin, dy, dS, ddecay, decay, dx, ddt, dA, dBh, dCh,
                                        L, H, G, P, N, NC, *st, **common)
        dB = dBh.view(batch, L, G, H // G, N).sum(3)
        dC = dCh.view(batch, L, G, H // G, N).sum(3)
        return (dx.to(x.dtype), ddt, dA.view(batch, H, NC).sum((0, 2)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dh0 if ctx.has_h0 else None, None, None)


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, precision=None):
    """Inputs already validated. Same contract as mamba_chunk_scan_combined."""
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit).contiguous()
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    h0 = initial_states.float().contiguous() if initial_states is not None else None
    y, final = _SSDCore.apply(x.contiguous(), dtp, A.float().contiguous(), B.contiguous(), C.contiguous(), h0, seq,
                              precision or DOT_PRECISION)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y
