"""Triton SSD (Mamba-2), forward and backward, chunked as mamba_ssm and flash-linear-attention structure it.

Per head, with cs the in-chunk, in-document cumsum of dt * A (chunks of Q = chunk_size steps):
    y_t = sum_{s<=t, same chunk and document} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + exp(cs_t) C_t.h_in[chunk]
Kernels (grid in brackets; T = cdiv(L, rows) row blocks, rows from block_config):

  forward  _ssd_dt_cumsum_fwd   dt <- clamp(softplus(dt + dt_bias)) in fp32, cs                [b*H, chunks]
           _ssd_state_fwd       chunk states fused with state passing: one program walks the chunks of one
                                (head, 64 x 64 block of the state), writes the state entering every chunk
                                in x's dtype and the fp32 final state                         [b*H, P/64, N/64]
           _ssd_chunk_scan_fwd  C.B^T inside the chunk + C.h_in, then D skip, z gate and the cast: y is
                                written once in its final dtype (plus y before the gate, with z, for dz)
                                                                                               [T, P/64, b*H]
  backward _ssd_gate_bwd        (with z) dy = dout * silu(z), dz                               [T, b*H]
           _ssd_state_bwd       reverse state passing fused with dh_in = (dy exp(cs))^T C: the gradient of
                                every chunk's end state (x's dtype) and of the initial state  [b*H, P/64, N/64]
           _ssd_chunk_bwd_dx    rows s: dx, the dt.x part of ddt, D partials, the end-state term of dcs
                                                                                               [T, b*H]
           _ssd_chunk_bwd_db    rows s x 64 columns of dB, summed over the group's heads in the program
           _ssd_chunk_bwd_dc    rows t x 64 columns of dC, the same                            [T, N/64, b*G]
           _ssd_chunk_bwd_dcs   rows t: the C.B^T pairs' and h_in's share of d(dt*A)          [T, b*H]
           _ssd_dt_bwd          d(dt*A) from those shares, the end-state and decay terms, then ddt
                                through clamp / softplus / bias, dA and d(dt_bias) partials   [b*H]
No step holds more than 64 columns of d_state at a time (sums over it go 64 wide), so shared memory and
registers do not grow with d_state; every reduction is deterministic (no atomics).

The decays' gradient, d(dt*A)_r, is built chunk by chunk (cs is an in-chunk cumsum) from what step r
actually reaches, never as a difference of two long sums: the C.B^T pairs s < r <= t (dCB * CB, summed per
row block by _ssd_chunk_bwd_dcs), the end-state weights of the steps before r (a forward sum of gw), the
incoming state's term (a reverse sum of dy_t.(exp(cs_t) C_t h_in) over the document), and the chunk decay
<dS, h_in> exp(cs_end) where one document spans the chunk (a select otherwise). Tried first: the identity
d(cs_t) = C_t.dC_t - B_t.dB_t reverse-summed over the whole row; its fp32 dA error grew with L (4e-6 at
L=150, 2.2e-5 at L=300); the form above measures 1.3e-6 at L=300, chunk 256.

Documents (seq_idx): a state reset is a select (tl.where), never a multiply by 0, and every cross-document
term is selected away before it meets a dot, so a NaN or inf in one document's state or tokens outside
the current chunk cannot reach another document. cs restarts at each document start (a segmented scan),
so a decay never subtracts two sums that hold another document's dt.
Offsets are int64 (program ids and positions cast before multiplying by strides); no input is copied.

Precision: dots take x's dtype (bf16 / fp16 operands, fp32 sums; fp32 inputs use TF32, or IEEE with
KERNELS_DOT_PRECISION=ieee); cumsums, decays, dt and every accumulator are fp32. The chunk states (h_in, dS)
are stored in x's dtype: they only ever enter dots, which round them to it anyway, so storing them in fp32
changes nothing (measured under the interpreter with bf16 inputs, 2 x 300 steps: the same errors vs float64
to 2 digits either way, out 6.2e-3 and worst gradient 9.4e-3, against 1.6e-3 / 2.5e-3 for the torch path,
which computes in fp32). The final states are fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TRITON_SSD_AVAILABLE = True
CHUNK_SIZES = (64, 128, 256)
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's 2nd and 3rd extents
# fp32 dots on tensor cores use TF32 by default (about 1e-3 relative); KERNELS_DOT_PRECISION=ieee for exact fp32
DOT_PRECISION = os.environ.get("KERNELS_DOT_PRECISION", "tf32")


# ------------------------------------------------------------------ elementwise helpers

@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0 without losing small u (Kahan's trick; Triton has no portable log1p)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _dt_raw_to_processed(dt, bias, lo, hi, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """(processed dt, its derivative w.r.t. dt + bias)."""
    v = dt + bias
    d = tl.full(v.shape, 1.0, tl.float32)
    if SOFTPLUS:
        small = v <= 20.0
        v = tl.where(small, tl.maximum(v, 0.0) + _log1p(tl.exp(-tl.abs(v))), v)
        d = tl.where(small, tl.sigmoid(dt + bias), 1.0)
    if HAS_LIMIT:
        d = tl.where((v >= lo) & (v <= hi), d, 0.0)
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v, d


@triton.jit
def _seg_add(a, a_start, b, b_start):
    """Segmented sum: b restarts the sum when it starts a segment."""
    return tl.where(b_start, b, a + b), a_start | b_start


# Triton 3.9's interpreter gets tl.dot wrong on bf16 operands (numpy has no bf16): there, operands are
# rounded to the dot's type and widened back to fp32, which is what the tensor cores compute (exact products,
# fp32 sums). Compiled kernels never take that branch.
_WIDEN_DOT_OPERANDS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _as_operand(v, dot_ty: tl.constexpr):
    v = v.to(dot_ty)
    if _WIDEN_DOT_OPERANDS:
        v = v.to(tl.float32)
    return v


@triton.jit
def _group_rows(M_ptr, b, t64, g, n, rows_mask, cols_mask, s_b, s_l, s_g, s_n, dot_ty: tl.constexpr):
    """Rows t, columns n of group g's B or C (batch, L, groups, N), as a dot operand; 0 outside the masks."""
    return _as_operand(tl.load(M_ptr + b * s_b + t64[:, None] * s_l + g * s_g + n[None, :] * s_n,
                               mask=rows_mask[:, None] & cols_mask[None, :], other=0.0), dot_ty)


@triton.jit
def _own_off(b, t64, h, p, L, H, P):
    """Offsets into a buffer this module allocates contiguous with shape (batch, L, H, P) (out, y before
    the gate, dx, dz) or (batch, L, G, N) (dB, dC)."""
    return ((b * L + t64[:, None]) * H + h) * P + p[None, :]


@triton.jit
def _seq_at(seq_ptr, b, t, L, HAS_SEQ: tl.constexpr):
    """Document id at positions t (clamped into the row: padding takes the last id); 0 without seq_idx."""
    if HAS_SEQ:
        return tl.load(seq_ptr + b * L + tl.minimum(t, L - 1))
    return tl.zeros(t.shape, dtype=tl.int32)


@triton.jit
def _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ: tl.constexpr):
    """(cs at the chunk's last step, document the chunk ends in, document of the state entering it)."""
    t_end = tl.minimum(c * Q + Q, L) - 1
    cs_end = tl.load(cs_ptr + row * Lp + t_end)
    if HAS_SEQ:
        seq_end = tl.load(seq_ptr + b * L + t_end)
        seq_in = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
    else:
        seq_end = 0
        seq_in = 0
    return cs_end, seq_end, seq_in


