"""Triton selective scan (Mamba-1), forward and backward, parallel over batch, channels and time.

The sequence is cut into chunks of T steps; one program owns (batch b, a block of CH channels, chunk c)
and loops over its channels, scanning time inside a (dstate, T) register tile with tl.associative_scan on
(decay, input) pairs (the affine maps h -> a h + x compose associatively).

Forward (three launches + the carry):
  1. chunk summary: each chunk's end state from a zero start (a tl.reduce of the maps) -> X[b, d, c + 1],
     and the chunk's sum of dt (its total decay is exp(A * sum dt)) -> dts[b, d, c];
  2. carry (_carry_kernel): X[c + 1] = exp(A dts[c]) X[c] + X[c + 1], sequential over chunks, parallel over
     (batch, channel, state). Past CARRY_SINGLE_MAX chunks, two levels: chunks grouped into ~sqrt(nc)
     super-chunks, (a) summarise each group, (b) carry across groups, (c) carry inside each group from its
     true start, so long single sequences still give many programs;
  3. finish: each chunk rescans from its true start state X[c] and writes y (C contraction, D skip,
     silu(z) gate, cast to the output dtype).
  X (batch, dim, nc + 1, dstate) fp32 is saved for backward; X[:, :, nc] is the last state.
Backward, the same structure in reverse time: the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}.
  1. chunk summary of the adjoint from zero -> Y[b, d, c] (the adjoint of the chunk's first state) and
     the sum of dt over steps t0+1 .. t1 (the decays the adjoint crosses);
  2. reverse carry: Y[c] = exp(A dts'[c]) Y[c + 1] + Y[c];
  3. finish: recompute the chunk's states from X[c], then the adjoint from Y[c + 1], and all gradients.
  The adjoint runs on tiles loaded in reversed time order, so it is a forward scan too: Triton's
  associative_scan(reverse=True) is avoided (triton-lang/triton#4362 reports wrong results for
  non-commutative combines), and the recomputed states are flipped (tl.flip) once per channel instead.

Packed documents (seq_idx): a reset is a select (tl.where on a flag carried through the scan, the carry and
the chunk summaries), never a multiplication by zero, so a NaN/Inf in one document cannot reach the next.

Gradient reductions without acq_rel atomics: per-channel parameters (A, D, delta_bias, fixed B/C) are
written per (batch, channel, chunk) and summed in torch (deterministic); input-dependent B/C gradients,
(batch, group, dstate, L), are summed over a program's channels in registers, then added with relaxed
atomics (one per element and channel block).

Inputs stay in their dtype (fp16/bf16/fp32, loaded and converted in registers, fp32 math); outputs are
written in the inputs' dtypes; strides are passed, so no copies are needed (the interface copies only a
tensor whose time axis is not contiguous, for coalesced loads). Offsets are int64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_CHUNK = 128           # time steps per chunk program
TILE_ELEMS = 2048         # chunk x padded dstate: one (dstate, T) fp32 tile is 16 registers/thread at 4 warps
CARRY_SINGLE_MAX = 64     # chunks carried by one sequential pass; beyond it, two levels
CHANNELS_PER_PROGRAM = 32  # channels one chunk program loops over (shares the B/C tiles between them)
CARRY_TILE = 256          # (channels x dstate) elements per carry program


# ------------------------------------------------------------------ building blocks

@triton.jit
def _affine(a1, x1, a2, x2):
    """Compose h -> a1 h + x1, then h -> a2 h + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _affine_reset(a1, x1, r1, a2, x2, r2):
    """_affine for maps flagged r != 0 that ignore their input (a document starts there): a select, so
    values of an earlier document (even NaN/Inf) never enter a later one."""
    return a1 * a2, tl.where(r2 != 0, x2, a2 * x1 + x2), r1 | r2


@triton.jit
def _scan(a, x, r, HAS_SEQ: tl.constexpr):
    """Inclusive scan of the maps along time (axis 1): (product of decays, state from zero, any reset)."""
    if HAS_SEQ:
        P, H, R = tl.associative_scan((a, x, tl.broadcast_to(r[None, :], a.shape)), 1, _affine_reset)
    else:
        P, H = tl.associative_scan((a, x), 1, _affine)
        R = P  # unused
    return P, H, R