# ------------------------------------------------------------------ forward

@triton.jit
def _ssd_dt_cumsum_fwd(dt_ptr, A_ptr, bias_ptr, seq_ptr, dtp_ptr, cs_ptr, L, H, Lp, sdt_b, sdt_l, sdt_h,
                       dt_lo, dt_hi, Q: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                       HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = row // H
    h = row % H
    t = c * Q + tl.arange(0, Q)
    tm = t < L
    dt = tl.load(dt_ptr + b * sdt_b + t.to(tl.int64) * sdt_l + h * sdt_h, mask=tm, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h)
    dt = _dt_raw_to_processed(dt, bias, dt_lo, dt_hi, SOFTPLUS, HAS_LIMIT)[0]
    dt = tl.where(tm, dt, 0.0)  # padding steps: no decay, no input
    dA = dt * tl.load(A_ptr + h)
    if HAS_SEQ:
        sq = _seq_at(seq_ptr, b, t, L, HAS_SEQ)
        prev = _seq_at(seq_ptr, b, tl.maximum(t - 1, 0), L, HAS_SEQ)
        cs = tl.associative_scan((dA, sq != prev), 0, _seg_add)[0]
    else:
        cs = tl.cumsum(dA, 0)
    tl.store(dtp_ptr + row * Lp + t, dt)
    tl.store(cs_ptr + row * Lp + t, cs)


@triton.jit
def _state_tile(H, G, P, N, BP: tl.constexpr, BN: tl.constexpr):
    """For grids [batch * heads, P / BP, N / BN]: (batch * heads + head as int64, batch, head, group, this
    block's rows p and columns n of a (P, N) state, their offsets and mask)."""
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    n = tl.program_id(2) * BN + tl.arange(0, BN)
    return row, row // H, h, h // (H // G), p, n, p[:, None] * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)


@triton.jit
def _ssd_state_fwd(x_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, h0_ptr, hin_ptr, final_ptr, L, H, G, P, N, Lp, NC, Q,
                   sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n,
                   BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr,
                   HAS_H0: tl.constexpr, PREC: tl.constexpr):
    row, b, h, g, p, n, pn_off, pn_mask = _state_tile(H, G, P, N, BP, BN)
    dot_ty = x_ptr.dtype.element_ty
    state = tl.zeros((BP, BN), dtype=tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + row * P * N + pn_off, mask=pn_mask, other=0.0).to(tl.float32)
    for c in range(0, NC):
        tl.store(hin_ptr + (row * NC + c) * P * N + pn_off, state.to(hin_ptr.dtype.element_ty), mask=pn_mask)
        cs_end, seq_end, seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)
        chunk_state = tl.zeros((BP, BN), dtype=tl.float32)
        for s0 in range(c * Q, tl.minimum(c * Q + Q, L), BS):
            s = s0 + tl.arange(0, BS)
            sm = s < L
            s64 = s.to(tl.int64)
            x = tl.load(x_ptr + b * sx_b + s64[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                        mask=sm[:, None] & (p[None, :] < P), other=0.0)
            Bs = _group_rows(B_ptr, b, s64, g, n, sm, n < N, sb_b, sb_l, sb_g, sb_n, dot_ty)
            keep = sm & (_seq_at(seq_ptr, b, s, L, HAS_SEQ) == seq_end)
            cs = tl.load(cs_ptr + row * Lp + s)
            w = tl.exp(tl.where(keep, cs_end - cs, 0.0)) * tl.load(dtp_ptr + row * Lp + s)
            xw = _as_operand(tl.where(keep[:, None], x.to(tl.float32) * w[:, None], 0.0), dot_ty)
            chunk_state = tl.dot(tl.trans(xw), Bs, chunk_state, input_precision=PREC)
        carried = tl.exp(cs_end) * state + chunk_state
        if HAS_SEQ:
            carried = tl.where(seq_end == seq_in, carried, chunk_state)  # a new document: reset (select)
        state = carried
    tl.store(final_ptr + row * P * N + pn_off, state, mask=pn_mask)


@triton.jit
def _rowdot(a_ptr, a_rows, a_mask, a_sk, b_ptr, b_rows, b_mask, b_sk, K, dot_ty: tl.constexpr, BA: tl.constexpr,
            BB: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """(BA, BB) fp32 = sum over k < K of a[i, k] * b[j, k], BK columns at a time (rows are int64 offsets):
    no operand wider than BK is ever held, whatever d_state or headdim."""
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        a = tl.load(a_ptr + a_rows[:, None] + k[None, :] * a_sk, mask=a_mask[:, None] & km[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] + k[None, :] * b_sk, mask=b_mask[:, None] & km[None, :], other=0.0)
        acc = tl.dot(_as_operand(a, dot_ty), tl.trans(_as_operand(b, dot_ty)), acc, input_precision=PREC)
    return acc


@triton.jit
def _causal_decay(t, s, cs_t, cs_s, seq_t, seq_s, L):
    """(len(t), len(s)): exp(cs_t - cs_s) where s <= t < L in one document, else exactly 0 (a select)."""
    same = (t[:, None] >= s[None, :]) & (t[:, None] < L) & (seq_t[:, None] == seq_s[None, :])
    return tl.where(same, tl.exp(tl.where(same, cs_t[:, None] - cs_s[None, :], 0.0)), 0.0)


@triton.jit
def _causal_decay_keys(s, t, cs_s, cs_t, seq_s, seq_t, L):
    """The transpose of _causal_decay, built in (s, t) order (no layout change)."""
    same = (t[None, :] >= s[:, None]) & (t[None, :] < L) & (seq_t[None, :] == seq_s[:, None])
    return tl.where(same, tl.exp(tl.where(same, cs_t[None, :] - cs_s[:, None], 0.0)), 0.0)


@triton.jit
def _ssd_chunk_scan_fwd(x_ptr, z_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, hin_ptr, D_ptr, out_ptr, ypre_ptr,
                        L, H, G, P, N, Lp, NC, Q,
                        sx_b, sx_l, sx_h, sx_p, sz_b, sz_l, sz_h, sz_p, sb_b, sb_l, sb_g, sb_n,
                        sc_b, sc_l, sc_g, sc_n,
                        BT: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, HAS_SEQ: tl.constexpr,
                        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, PREC: tl.constexpr):
    t0 = tl.program_id(0) * BT
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    row = tl.program_id(2).to(tl.int64)
    b = row // H
    h = row % H
    g = h // (H // G)
    c = t0 // Q
    dot_ty: tl.constexpr = x_ptr.dtype.element_ty
    t = t0 + tl.arange(0, BT)
    tm = t < L
    t64 = t.to(tl.int64)
    pm = p < P
    c_rows = b * sc_b + t64 * sc_l + g * sc_g
    cs_t = tl.load(cs_ptr + row * Lp + t)
    seq_t = _seq_at(seq_ptr, b, t, L, HAS_SEQ)
    seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)[2]
    # the state entering the chunk, read through C, reaches the steps of its own document
    acc = _rowdot(C_ptr, c_rows, tm, sc_n, hin_ptr, (row * NC + c) * P * N + p.to(tl.int64) * N, pm, 1, N,
                  dot_ty, BT, BP, BK, PREC)
    into = tm & (seq_t == seq_in)
    acc = tl.where(into[:, None], acc * tl.exp(tl.where(into, cs_t, 0.0))[:, None], 0.0)
    for s0 in range(c * Q, t0 + BT, BT):
        s = s0 + tl.arange(0, BT)
        sm = s < L
        s64 = s.to(tl.int64)
        CB = _rowdot(C_ptr, c_rows, tm, sc_n, B_ptr, b * sb_b + s64 * sb_l + g * sb_g, sm, sb_n, N,
                     dot_ty, BT, BT, BK, PREC)
        xs = tl.load(x_ptr + b * sx_b + s64[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                     mask=sm[:, None] & pm[None, :], other=0.0)
        decay = _causal_decay(t, s, cs_t, tl.load(cs_ptr + row * Lp + s), seq_t, _seq_at(seq_ptr, b, s, L, HAS_SEQ), L)
        M = _as_operand(CB * decay * tl.load(dtp_ptr + row * Lp + s)[None, :], dot_ty)
        acc = tl.dot(M, _as_operand(xs, dot_ty), acc, input_precision=PREC)
    tp_mask = tm[:, None] & pm[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + b * sx_b + t64[:, None] * sx_l + h * sx_h + p[None, :] * sx_p, mask=tp_mask, other=0.0)
        if D_PER_CHANNEL:
            acc += tl.load(D_ptr + h * P + p, mask=pm, other=0.0)[None, :] * xt.to(tl.float32)
        else:
            acc += tl.load(D_ptr + h) * xt.to(tl.float32)
    out_off = _own_off(b, t64, h, p, L, H, P)
    if HAS_Z:
        tl.store(ypre_ptr + out_off, acc.to(ypre_ptr.dtype.element_ty), mask=tp_mask)
        z = tl.load(z_ptr + b * sz_b + t64[:, None] * sz_l + h * sz_h + p[None, :] * sz_p, mask=tp_mask,
                    other=0.0).to(tl.float32)
        acc = acc * z * tl.sigmoid(z)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=tp_mask)


# ------------------------------------------------------------------ backward

@triton.jit
def _ssd_gate_bwd(dout_ptr, z_ptr, ypre_ptr, dy_ptr, dz_ptr, L, H, P, so_b, so_l, so_h, so_p, sz_b, sz_l, sz_h, sz_p,
                  BT: tl.constexpr, BP: tl.constexpr):
    """out = ypre * silu(z): dy = dout * silu(z) (x's dtype, read by every later kernel), dz."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    row = tl.program_id(1).to(tl.int64)
    b = row // H
    h = row % H
    t64 = t.to(tl.int64)
    p = tl.arange(0, BP)
    mask = (t < L)[:, None] & (p < P)[None, :]
    dout = tl.load(dout_ptr + b * so_b + t64[:, None] * so_l + h * so_h + p[None, :] * so_p, mask=mask,
                   other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * sz_b + t64[:, None] * sz_l + h * sz_h + p[None, :] * sz_p, mask=mask,
                other=0.0).to(tl.float32)
    own = _own_off(b, t64, h, p, L, H, P)
    ypre = tl.load(ypre_ptr + own, mask=mask, other=0.0).to(tl.float32)
    sg = tl.sigmoid(z)
    tl.store(dy_ptr + own, (dout * z * sg).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + own, (dout * ypre * sg * (1.0 + z * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ssd_state_bwd(dy_ptr, C_ptr, cs_ptr, seq_ptr, hin_ptr, dfinal_ptr, dS_ptr, dh0_ptr, ddecay_ptr,
                   L, H, G, P, N, Lp, NC, Q,
                   sy_b, sy_l, sy_h, sy_p, sc_b, sc_l, sc_g, sc_n,
                   BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr,
                   HAS_DFINAL: tl.constexpr, PREC: tl.constexpr):
    row, b, h, g, p, n, pn_off, pn_mask = _state_tile(H, G, P, N, BP, BN)
    dot_ty: tl.constexpr = dy_ptr.dtype.element_ty
    grad = tl.zeros((BP, BN), dtype=tl.float32)  # gradient of the state leaving chunk c
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + row * P * N + pn_off, mask=pn_mask, other=0.0)
    blk = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    nblk = tl.num_programs(1) * tl.num_programs(2)
    for ci in range(0, NC):
        c = NC - 1 - ci
        st_off = (row * NC + c) * P * N + pn_off
        tl.store(dS_ptr + st_off, grad.to(dS_ptr.dtype.element_ty), mask=pn_mask)
        # gradient of the chunk's decay exp(cs_end), this block's part: <dS, h_in>
        hin = tl.load(hin_ptr + st_off, mask=pn_mask, other=0.0).to(tl.float32)
        tl.store(ddecay_ptr + (row * NC + c) * nblk + blk, tl.sum(tl.sum(grad * hin, axis=1), axis=0))
        cs_end, seq_end, seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)
        dhin = tl.zeros((BP, BN), dtype=tl.float32)
        for s0 in range(c * Q, tl.minimum(c * Q + Q, L), BS):
            t = s0 + tl.arange(0, BS)
            tm = t < L
            t64 = t.to(tl.int64)
            dy = tl.load(dy_ptr + b * sy_b + t64[:, None] * sy_l + h * sy_h + p[None, :] * sy_p,
                         mask=tm[:, None] & (p[None, :] < P), other=0.0).to(tl.float32)
            Ct = _group_rows(C_ptr, b, t64, g, n, tm, n < N, sc_b, sc_l, sc_g, sc_n, dot_ty)
            into = tm & (_seq_at(seq_ptr, b, t, L, HAS_SEQ) == seq_in)
            w_in = tl.exp(tl.where(into, tl.load(cs_ptr + row * Lp + t), 0.0))
            dyw = _as_operand(tl.where(into[:, None], dy * w_in[:, None], 0.0), dot_ty)
            dhin = tl.dot(tl.trans(dyw), Ct, dhin, input_precision=PREC)
        carried = tl.exp(cs_end) * grad + dhin
        if HAS_SEQ:
            carried = tl.where(seq_end == seq_in, carried, dhin)  # a document starts in chunk c: reset (select)
        grad = carried
    tl.store(dh0_ptr + row * P * N + pn_off, grad, mask=pn_mask)


@triton.jit
def _head_tile(L, H, G, P, Q, BR: tl.constexpr, BP: tl.constexpr):
    """For grids [row blocks, batch * heads] holding a whole headdim: (first row, rows, row mask, rows as
    int64, batch * heads + head as int64, batch, head, group, chunk, headdim columns, their mask)."""
    r0 = tl.program_id(0) * BR
    row = tl.program_id(1).to(tl.int64)
    h = row % H
    rows = r0 + tl.arange(0, BR)
    p = tl.arange(0, BP)
    return r0, rows, rows < L, rows.to(tl.int64), row, row // H, h, h // (H // G), r0 // Q, p, p < P


@triton.jit
def _ssd_chunk_bwd_dx(x_ptr, dy_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, dS_ptr, D_ptr,
                      dx_ptr, ddtx_ptr, gw_ptr, dD_ptr, L, H, G, P, N, Lp, NC, Q,
                      sx_b, sx_l, sx_h, sx_p, sy_b, sy_l, sy_h, sy_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
                      BS: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, HAS_SEQ: tl.constexpr,
                      HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, PREC: tl.constexpr):
    """Rows s of one chunk and head (key side): dx, the dt.x part of ddt, D partials, and gw_s, what step s's
    weight exp(cs_end - cs_s) in the chunk's end state gives to d(cs_end) and takes from d(cs_s)."""
    s0, s, sm, s64, row, b, h, g, c, p, pm = _head_tile(L, H, G, P, Q, BS, BP)
    dot_ty: tl.constexpr = x_ptr.dtype.element_ty
    sp_mask = sm[:, None] & pm[None, :]
    b_rows = b * sb_b + s64 * sb_l + g * sb_g
    x_s = tl.load(x_ptr + b * sx_b + s64[:, None] * sx_l + h * sx_h + p[None, :] * sx_p, mask=sp_mask,
                  other=0.0).to(tl.float32)
    dt_s = tl.load(dtp_ptr + row * Lp + s)
    cs_s = tl.load(cs_ptr + row * Lp + s)
    seq_s = _seq_at(seq_ptr, b, s, L, HAS_SEQ)
    V = x_s * dt_s[:, None]
    # the chunk's end state S = sum_s exp(cs_end - cs_s) V_s B_s^T, whose gradient is dS
    cs_end, seq_end, seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)
    keep = sm & (seq_s == seq_end)
    BdS = _rowdot(B_ptr, b_rows, sm, sb_n, dS_ptr, (row * NC + c) * P * N + p.to(tl.int64) * N, pm, 1, N,
                  dot_ty, BS, BP, BK, PREC)
    dV = tl.where(keep[:, None], BdS * tl.exp(tl.where(keep, cs_end - cs_s, 0.0))[:, None], 0.0)
    tl.store(gw_ptr + row * Lp + s, tl.sum(dV * V, axis=1), mask=sm)  # d(cs_end) from step s; -d(cs_s)
    # inside the chunk: y_t += (C_t.B_s) exp(cs_t - cs_s) V_s for s <= t
    for t0 in range(s0, tl.minimum(c * Q + Q, L), BS):
        t = t0 + tl.arange(0, BS)
        tm = t < L
        t64 = t.to(tl.int64)
        dy_t = _as_operand(tl.load(dy_ptr + b * sy_b + t64[:, None] * sy_l + h * sy_h + p[None, :] * sy_p,
                                   mask=tm[:, None] & pm[None, :], other=0.0), dot_ty)
        CBt = _rowdot(B_ptr, b_rows, sm, sb_n, C_ptr, b * sc_b + t64 * sc_l + g * sc_g, tm, sc_n, N,
                      dot_ty, BS, BS, BK, PREC)  # (s, t): B_s.C_t
        decay = _causal_decay_keys(s, t, cs_s, tl.load(cs_ptr + row * Lp + t), seq_s,
                                   _seq_at(seq_ptr, b, t, L, HAS_SEQ), L)
        dV = tl.dot(_as_operand(CBt * decay, dot_ty), dy_t, dV, input_precision=PREC)
    dx = dV * dt_s[:, None]
    if HAS_D:
        dy_s = tl.load(dy_ptr + b * sy_b + s64[:, None] * sy_l + h * sy_h + p[None, :] * sy_p, mask=sp_mask,
                       other=0.0).to(tl.float32)
        if D_PER_CHANNEL:
            dx += tl.load(D_ptr + h * P + p, mask=pm, other=0.0)[None, :] * dy_s
        else:
            dx += tl.load(D_ptr + h) * dy_s
        dD_row = (b * tl.num_programs(0) + tl.program_id(0)) * H + h
        tl.store(dD_ptr + dD_row * P + p, tl.sum(dy_s * x_s, axis=0), mask=pm)
    tl.store(dx_ptr + _own_off(b, s64, h, p, L, H, P), dx.to(dx_ptr.dtype.element_ty), mask=sp_mask)
    tl.store(ddtx_ptr + row * Lp + s, tl.sum(dV * x_s, axis=1), mask=sm)


@triton.jit
def _group_tile(L, H, G, N, Q, BR: tl.constexpr, BN: tl.constexpr):
    """For grids [row blocks, N / BN, batch * groups]: (first row, rows, row mask, rows as int64, columns of
    N, column mask, batch, group, heads per group, chunk)."""
    r0 = tl.program_id(0) * BR
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    bg = tl.program_id(2).to(tl.int64)
    rows = r0 + tl.arange(0, BR)
    return r0, rows, rows < L, rows.to(tl.int64), n, n < N, bg // G, bg % G, H // G, r0 // Q


@triton.jit
def _ssd_chunk_bwd_db(x_ptr, dy_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, dS_ptr, dB_ptr, L, H, G, P, N, Lp, NC, Q,
                      sx_b, sx_l, sx_h, sx_p, sy_b, sy_l, sy_h, sy_p, sc_b, sc_l, sc_g, sc_n,
                      BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_SEQ: tl.constexpr,
                      PREC: tl.constexpr):
    """Rows s, one N block, summed over the heads of one group inside the program: dB. Sums over headdim
    go BK at a time (_rowdot), so nothing headdim-wide is held."""
    s0, s, sm, s64, n, nm, b, g, R, c = _group_tile(L, H, G, N, Q, BS, BN)
    dot_ty: tl.constexpr = x_ptr.dtype.element_ty
    seq_s = _seq_at(seq_ptr, b, s, L, HAS_SEQ)
    t_stop = tl.minimum(c * Q + Q, L)
    dB = tl.zeros((BS, BN), dtype=tl.float32)
    for r in range(0, R):
        h = g * R + r
        row = b * H + h
        cs_s = tl.load(cs_ptr + row * Lp + s)
        dt_s = tl.load(dtp_ptr + row * Lp + s)
        x_rows = b * sx_b + s64 * sx_l + h * sx_h
        cs_end, seq_end, seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)
        keep = sm & (seq_s == seq_end)
        # end state: dB_s += exp(cs_end - cs_s) dt_s x_s dS
        xdS = _rowdot(x_ptr, x_rows, sm, sx_p, dS_ptr, (row * NC + c) * P * N + n, nm, N, P, dot_ty, BS, BN, BK, PREC)
        w_end = tl.exp(tl.where(keep, cs_end - cs_s, 0.0)) * dt_s
        dB += tl.where(keep[:, None], xdS * w_end[:, None], 0.0)
        for t0 in range(s0, t_stop, BS):
            t = t0 + tl.arange(0, BS)
            tm = t < L
            t64 = t.to(tl.int64)
            Ct = _group_rows(C_ptr, b, t64, g, n, tm, nm, sc_b, sc_l, sc_g, sc_n, dot_ty)
            decay = _causal_decay_keys(s, t, cs_s, tl.load(cs_ptr + row * Lp + t), seq_s,
                                       _seq_at(seq_ptr, b, t, L, HAS_SEQ), L)
            xdy = _rowdot(x_ptr, x_rows, sm, sx_p, dy_ptr, b * sy_b + t64 * sy_l + h * sy_h, tm, sy_p, P,
                          dot_ty, BS, BS, BK, PREC)
            dCBt = xdy * dt_s[:, None] * decay
            dB = tl.dot(_as_operand(dCBt, dot_ty), Ct, dB, input_precision=PREC)
    tl.store(dB_ptr + _own_off(b, s64, g, n, L, G, N), dB.to(dB_ptr.dtype.element_ty), mask=sm[:, None] & nm[None, :])