@triton.jit
def _end_state(a, x, r, HAS_SEQ: tl.constexpr):
    """The composed map's state from zero after the whole tile (a reduction, cheaper than a scan)."""
    if HAS_SEQ:
        _, H, _ = tl.reduce((a, x, tl.broadcast_to(r[None, :], a.shape)), 1, _affine_reset)
    else:
        _, H = tl.reduce((a, x), 1, _affine)
    return H


@triton.jit
def _apply_start(P, H, R, h0, HAS_SEQ: tl.constexpr):
    """States from the start state h0 (dstate,): P h0 + H, or H past a reset."""
    h = P * h0[:, None] + H
    if HAS_SEQ:
        h = tl.where(R != 0, H, h)
    return h


@triton.jit
def _resets(seq_row, s_sl, t, L):
    """1 where a document starts at step t (0 < t < L and seq_idx changes), else 0."""
    inside = (t > 0) & (t < L)
    cur = tl.load(seq_row + t * s_sl, mask=inside, other=0)
    prv = tl.load(seq_row + (t - 1) * s_sl, mask=inside, other=0)
    return (inside & (cur != prv)).to(tl.int32)


@triton.jit
def _time_vec(row, s_l, t, tm):
    return tl.load(row + t * s_l, mask=tm, other=0.0).to(tl.float32)