@triton.jit
def _ssd_chunk_bwd_dc(x_ptr, dy_ptr, B_ptr, dtp_ptr, cs_ptr, seq_ptr, hin_ptr, dC_ptr, L, H, G, P, N, Lp, NC, Q,
                      sx_b, sx_l, sx_h, sx_p, sy_b, sy_l, sy_h, sy_p, sb_b, sb_l, sb_g, sb_n,
                      BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_SEQ: tl.constexpr,
                      PREC: tl.constexpr):
    """Rows t, one N block, summed over the heads of one group inside the program: dC."""
    t0, t, tm, t64, n, nm, b, g, R, c = _group_tile(L, H, G, N, Q, BT, BN)
    dot_ty: tl.constexpr = x_ptr.dtype.element_ty
    seq_t = _seq_at(seq_ptr, b, t, L, HAS_SEQ)
    dC = tl.zeros((BT, BN), dtype=tl.float32)
    for r in range(0, R):
        h = g * R + r
        row = b * H + h
        dy_rows = b * sy_b + t64 * sy_l + h * sy_h
        cs_t = tl.load(cs_ptr + row * Lp + t)
        seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)[2]
        into = tm & (seq_t == seq_in)
        # the incoming state: dC_t += exp(cs_t) dy_t h_in
        dyh = _rowdot(dy_ptr, dy_rows, tm, sy_p, hin_ptr, (row * NC + c) * P * N + n, nm, N, P, dot_ty, BT, BN, BK,
                      PREC)
        dC += tl.where(into[:, None], dyh * tl.exp(tl.where(into, cs_t, 0.0))[:, None], 0.0)
        for s0 in range(c * Q, t0 + BT, BT):
            s = s0 + tl.arange(0, BT)
            sm = s < L
            s64 = s.to(tl.int64)
            Bs = _group_rows(B_ptr, b, s64, g, n, sm, nm, sb_b, sb_l, sb_g, sb_n, dot_ty)
            decay = _causal_decay(t, s, cs_t, tl.load(cs_ptr + row * Lp + s), seq_t,
                                  _seq_at(seq_ptr, b, s, L, HAS_SEQ), L)
            dyx = _rowdot(dy_ptr, dy_rows, tm, sy_p, x_ptr, b * sx_b + s64 * sx_l + h * sx_h, sm, sx_p, P,
                          dot_ty, BT, BT, BK, PREC)
            dCB = dyx * tl.load(dtp_ptr + row * Lp + s)[None, :] * decay
            dC = tl.dot(_as_operand(dCB, dot_ty), Bs, dC, input_precision=PREC)
    tl.store(dC_ptr + _own_off(b, t64, g, n, L, G, N), dC.to(dC_ptr.dtype.element_ty), mask=tm[:, None] & nm[None, :])


@triton.jit
def _ssd_chunk_bwd_dcs(x_ptr, dy_ptr, B_ptr, C_ptr, dtp_ptr, cs_ptr, seq_ptr, hin_ptr, dcs_ptr, dcsk_ptr,
                       L, H, G, P, N, Lp, NC, Q,
                       sx_b, sx_l, sx_h, sx_p, sy_b, sy_l, sy_h, sy_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
                       BT: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, HAS_SEQ: tl.constexpr,
                       PREC: tl.constexpr):
    """Rows t of one chunk and head: the incoming state's term of d(cs_t) (into dcs), and the C.B^T pairs'
    share of d(dt*A)_r, the sum of dCB * CB over pairs s < r <= t, for this row block's t (into its own slice
    of dcsk: J = Q / BT slices per head, zero-filled, added up by _ssd_dt_bwd; no atomics)."""
    t0, t, tm, t64, row, b, h, g, c, p, pm = _head_tile(L, H, G, P, Q, BT, BP)
    dot_ty: tl.constexpr = x_ptr.dtype.element_ty
    c_rows = b * sc_b + t64 * sc_l + g * sc_g
    seq_t = _seq_at(seq_ptr, b, t, L, HAS_SEQ)
    cs_t = tl.load(cs_ptr + row * Lp + t)
    seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)[2]
    into = tm & (seq_t == seq_in)
    dy_t = tl.load(dy_ptr + b * sy_b + t64[:, None] * sy_l + h * sy_h + p[None, :] * sy_p,
                   mask=tm[:, None] & pm[None, :], other=0.0).to(tl.float32)
    Z = _rowdot(C_ptr, c_rows, tm, sc_n, hin_ptr, (row * NC + c) * P * N + p.to(tl.int64) * N, pm, 1, N,
                dot_ty, BT, BP, BK, PREC)
    dyw = tl.where(into[:, None], dy_t * tl.exp(tl.where(into, cs_t, 0.0))[:, None], 0.0)
    dcs = tl.sum(tl.where(into[:, None], dyw * Z, 0.0), axis=1)
    dy_d = _as_operand(dy_t, dot_ty)
    row_before = tl.zeros((BT,), dtype=tl.float32)
    for s0 in range(c * Q, t0 + BT, BT):
        s = s0 + tl.arange(0, BT)
        sm = s < L
        s64 = s.to(tl.int64)
        x_s = tl.load(x_ptr + b * sx_b + s64[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                      mask=sm[:, None] & pm[None, :], other=0.0).to(tl.float32)
        V = _as_operand(x_s * tl.load(dtp_ptr + row * Lp + s)[:, None], dot_ty)
        CB = _rowdot(C_ptr, c_rows, tm, sc_n, B_ptr, b * sb_b + s64 * sb_l + g * sb_g, sm, sb_n, N,
                     dot_ty, BT, BT, BK, PREC)
        decay = _causal_decay(t, s, cs_t, tl.load(cs_ptr + row * Lp + s), seq_t, _seq_at(seq_ptr, b, s, L, HAS_SEQ), L)
        dCB = tl.dot(dy_d, tl.trans(V), input_precision=PREC) * decay
        # d(dt*A)_r gets prod_ts from every pair s < r <= t: for r in this s block, the pairs of this t block
        # (earlier s blocks through row_before), summed directly rather than as a difference of two cumsums
        prod = dCB * CB
        before_r = tl.cumsum(prod, axis=1) - prod + row_before[:, None]
        spans = tl.sum(tl.where(t[:, None] >= s[None, :], before_r, 0.0), axis=0)
        tl.store(dcsk_ptr + (row * (Q // BT) + (t0 % Q) // BT) * Lp + s, spans, mask=sm)
        row_before += tl.sum(prod, axis=1)
    tl.store(dcs_ptr + row * Lp + t, dcs, mask=tm)


@triton.jit
def _ssd_dt_bwd(dt_ptr, A_ptr, bias_ptr, seq_ptr, dtp_ptr, cs_ptr, dcs_ptr, dcsk_ptr, gw_ptr, ddecay_ptr, ddtx_ptr,
                ddt_ptr, dA_ptr, dbias_ptr, L, H, Lp, NC, J, NBLK, sdt_b, sdt_l, sdt_h, dt_lo, dt_hi,
                Q: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                HAS_SEQ: tl.constexpr):
    """d(dt*A)_r for every step r of a row, chunk by chunk (cs is an in-chunk cumsum, so nothing crosses chunks):
    each term is summed over what step r actually reaches, never as a difference of two long sums."""
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    A = tl.load(A_ptr + h)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h)
    i = tl.arange(0, Q)
    dA_acc = 0.0
    dbias_acc = 0.0
    for c in range(0, NC):
        t = c * Q + Q - 1 - i  # reversed: a forward scan over i is a reverse scan over t
        tm = t < L
        # the incoming state's term: a reverse cumsum inside the chunk and document
        v = tl.load(dcs_ptr + row * Lp + t, mask=tm, other=0.0)
        if HAS_SEQ:
            ends = _seq_at(seq_ptr, b, t, L, HAS_SEQ) != _seq_at(seq_ptr, b, t + 1, L, HAS_SEQ)
            ddA = tl.associative_scan((v, ends), 0, _seg_add)[0]
        else:
            ddA = tl.cumsum(v, 0)
        # the C.B^T pairs spanning each step, summed by _ssd_chunk_bwd_dcs
        for j in range(0, J):
            ddA += tl.load(dcsk_ptr + (row * J + j) * Lp + t, mask=tm, other=0.0)
        # the end state: step r is inside exp(cs_end - cs_s) for every s < r (gw is 0 outside the end's document)
        gw = tl.load(gw_ptr + row * Lp + t, mask=tm, other=0.0)
        ddA += tl.cumsum(gw, 0, reverse=True) - gw
        # the chunk decay exp(cs_end), when one document spans the chunk (else no decay: a select)
        cs_end, seq_end, seq_in = _chunk_edges(seq_ptr, cs_ptr, b, row, c, Q, L, Lp, HAS_SEQ)
        ddecay = 0.0
        for k in range(0, NBLK):
            ddecay += tl.load(ddecay_ptr + (row * NC + c) * NBLK + k)
        ddA += tl.where(tm & (seq_end == seq_in), ddecay * tl.exp(cs_end), 0.0)
        dtp = tl.load(dtp_ptr + row * Lp + t)
        ddt = tl.load(ddtx_ptr + row * Lp + t, mask=tm, other=0.0) + A * ddA
        dA_acc += tl.sum(tl.where(tm, ddA * dtp, 0.0), axis=0)
        t64 = t.to(tl.int64)
        raw = tl.load(dt_ptr + b * sdt_b + t64 * sdt_l + h * sdt_h, mask=tm, other=0.0).to(tl.float32)
        d = _dt_raw_to_processed(raw, bias, dt_lo, dt_hi, SOFTPLUS, HAS_LIMIT)[1]
        draw = tl.where(tm, ddt * d, 0.0)
        dbias_acc += tl.sum(draw, axis=0)
        tl.store(ddt_ptr + (b * L + t64) * H + h, draw.to(ddt_ptr.dtype.element_ty), mask=tm)
    tl.store(dA_ptr + row, dA_acc)
    tl.store(dbias_ptr + row, dbias_acc)


# ------------------------------------------------------------------ block sizes

def _dt_bwd_warps(Q):
    """Two steps per thread: with one (Q = 32 x warps) ptxas (sm_90, bf16, all features) spills 4 bytes."""
    return max(1, Q // 64)


def _pow2(v):
    return max(16, triton.next_power_of_2(v))


# (rows, num_warps, num_stages) per kernel, for 2-byte / 4-byte inputs and headdim <= 64 / <= 128: the first of
# (64,4,2) (64,8,2) (32,4,2) (32,8,2) (32,8,1) (16,4,2) (16,8,2) (16,8,1) that ptxas (sm_90) compiles without
# spills within 232,448 B of shared memory, features all on and all off (a search over compile_specs'
# kernels, 2026-11-30). d_state does not enter: it is walked or split 64 columns at a time.
_ROWS = {
    "state_fwd": {2: ((64, 8, 2),) * 2, 4: ((32, 8, 2),) * 2},
    "state_bwd": {2: ((64, 8, 2),) * 2, 4: ((32, 8, 2),) * 2},
    "chunk_scan_fwd": {2: ((64, 8, 2),) * 2, 4: ((64, 8, 2),) * 2},
    "chunk_bwd_dx": {2: ((64, 8, 2), (16, 8, 2)), 4: ((32, 8, 2), (16, 8, 2))},
    "chunk_bwd_db": {2: ((64, 8, 2),) * 2, 4: ((32, 8, 1),) * 2},
    "chunk_bwd_dc": {2: ((32, 8, 2),) * 2, 4: ((32, 8, 2),) * 2},
    "chunk_bwd_dcs": {2: ((64, 8, 2), (32, 8, 2)), 4: ((64, 8, 2), (32, 8, 1))},
}
_ROW_ARG = {"state_fwd": "BS", "state_bwd": "BS", "chunk_scan_fwd": "BT", "chunk_bwd_dx": "BS",
            "chunk_bwd_db": "BS", "chunk_bwd_dc": "BT", "chunk_bwd_dcs": "BT"}


def block_config(kernel: str, P: int, N: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options: a documented table (_ROWS) of row tiles; column tiles of 64 over
    headdim (state passes, forward scan) and d_state (everything), so no program holds more than a 64-wide
    slice of a head's state whatever its size, and the full headdim only where a row sum over it is needed."""
    BP = _pow2(P)
    if kernel == "gate_bwd":
        return dict(BT=32, BP=BP, num_warps=4, num_stages=1)
    rows, warps, stages = _ROWS[kernel][2 if dtype.itemsize <= 2 else 4][0 if BP <= 64 else 1]
    cfg = {_ROW_ARG[kernel]: rows}
    BK = min(_pow2(N), 64)
    if kernel in ("state_fwd", "state_bwd"):
        cfg.update(BP=min(BP, 64), BN=BK)
    elif kernel == "chunk_scan_fwd":
        cfg.update(BP=min(BP, 64), BK=BK)
    elif kernel in ("chunk_bwd_dx", "chunk_bwd_dcs"):
        cfg.update(BP=BP, BK=BK)
    else:
        cfg.update(BN=BK, BK=min(BP, 64))
    return dict(cfg, num_warps=warps, num_stages=stages)


# ------------------------------------------------------------------ launchers and autograd

def _s4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def ssd_triton_fwd(x, dt, A, B, C, D, z, dt_bias, h0, seq, Q, softplus, dt_limit, precision):
    """The forward kernels on prepared inputs (ssd_triton_inputs'): (out, final, dtp, cs, hin, ypre).
    Residuals for ssd_triton_bwd: dtp and cs (batch * heads, Lp) fp32 (processed dt and its per-chunk cumsum,
    Lp = chunks * Q), hin (batch * heads, chunks, headdim, dstate) in x's dtype (every chunk's incoming state),
    ypre (batch, L, heads, headdim) in x's dtype (the output before the z gate) when z is given, else None."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(L, Q)
    Lp = NC * Q
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi != float("inf")
    seq_arg = seq if seq is not None else dt
    dtp = torch.empty(batch * H, Lp, **f32)
    cs = torch.empty(batch * H, Lp, **f32)
    _ssd_dt_cumsum_fwd[(batch * H, NC)](
        dt, A, dt_bias if dt_bias is not None else A, seq_arg, dtp, cs, L, H, Lp, *dt.stride(),
        lo, hi if has_limit else 0.0, Q=Q, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
        HAS_LIMIT=has_limit, HAS_SEQ=seq is not None, num_warps=4, num_stages=1)
    hin = torch.empty(batch * H, NC, P, N, device=dev, dtype=x.dtype)
    final = torch.empty(batch, H, P, N, **f32)
    cfg = block_config("state_fwd", P, N, x.dtype)
    _ssd_state_fwd[(batch * H, triton.cdiv(P, cfg["BP"]), triton.cdiv(N, cfg["BN"]))](
        x, B, dtp, cs, seq_arg, h0 if h0 is not None else final, hin, final, L, H, G, P, N, Lp, NC, Q,
        *_s4(x), *_s4(B), HAS_SEQ=seq is not None, HAS_H0=h0 is not None, PREC=precision, **cfg)
    out = torch.empty(batch, L, H, P, device=dev, dtype=x.dtype)
    ypre = torch.empty_like(out) if z is not None else out
    cfg = block_config("chunk_scan_fwd", P, N, x.dtype)
    zz = z if z is not None else x
    _ssd_chunk_scan_fwd[(triton.cdiv(L, cfg["BT"]), triton.cdiv(P, cfg["BP"]), batch * H)](
        x, zz, B, C, dtp, cs, seq_arg, hin, D if D is not None else A, out, ypre,
        L, H, G, P, N, Lp, NC, Q, *_s4(x), *_s4(zz), *_s4(B), *_s4(C),
        HAS_SEQ=seq is not None, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
        HAS_Z=z is not None, PREC=precision, **cfg)
    return out, final, dtp, cs, hin, ypre if z is not None else None


def ssd_triton_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq, dtp, cs, hin, ypre, Q, softplus, dt_limit,
                   precision, has_h0):
    """The backward kernels from ssd_triton_fwd's inputs and residuals: (dx, ddt, dA, dB, dC, dD, dz, dbias,
    dh0), None for an absent input (dh0 when not has_h0), each in its prepared input's dtype (dh0 fp32).
    dout and dfinal may be None (no gradient reaches that output)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(L, Q)
    Lp = NC * Q
    if tuple(hin.shape) != (batch * H, NC, P, N) or tuple(dtp.shape) != (batch * H, Lp) or \
            tuple(cs.shape) != (batch * H, Lp) or (z is not None and (ypre is None or ypre.shape != x.shape)):
        raise ValueError(f"residuals must be dtp, cs {(batch * H, Lp)}, hin {(batch * H, NC, P, N)} and (with z) "
                         f"ypre {tuple(x.shape)}, got dtp {tuple(dtp.shape)}, cs {tuple(cs.shape)}, "
                         f"hin {tuple(hin.shape)}, ypre {None if ypre is None else tuple(ypre.shape)}")
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    has_limit = lo > 0.0 or hi != float("inf")
    seq_arg = seq if seq is not None else dt
    has_seq = seq is not None
    if dout is None:
        dout = torch.zeros_like(x)
    dfinal = dfinal.float().contiguous() if dfinal is not None else None
    dz = None
    dy = dout
    if z is not None:  # 4. the gate: dy = dout * silu(z), dz
        dy = torch.empty(batch, L, H, P, device=dev, dtype=x.dtype)
        dz = torch.empty(batch, L, H, P, device=dev, dtype=z.dtype)
        cfg = block_config("gate_bwd", P, N, x.dtype)
        _ssd_gate_bwd[(triton.cdiv(L, cfg["BT"]), batch * H)](dout, z, ypre, dy, dz, L, H, P, *_s4(dout),
                                                              *_s4(z), **cfg)
    # 5. gradient of every chunk's end state (x's dtype) and of the initial state
    dS = torch.empty_like(hin)
    dh0 = torch.empty(batch, H, P, N, **f32)
    cfg = block_config("state_bwd", P, N, x.dtype)
    n_blk = triton.cdiv(P, cfg["BP"]) * triton.cdiv(N, cfg["BN"])
    ddecay = torch.empty(batch * H, NC, n_blk, **f32)
    _ssd_state_bwd[(batch * H, triton.cdiv(P, cfg["BP"]), triton.cdiv(N, cfg["BN"]))](
        dy, C, cs, seq_arg, hin, dfinal if dfinal is not None else dh0, dS, dh0, ddecay, L, H, G, P, N, Lp, NC, Q,
        *_s4(dy), *_s4(C), HAS_SEQ=has_seq, HAS_DFINAL=dfinal is not None, PREC=precision, **cfg)
    # 6. key side per head: dx, dt.x, key half of dcs, D partials
    dx = torch.empty(batch, L, H, P, device=dev, dtype=x.dtype)
    ddtx = torch.empty(batch * H, Lp, **f32)
    gw = torch.empty(batch * H, Lp, **f32)
    cfg = block_config("chunk_bwd_dx", P, N, x.dtype)
    n_s = triton.cdiv(L, cfg["BS"])
    dD_part = torch.empty(batch * n_s, H, P, **f32) if D is not None else gw
    _ssd_chunk_bwd_dx[(n_s, batch * H)](
        x, dy, B, C, dtp, cs, seq_arg, dS, D if D is not None else A, dx, ddtx, gw, dD_part,
        L, H, G, P, N, Lp, NC, Q, *_s4(x), *_s4(dy), *_s4(B), *_s4(C), HAS_SEQ=has_seq, HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2, PREC=precision, **cfg)
    # 7. dB and dC, each summed over a group's heads in the program
    dB = torch.empty(batch, L, G, N, device=dev, dtype=B.dtype)
    cfg = block_config("chunk_bwd_db", P, N, x.dtype)
    _ssd_chunk_bwd_db[(triton.cdiv(L, cfg["BS"]), triton.cdiv(N, cfg["BN"]), batch * G)](
        x, dy, C, dtp, cs, seq_arg, dS, dB, L, H, G, P, N, Lp, NC, Q, *_s4(x), *_s4(dy), *_s4(C),
        HAS_SEQ=has_seq, PREC=precision, **cfg)
    dC = torch.empty(batch, L, G, N, device=dev, dtype=C.dtype)
    cfg = block_config("chunk_bwd_dc", P, N, x.dtype)
    _ssd_chunk_bwd_dc[(triton.cdiv(L, cfg["BT"]), triton.cdiv(N, cfg["BN"]), batch * G)](
        x, dy, B, dtp, cs, seq_arg, hin, dC, L, H, G, P, N, Lp, NC, Q, *_s4(x), *_s4(dy), *_s4(B),
        HAS_SEQ=has_seq, PREC=precision, **cfg)
    # 8. query half of dcs
    cfg = block_config("chunk_bwd_dcs", P, N, x.dtype)
    J = Q // cfg["BT"]
    dcs = torch.empty(batch * H, Lp, **f32)
    dcsk = torch.zeros(batch * H, J, Lp, **f32)
    _ssd_chunk_bwd_dcs[(triton.cdiv(L, cfg["BT"]), batch * H)](
        x, dy, B, C, dtp, cs, seq_arg, hin, dcs, dcsk, L, H, G, P, N, Lp, NC, Q, *_s4(x), *_s4(dy), *_s4(B),
        *_s4(C), HAS_SEQ=has_seq, PREC=precision, **cfg)
    # 9. decays, dt, A, dt_bias
    ddt = torch.empty(batch, L, H, device=dev, dtype=dt.dtype)
    dA_part = torch.empty(batch * H, **f32)
    dbias_part = torch.empty(batch * H, **f32)
    _ssd_dt_bwd[(batch * H,)](
        dt, A, dt_bias if dt_bias is not None else A, seq_arg, dtp, cs, dcs, dcsk, gw, ddecay, ddtx, ddt, dA_part,
        dbias_part, L, H, Lp, NC, J, n_blk, *dt.stride(), lo, hi if has_limit else 0.0,
        Q=Q, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus, HAS_LIMIT=has_limit, HAS_SEQ=has_seq,
        num_warps=_dt_bwd_warps(Q), num_stages=1)
    dA = dA_part.view(batch, H).sum(0).to(A.dtype)
    dD = None
    if D is not None:
        dD = dD_part.sum(0)
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    dbias = dbias_part.view(batch, H).sum(0).to(dt_bias.dtype) if dt_bias is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 if has_h0 else None


class _SSD(torch.autograd.Function):
    """Eager autograd over ssd_triton_fwd / ssd_triton_bwd (compile_ops calls the two functions directly)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, seq, Q, softplus, dt_limit, precision):
        out, final, dtp, cs, hin, ypre = ssd_triton_fwd(x, dt, A, B, C, D, z, dt_bias, h0, seq, Q, softplus,
                                                        dt_limit, precision)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq, dtp, cs, hin, ypre)
        ctx.meta = (Q, softplus, dt_limit, precision, h0 is not None)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, dt_bias, seq, dtp, cs, hin, ypre = ctx.saved_tensors
        Q, softplus, dt_limit, precision, has_h0 = ctx.meta
        grads = ssd_triton_bwd(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, seq, dtp, cs, hin, ypre, Q, softplus,
                               dt_limit, precision, has_h0)
        return grads + (None,) * 5


def ssd_triton_check(x, chunk_size):
    """The triton backend's own limits (ValueError): x's dtype, the chunk size, batch * heads."""
    if x.dtype == torch.float64:
        raise ValueError("the triton backend takes float16/bfloat16/float32 x; use backend='torch' or 'ref' for "
                         "float64")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the triton backend, got {chunk_size!r}")
    if x.shape[0] * x.shape[2] > MAX_GRID_YZ:  # batch * heads is a grid's y or z extent
        raise ValueError(f"the triton backend takes batch * heads <= {MAX_GRID_YZ}, got x of shape {tuple(x.shape)}")


def ssd_triton_inputs(A, D, dt_bias, initial_states, seq_idx):
    """The prepared (A, D, dt_bias, h0, seq) that ssd_triton_fwd / ssd_triton_bwd take: the (heads,)-sized A, D,
    dt_bias in fp32, D and the initial states contiguous, seq_idx int32."""
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    h0 = initial_states.contiguous() if initial_states is not None else None
    D32 = D.float().contiguous() if D is not None else None
    bias32 = dt_bias.float() if dt_bias is not None else None
    return A.float(), D32, bias32, h0, seq


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, precision=None):
    """Inputs already validated by mamba_chunk_scan_combined (same contract). Tensors go to the kernels
    with their strides and dtypes; only the (heads,)-sized A, D, dt_bias become fp32, seq_idx int32."""
    ssd_triton_check(x, chunk_size)
    A32, D32, bias32, h0, seq = ssd_triton_inputs(A, D, dt_bias, initial_states, seq_idx)
    out, final = _SSD.apply(x, dt, A32, B, C, D32, z, bias32, h0, seq, chunk_size, bool(dt_softplus),
                            tuple(dt_limit), precision or DOT_PRECISION)
    return (out, final) if return_final_states else out


# ------------------------------------------------------------------ what the launcher can compile

_FP32_PTRS = {"A_ptr", "bias_ptr", "D_ptr", "dtp_ptr", "cs_ptr", "final_ptr", "dfinal_ptr", "dh0_ptr", "h0_ptr",
              "ddtx_ptr", "dcs_ptr", "dcsk_ptr", "gw_ptr", "ddecay_ptr", "dD_ptr", "dA_ptr", "dbias_ptr"}
_KERNEL_FLAGS = {  # kernel name -> (fn, block-config name or None, feature flags)
    "dt_cumsum_fwd": (_ssd_dt_cumsum_fwd, None, ("HAS_BIAS", "SOFTPLUS", "HAS_LIMIT", "HAS_SEQ")),
    "state_fwd": (_ssd_state_fwd, "state_fwd", ("HAS_SEQ", "HAS_H0")),
    "chunk_scan_fwd": (_ssd_chunk_scan_fwd, "chunk_scan_fwd", ("HAS_SEQ", "HAS_D", "D_PER_CHANNEL", "HAS_Z")),
    "state_bwd": (_ssd_state_bwd, "state_bwd", ("HAS_SEQ", "HAS_DFINAL")),
    "gate_bwd": (_ssd_gate_bwd, "gate_bwd", ()),
    "chunk_bwd_dx": (_ssd_chunk_bwd_dx, "chunk_bwd_dx", ("HAS_SEQ", "HAS_D", "D_PER_CHANNEL")),
    "chunk_bwd_db": (_ssd_chunk_bwd_db, "chunk_bwd_db", ("HAS_SEQ",)),
    "chunk_bwd_dc": (_ssd_chunk_bwd_dc, "chunk_bwd_dc", ("HAS_SEQ",)),
    "chunk_bwd_dcs": (_ssd_chunk_bwd_dcs, "chunk_bwd_dcs", ("HAS_SEQ",)),
    "dt_bwd": (_ssd_dt_bwd, None, ("HAS_BIAS", "SOFTPLUS", "HAS_LIMIT", "HAS_SEQ")),
}
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signature(fn, constexprs, dtype):
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a == "seq_ptr":
            sig[a] = "*i32"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if a in _FP32_PTRS else "*" + _TRITON_TYPES[dtype]
        elif a in ("dt_lo", "dt_hi"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def compile_specs(headdims=(64, 128), dstates=(64, 128, 256), dtypes=(torch.bfloat16, torch.float32),
                  chunk_sizes=CHUNK_SIZES, precision="tf32"):
    """One entry per distinct compilation the launcher can pick: kernel x block config x dtype x feature set
    (all on / all off), named after the sizes that pick it. Block configs depend on (headdim, dtype) through
    block_config; d_state and the chunk size are runtime arguments (N, Q) of the chunk kernels, so one
    compilation serves every d_state >= 64 and chunk size there; the two per-step dt kernels take the chunk
    as their block (Q constexpr). Inputs and outputs in one dtype (dt too); states, dt and cumsum scratch fp32
    as the launcher allocates them."""
    specs = []
    for dtype in dtypes:
        for name, (fn, cfg_name, flags) in _KERNEL_FLAGS.items():
            for on in (True, False):
                picks = {}  # distinct (constexprs, launch options) -> the sizes that pick them
                for P in headdims:
                    for N in dstates:
                        for q in (chunk_sizes if cfg_name is None else (None,)):
                            if cfg_name is None:
                                warps = _dt_bwd_warps(q) if fn is _ssd_dt_bwd else 4
                                const, launch = dict(Q=q), dict(num_warps=warps, num_stages=1)
                            else:
                                const = dict(block_config(cfg_name, P, N, dtype))
                                launch = dict(num_warps=const.pop("num_warps"), num_stages=const.pop("num_stages"))
                                if "PREC" in fn.arg_names:
                                    const["PREC"] = precision
                            const.update({f: on for f in flags})
                            key = (tuple(sorted(const.items())), tuple(launch.items()))
                            picks.setdefault(key, (const, launch, set()))[2].add((P, N, q))
                for const, launch, sizes in picks.values():
                    sig = _signature(fn, const, dtype)
                    aligned = [a for a, ty in sig.items() if ty.startswith("*")]
                    aligned += [a for a in ("P", "N", "Lp", "sx_b", "sx_l", "sz_b", "sz_l", "so_b", "so_l", "sb_b",
                                            "sc_b") if a in sig]
                    covers = ("Q" + ",".join(str(q) for q in sorted({q for _, _, q in sizes})) if cfg_name is None else
                              "P" + ",".join(str(v) for v in sorted({P for P, _, _ in sizes})) +
                              " N" + ",".join(str(v) for v in sorted({N for _, N, _ in sizes})))
                    specs.append(dict(name=f"{name}[{_TRITON_TYPES[dtype]} {covers} {'all-on' if on else 'all-off'}]",
                                      fn=fn, signature=sig, constexprs=const, divisible_by_16=aligned, **launch))
    return specs