@triton.jit
def _dt(raw, bias, tm, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (identity above 20); 0 outside the sequence, so those steps are identities.
    softplus = log1p(e) with e = exp(raw), as log(1 + e) * e / ((1 + e) - 1) (exact division by the rounded
    increment): log(1 + e) alone loses digits at Mamba's small dt (raw ~ -7: ~7e-5 relative)."""
    raw = raw + bias
    dt = raw
    if SOFTPLUS:
        e = tl.exp(tl.minimum(raw, 20.0))
        one_e = 1.0 + e
        tiny = one_e == 1.0
        log1p_e = tl.where(tiny, e, tl.log(one_e) * (e / tl.where(tiny, 1.0, one_e - 1.0)))
        dt = tl.where(raw <= 20.0, log1p_e, raw)
    return raw, tl.where(tm, dt, 0.0)


@triton.jit
def _bc_tile(ptr, b, group, n, nm, t, tm, s0, s1, s2, s3):
    """Input-dependent B or C for one chunk: a (dstate, T) fp32 tile."""
    return tl.load(ptr + b * s0 + group * s1 + n[:, None] * s2 + t[None, :] * s3,
                   mask=nm[:, None] & tm[None, :], other=0.0).to(tl.float32)


@triton.jit
def _bc_column(ptr, d, n, nm, s0, s1):
    """Fixed B or C of channel d: a (dstate, 1) column."""
    return tl.load(ptr + d * s0 + n * s1, mask=nm, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _channel_params(A_ptr, D_ptr, bias_ptr, d, n, nm, s_ad, s_an, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    A = tl.load(A_ptr + d * s_ad + n * s_an, mask=nm, other=0.0).to(tl.float32)
    Dv = 0.0
    bias = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)
    return A, Dv, bias


# ------------------------------------------------------------------ forward

@triton.jit
def _fwd_chunk_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, X_ptr, dts_ptr, flags_ptr, out_ptr,
    DIM, L, DSTATE, DG, NCHUNK, CH,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_b0, s_b1, s_b2, s_b3, s_c0, s_c1, s_c2, s_c3,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_sb, s_sl,
    T: tl.constexpr, BLOCK_N: tl.constexpr, FINISH: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """FINISH=False: chunk summaries (X[c + 1] from zero, dts, flags). FINISH=True: y from X[c]."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_c.to(tl.int64) * T + tl.arange(0, T)
    tm = t < L
    n = tl.arange(0, BLOCK_N)
    nm = n < DSTATE
    d0 = pid_d * CH
    group = (d0 // DG).to(tl.int64)
    Bt = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    Ct = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    if VAR_B:
        Bt = _bc_tile(B_ptr, b, group, n, nm, t, tm, s_b0, s_b1, s_b2, s_b3)
    if VAR_C and FINISH:
        Ct = _bc_tile(C_ptr, b, group, n, nm, t, tm, s_c0, s_c1, s_c2, s_c3)
    r = tl.zeros((T,), dtype=tl.int32)
    if HAS_SEQ:
        r = _resets(seq_ptr + b * s_sb, s_sl, t, L)
        if not FINISH:
            if pid_d == 0:
                tl.store(flags_ptr + b * NCHUNK + pid_c, tl.max(r, 0))
    for i in range(0, tl.minimum(CH, DIM - d0)):
        d = (d0 + i).to(tl.int64)
        A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, d, n, nm, s_ad, s_an, HAS_D, HAS_BIAS)
        u = _time_vec(u_ptr + b * s_ub + d * s_ud, s_ul, t, tm)
        raw, dt = _dt(_time_vec(delta_ptr + b * s_db + d * s_dd, s_dl, t, tm), bias, tm, SOFTPLUS)
        Bi = Bt
        if not VAR_B:
            Bi = _bc_column(B_ptr, d, n, nm, s_b0, s_b1)
        a = tl.exp(dt[None, :] * A[:, None])
        x = (dt * u)[None, :] * Bi
        X_row = X_ptr + ((b * DIM + d) * (NCHUNK + 1)) * DSTATE + n
        if FINISH:
            P, H, R = _scan(a, x, r, HAS_SEQ)
            h = _apply_start(P, H, R, tl.load(X_row + pid_c * DSTATE, mask=nm, other=0.0), HAS_SEQ)
            Ci = Ct
            if not VAR_C:
                Ci = _bc_column(C_ptr, d, n, nm, s_c0, s_c1)
            y = tl.sum(h * Ci, 0)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zv = _time_vec(z_ptr + b * s_zb + d * s_zd, s_zl, t, tm)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + b * s_ob + d * s_od + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=tm)
        else:
            tl.store(X_row + (pid_c + 1) * DSTATE, _end_state(a, x, r, HAS_SEQ), mask=nm)
            if pid_c == 0:
                tl.store(X_row, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=nm)
            tl.store(dts_ptr + (b * DIM + d) * NCHUNK + pid_c, tl.sum(dt, 0))


# ------------------------------------------------------------------ carry across chunks

@triton.jit
def _carry_kernel(
    X_ptr, dts_ptr, flags_ptr, A_ptr, S_ptr, sdts_ptr, sflags_ptr,
    DIM, DSTATE, NITEMS, GROUP, NSUPER, s_ad, s_an,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, REVERSE: tl.constexpr,
    HAS_SEQ: tl.constexpr,
):
    """Boundary states X (batch, dim, NITEMS + 1, dstate): item k's own summary sits in slot k + 1 (forward)
    or k (REVERSE) and becomes h = exp(A dts[k]) h_before + own (or own where flags[k]: a reset inside).
    Items [g * GROUP, (g + 1) * GROUP) per program g. MODE 0: in place from zero; MODE 1: no writes, the
    group's summary to S (slot g + 1, or g if REVERSE), sdts, sflags; MODE 2: in place from S's slot g (g + 1)."""
    pid_g = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = pid_d * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    dm = d < DIM
    nm = n < DSTATE
    m2 = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * s_ad + n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    row = b * DIM + d
    X_rows = X_ptr + (row * (NITEMS + 1))[:, None] * DSTATE + n[None, :]
    S_rows = S_ptr + (row * (NSUPER + 1))[:, None] * DSTATE + n[None, :]
    first = pid_g * GROUP
    count = tl.minimum(GROUP, NITEMS - first)
    # slot offsets: item k owns slot k + 1 forward, k in reverse; a group starts from slot g (g + 1 in reverse)
    own_shift = 0 if REVERSE else 1
    h = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    if MODE == 2:
        h = tl.load(S_rows + (pid_g + 1 - own_shift) * DSTATE, mask=m2, other=0.0)
    dt_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    any_reset = tl.full((), 0, tl.int32)
    for kk in range(0, count):
        k = first + kk
        if REVERSE:
            k = first + count - 1 - kk
        slot = X_rows + (k + own_shift) * DSTATE
        own = tl.load(slot, mask=m2, other=0.0)
        dts = tl.load(dts_ptr + row * NITEMS + k, mask=dm, other=0.0)
        h = tl.exp(dts[:, None] * A) * h + own
        if HAS_SEQ:
            f = tl.load(flags_ptr + b * NITEMS + k)
            h = tl.where(f != 0, own, h)
            any_reset = any_reset | f
        if MODE == 1:
            dt_sum += dts
        else:
            tl.store(slot, h, mask=m2)
    if MODE == 1:
        tl.store(S_rows + (pid_g + own_shift) * DSTATE, h, mask=m2)
        tl.store(sdts_ptr + row * NSUPER + pid_g, dt_sum, mask=dm)
        if HAS_SEQ:
            if pid_d == 0:
                tl.store(sflags_ptr + b * NSUPER + pid_g, any_reset)


# ------------------------------------------------------------------ backward

@triton.jit
def _bwd_chunk_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, dout_ptr, X_ptr, Y_ptr,
    dts_ptr, flags_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    DIM, L, DSTATE, DG, NCHUNK, CH, GROUPS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_b0, s_b1, s_b2, s_b3, s_c0, s_c1, s_c2, s_c3,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_sb, s_sl,
    s_dub, s_dud, s_dul, s_ddb, s_ddd, s_ddl, s_dzb, s_dzd, s_dzl,
    T: tl.constexpr, BLOCK_N: tl.constexpr, FINISH: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Tiles with suffix _r are in reversed time order (column j is step t0 + T - 1 - j), where the adjoint
    g_t = C_t dy_t + a_{t+1} g_{t+1} is a forward scan. FINISH=False: the adjoint of the chunk's first state
    from zero -> Y[c], the sum of dt over t0+1..t1 -> dts, resets there -> flags.
    FINISH=True: states from X[c], adjoint from Y[c + 1], and every gradient."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_c.to(tl.int64) * T + tl.arange(0, T)
    tr = pid_c.to(tl.int64) * T + (T - 1 - tl.arange(0, T))
    tm = t < L
    trm = tr < L
    tnm = tr + 1 < L
    n = tl.arange(0, BLOCK_N)
    nm = n < DSTATE
    d0 = pid_d * CH
    group = (d0 // DG).to(tl.int64)
    Bt = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    Bt_r = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    Ct_r = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    if VAR_B and FINISH:
        Bt = _bc_tile(B_ptr, b, group, n, nm, t, tm, s_b0, s_b1, s_b2, s_b3)
        Bt_r = _bc_tile(B_ptr, b, group, n, nm, tr, trm, s_b0, s_b1, s_b2, s_b3)
    if VAR_C:
        Ct_r = _bc_tile(C_ptr, b, group, n, nm, tr, trm, s_c0, s_c1, s_c2, s_c3)
    r = tl.zeros((T,), dtype=tl.int32)
    r_r = tl.zeros((T,), dtype=tl.int32)
    rn_r = tl.zeros((T,), dtype=tl.int32)
    if HAS_SEQ:
        seq_row = seq_ptr + b * s_sb
        rn_r = _resets(seq_row, s_sl, tr + 1, L)
        if FINISH:
            r = _resets(seq_row, s_sl, t, L)
            r_r = _resets(seq_row, s_sl, tr, L)
        else:
            if pid_d == 0:
                tl.store(flags_ptr + b * NCHUNK + pid_c, tl.max(rn_r, 0))
    dB_acc = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    dC_acc = tl.zeros((BLOCK_N, T), dtype=tl.float32)
    for i in range(0, tl.minimum(CH, DIM - d0)):
        d = (d0 + i).to(tl.int64)
        A, Dv, bias = _channel_params(A_ptr, D_ptr, bias_ptr, d, n, nm, s_ad, s_an, HAS_D, HAS_BIAS)
        delta_row = delta_ptr + b * s_db + d * s_dd
        u_row = u_ptr + b * s_ub + d * s_ud
        # gradient of y (before the gate), reversed
        dout = _time_vec(dout_ptr + b * s_gb + d * s_gd, s_gl, tr, trm)
        dy = dout
        if HAS_Z:
            zv = _time_vec(z_ptr + b * s_zb + d * s_zd, s_zl, tr, trm)
            sz = tl.sigmoid(zv)
            dy = dout * zv * sz
        Ci = Ct_r
        if not VAR_C:
            Ci = _bc_column(C_ptr, d, n, nm, s_c0, s_c1)
        _, dt_next = _dt(_time_vec(delta_row, s_dl, tr + 1, tnm), bias, tnm, SOFTPLUS)
        a_next = tl.exp(dt_next[None, :] * A[:, None])
        dyC = Ci * dy[None, :]
        Y_row = Y_ptr + ((b * DIM + d) * (NCHUNK + 1)) * DSTATE + n
        if FINISH:
            Bi = Bt
            Bi_r = Bt_r
            if not VAR_B:
                Bi = _bc_column(B_ptr, d, n, nm, s_b0, s_b1)
                Bi_r = Bi
            # states, recomputed in time order from X[c], then flipped to reversed order
            u = _time_vec(u_row, s_ul, t, tm)
            _, dt = _dt(_time_vec(delta_row, s_dl, t, tm), bias, tm, SOFTPLUS)
            P, H, R = _scan(tl.exp(dt[None, :] * A[:, None]), (dt * u)[None, :] * Bi, r, HAS_SEQ)
            X_row = X_ptr + ((b * DIM + d) * (NCHUNK + 1)) * DSTATE + n
            h_r = tl.flip(_apply_start(P, H, R, tl.load(X_row + pid_c * DSTATE, mask=nm, other=0.0), HAS_SEQ), 1)
            # adjoint from Y[c + 1]
            Pg, G, Rg = _scan(a_next, dyC, rn_r, HAS_SEQ)
            g = _apply_start(Pg, G, Rg, tl.load(Y_row + (pid_c + 1) * DSTATE, mask=nm, other=0.0), HAS_SEQ)
            u_r = _time_vec(u_row, s_ul, tr, trm)
            raw_r, dt_r = _dt(_time_vec(delta_row, s_dl, tr, trm), bias, trm, SOFTPLUS)
            dtu = dt_r * u_r
            ah_prev = h_r - dtu[None, :] * Bi_r  # a_t h_{t-1} = h_t - x_t; 0 where a document starts
            if HAS_SEQ:
                ah_prev = tl.where(r_r[None, :] != 0, 0.0, ah_prev)
            g_ah = g * ah_prev
            gB = tl.sum(g * Bi_r, 0)
            ddt = u_r * gB + tl.sum(A[:, None] * g_ah, 0)
            du = dt_r * gB
            if HAS_D:
                du += Dv * dy
            if HAS_Z:
                y = tl.sum(h_r * Ci, 0)
                if HAS_D:
                    y += Dv * u_r
                dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + b * s_dzb + d * s_dzd + tr * s_dzl, dz.to(dz_ptr.dtype.element_ty), mask=trm)
            if SOFTPLUS:
                ddt = tl.where(raw_r <= 20.0, ddt * tl.sigmoid(raw_r), ddt)
            ddt = tl.where(trm, ddt, 0.0)
            tl.store(du_ptr + b * s_dub + d * s_dud + tr * s_dul, du.to(du_ptr.dtype.element_ty), mask=trm)
            tl.store(ddelta_ptr + b * s_ddb + d * s_ddd + tr * s_ddl, ddt.to(ddelta_ptr.dtype.element_ty), mask=trm)
            # per (batch, channel, chunk) partial sums, reduced in torch
            part = (b * DIM + d) * NCHUNK + pid_c
            tl.store(dA_ptr + part * DSTATE + n, tl.sum(g_ah * dt_r[None, :], 1), mask=nm)
            gx = g * dtu[None, :]
            if VAR_B:
                dB_acc += gx
            else:
                tl.store(dB_ptr + part * DSTATE + n, tl.sum(gx, 1), mask=nm)
            if VAR_C:
                dC_acc += h_r * dy[None, :]
            else:
                tl.store(dC_ptr + part * DSTATE + n, tl.sum(h_r * dy[None, :], 1), mask=nm)
            if HAS_D:
                tl.store(dD_ptr + part, tl.sum(dy * u_r, 0))
            if HAS_BIAS:
                tl.store(dbias_ptr + part, tl.sum(ddt, 0))
        else:
            tl.store(Y_row + pid_c * DSTATE, _end_state(a_next, dyC, rn_r, HAS_SEQ), mask=nm)
            if pid_c == NCHUNK - 1:
                tl.store(Y_row + NCHUNK * DSTATE, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=nm)
            tl.store(dts_ptr + (b * DIM + d) * NCHUNK + pid_c, tl.sum(dt_next, 0))
    if FINISH:
        # input-dependent B/C: (batch, GROUPS, dstate, L) fp32, summed over channel blocks by relaxed atomics
        gbase = (b * GROUPS + group) * DSTATE * L
        offs = gbase + n[:, None].to(tl.int64) * L + tr[None, :]
        m2 = nm[:, None] & trm[None, :]
        if VAR_B:
            tl.atomic_add(dB_ptr + offs, dB_acc, mask=m2, sem="relaxed")
        if VAR_C:
            tl.atomic_add(dC_ptr + offs, dC_acc, mask=m2, sem="relaxed")


# ------------------------------------------------------------------ launchers

def chunk_size(dstate: int) -> int:
    """Time steps per chunk (at most MAX_CHUNK, at least 8). From dstate 16 up the (dstate, T) tile holds
    TILE_ELEMS elements (the finish passes run it with 8 warps); below, at most TILE_ELEMS / 4 (4 warps): ptxas
    spills the backward with 1024-element tiles at 4 and at 8 warps (measured for sm_90, dstate 8)."""
    block_n = triton.next_power_of_2(dstate)
    tile = TILE_ELEMS if block_n >= 16 else TILE_ELEMS // 4
    return max(8, min(MAX_CHUNK, tile // block_n))


def channels_per_program(dim: int, groups: int) -> int:
    """At most CHANNELS_PER_PROGRAM; with several groups a divisor of dim/groups (a program must not span two
    groups: it loads one group's B/C tile)."""
    if groups == 1:
        return min(CHANNELS_PER_PROGRAM, dim)
    dg = dim // groups
    return max(c for c in range(1, min(CHANNELS_PER_PROGRAM, dg) + 1) if dg % c == 0)


def _finish_warps(block_n: int, chunk: int) -> int:
    """Warps of the finish passes (the summaries take 4). With TILE_ELEMS-element tiles at 4 warps, ptxas
    capped the forward finish at 128 registers with a stack frame; at 8 warps it takes <= 101 registers and
    the backward finish <= 224, without spills (sm_90 cubins from Triton 3.9)."""
    return 8 if block_n * chunk >= TILE_ELEMS else 4


def _bc_strides(M):
    """Strides for _bc_tile (batch, group, n, l) or _bc_column (channel, n, -, -)."""
    if M.dim() == 2:
        return M.stride(0), M.stride(1), 0, 0
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _strides3(x):
    return tuple(x.stride()) if x is not None else (0, 0, 0)


class _Problem:
    """Sizes, block sizes and the kernel arguments shared by every launch."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus):
        self.batch, self.dim, self.L = u.shape
        self.N = A.shape[1]
        self.groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
        self.block_n = triton.next_power_of_2(self.N)
        self.T = chunk_size(self.N)
        self.nchunk = triton.cdiv(self.L, self.T)
        self.ch = channels_per_program(self.dim, self.groups)
        self.grid = (self.nchunk, triton.cdiv(self.dim, self.ch), self.batch)
        self.has_seq = seq_idx is not None
        dummy = A  # pointer for absent optional tensors (never read: constexpr flags)
        self.opt = [x if x is not None else dummy for x in (D, z, delta_bias, seq_idx)]
        self.sizes = (self.dim, self.L, self.N, self.dim // self.groups, self.nchunk, self.ch)
        self.strides = (*u.stride(), *delta.stride(), *A.stride(), *_bc_strides(B), *_bc_strides(C), *_strides3(z))
        self.seq_strides = tuple(seq_idx.stride()) if seq_idx is not None else (0, 0)
        self.flags = dict(VAR_B=B.dim() >= 3, VAR_C=C.dim() >= 3, HAS_D=D is not None, HAS_Z=z is not None,
                          HAS_BIAS=delta_bias is not None, HAS_SEQ=self.has_seq, SOFTPLUS=bool(softplus))

    def boundaries(self, device):
        f32 = dict(device=device, dtype=torch.float32)
        X = torch.empty(self.batch, self.dim, self.nchunk + 1, self.N, **f32)
        dts = torch.empty(self.batch, self.dim, self.nchunk, **f32)
        flags = torch.empty(self.batch, self.nchunk, device=device, dtype=torch.int32) if self.has_seq else dts
        return X, dts, flags

    def carry(self, X, dts, flags, A, reverse: bool):
        """Boundary states across chunks, in place (see _carry_kernel); two levels past CARRY_SINGLE_MAX."""
        block_c = min(triton.next_power_of_2(self.dim), max(1, CARRY_TILE // self.block_n))
        common = dict(BLOCK_C=block_c, BLOCK_N=self.block_n, REVERSE=reverse, HAS_SEQ=self.has_seq)
        nd = triton.cdiv(self.dim, block_c)
        n_items = self.nchunk
        if n_items <= CARRY_SINGLE_MAX:
            _carry_kernel[(1, nd, self.batch)](X, dts, flags, A, X, dts, flags, self.dim, self.N, n_items, n_items,
                                               n_items, *A.stride(), MODE=0, **common)
            return
        group = math.isqrt(n_items - 1) + 1
        ns = triton.cdiv(n_items, group)
        S = torch.zeros(self.batch, self.dim, ns + 1, self.N, device=X.device, dtype=torch.float32)
        sdts = torch.empty(self.batch, self.dim, ns, device=X.device, dtype=torch.float32)
        sflags = torch.empty(self.batch, ns, device=X.device, dtype=torch.int32) if self.has_seq else sdts
        args = (self.dim, self.N, n_items, group, ns, *A.stride())
        _carry_kernel[(ns, nd, self.batch)](X, dts, flags, A, S, sdts, sflags, *args, MODE=1, **common)
        _carry_kernel[(1, nd, self.batch)](S, sdts, sflags, A, S, sdts, sflags, self.dim, self.N, ns, ns, ns,
                                           *A.stride(), MODE=0, **common)
        _carry_kernel[(ns, nd, self.batch)](X, dts, flags, A, S, sdts, sflags, *args, MODE=2, **common)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus):
    """Returns out (u's dtype) and the boundary states X (batch, dim, nchunk + 1, dstate) fp32 (saved for
    backward; X[:, :, -1] is the last state)."""
    p = _Problem(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus)
    out = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    X, dts, flags = p.boundaries(u.device)
    D_, z_, bias_, seq_ = p.opt
    for finish in (False, True):
        _fwd_chunk_kernel[p.grid](u, delta, A, B, C, D_, z_, bias_, seq_, X, dts, flags, out, *p.sizes, *p.strides,
                                  *out.stride(), *p.seq_strides, T=p.T, BLOCK_N=p.block_n, FINISH=finish,
                                  num_warps=_finish_warps(p.block_n, p.T) if finish else 4, **p.flags)
        if not finish:
            p.carry(X, dts, flags, A, reverse=False)
    return out, X


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus, X):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the dtypes of their inputs."""
    p = _Problem(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus)
    if dout.stride(-1) != 1:  # coalesced loads along time
        dout = dout.contiguous()
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty(u.shape, device=dev, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=dev, dtype=delta.dtype)
    dz = torch.empty(z.shape, device=dev, dtype=z.dtype) if z is not None else None
    parts = (p.batch, p.dim, p.nchunk)
    dA = torch.empty(*parts, p.N, **f32)
    var_shape = (p.batch, p.groups, p.N, p.L)
    dB = torch.zeros(var_shape, **f32) if B.dim() >= 3 else torch.empty(*parts, p.N, **f32)
    dC = torch.zeros(var_shape, **f32) if C.dim() >= 3 else torch.empty(*parts, p.N, **f32)
    dD = torch.empty(parts, **f32) if D is not None else dA
    dbias = torch.empty(parts, **f32) if delta_bias is not None else dA
    Y, dts, flags = p.boundaries(dev)
    D_, z_, bias_, seq_ = p.opt
    warps = _finish_warps(p.block_n, p.T)
    for finish in (False, True):
        _bwd_chunk_kernel[p.grid](
            u, delta, A, B, C, D_, z_, bias_, seq_, dout, X, Y, dts, flags, du, ddelta,
            dz if dz is not None else dA, dA, dB, dC, dD, dbias, *p.sizes, p.groups, *p.strides, *dout.stride(),
            *p.seq_strides, *du.stride(), *ddelta.stride(), *_strides3(dz),
            T=p.T, BLOCK_N=p.block_n, FINISH=finish, num_warps=warps if finish else 4, **p.flags)
        if not finish:
            p.carry(Y, dts, flags, A, reverse=True)

    def fixed_or_var(g, M):
        if M.dim() == 2:
            return g.sum((0, 2)).to(M.dtype)
        return (g if M.dim() == 4 else g[:, 0]).to(M.dtype)

    return (du, ddelta, dA.sum((0, 2)).to(A.dtype), fixed_or_var(dB, B), fixed_or_var(dC, C),
            dD.sum((0, 2)).to(D.dtype) if D is not None else None, dz,
            dbias.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None)


# ------------------------------------------------------------------ compile specifications

# pointers holding the inputs' dtype (the rest are fp32, or int32 for seq_idx and the reset flags)
_DATA_PTRS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
              "dz_ptr"}
# strides the launcher sees as 1 (contiguous time axis, A's state axis) and Triton specialises to constants
_UNIT_STRIDES = {"s_ul", "s_dl", "s_zl", "s_ol", "s_gl", "s_sl", "s_dul", "s_ddl", "s_dzl", "s_an"}
_ALL_ON = dict(VAR_B=True, VAR_C=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_SEQ=True, SOFTPLUS=True)
_ALL_OFF = dict(VAR_B=False, VAR_C=False, HAS_D=False, HAS_Z=False, HAS_BIAS=False, HAS_SEQ=False, SOFTPLUS=False)


def _signature(fn, dtype, constexprs, unit_strides):
    """Triton types as the launchers pass them: absent optional tensors are replaced by fp32 placeholders."""
    placeholders = set()
    if not constexprs.get("HAS_Z", True):
        placeholders |= {"z_ptr", "dz_ptr"}
    if not constexprs.get("HAS_SEQ", True):
        placeholders |= {"seq_ptr", "flags_ptr", "sflags_ptr"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs or name in unit_strides:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*fp32" if name in placeholders else "*" + dtype if name in _DATA_PTRS else
                         "*i32" if name in ("seq_ptr", "flags_ptr", "sflags_ptr") else "*fp32")
        else:
            sig[name] = "i32"
    return sig


def _spec(label, fn, dtype, constexprs, num_warps, unit_strides):
    consts = dict(constexprs, **{s: 1 for s in unit_strides if s in fn.arg_names})
    sig = _signature(fn, dtype, constexprs, unit_strides)
    aligned = [a for a, ty in sig.items() if ty.startswith("*")]
    aligned += [a for a in ("L", "DIM", "s_ub", "s_ud", "s_db", "s_dd", "s_zb", "s_zd", "s_ob", "s_od", "s_gb",
                            "s_gd", "s_dub", "s_dud", "s_ddb", "s_ddd", "s_dzb", "s_dzd") if sig.get(a) == "i32"]
    return dict(name=label, fn=fn, signature=sig, constexprs=consts, num_warps=num_warps, num_stages=1,
                divisible_by_16=aligned)


def compile_specs():
    """Every (kernel, block configuration) the launchers can pick, for the sm_90 resource check
    (kernels/compile_check.py). The block configuration is a function of dstate alone (BLOCK_N = next power
    of two in 1..256, T = chunk_size, warps): all nine are listed for each kernel, with the two feature sets
    that bracket register use (everything on with input-dependent B/C, everything off with fixed B/C), in
    bf16; fp16 and fp32 (which change only the loads' conversions) at dstate 16, Mamba's default.
    Time-axis strides are the constant 1 the launcher specialises for contiguous inputs."""
    specs = []
    for block_n in (1 << k for k in range(9)):
        T = chunk_size(block_n)
        dtypes = ("bf16", "fp16", "fp32") if block_n == 16 else ("bf16",)
        for dtype in dtypes:
            for feats_name, feats in (("all", _ALL_ON), ("none", _ALL_OFF)):
                unit = _UNIT_STRIDES | ({"s_b3", "s_c3"} if feats["VAR_B"] else set())
                for finish in (False, True):
                    const = dict(T=T, BLOCK_N=block_n, FINISH=finish, **feats)
                    stage = "finish" if finish else "summary"
                    warps = _finish_warps(block_n, T) if finish else 4
                    specs.append(_spec(f"scan_fwd_{stage} N{block_n} T{T} {dtype} {feats_name}", _fwd_chunk_kernel,
                                       dtype, const, warps, unit))
                    specs.append(_spec(f"scan_bwd_{stage} N{block_n} T{T} {dtype} {feats_name}", _bwd_chunk_kernel,
                                       dtype, const, warps, unit))
        block_c = max(1, CARRY_TILE // block_n)  # the launcher's choice for dim >= CARRY_TILE / BLOCK_N
        for mode in (0, 1, 2):
            for reverse in (False, True):
                for has_seq in (True, False):
                    const = dict(BLOCK_C=block_c, BLOCK_N=block_n, MODE=mode, REVERSE=reverse, HAS_SEQ=has_seq)
                    label = f"scan_carry mode{mode}{' rev' if reverse else ''}{' seq' if has_seq else ''} N{block_n}"
                    specs.append(_spec(label, _carry_kernel, "fp32", const, 4, {"s_an"}))
    return specs
