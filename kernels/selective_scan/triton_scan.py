"""Triton selective scan (Mamba-1), forward and backward.

One program per (batch, block of BLOCK_D channels); the state (BLOCK_D, N) lives in registers and the
program walks time sequentially (any L). Forward fuses delta_bias + softplus, discretisation, the scan,
the C contraction, the D skip and the silu(z) gate, and stores the state at the start of every CHUNK
steps. Backward walks chunks from last to first: it recomputes the chunk's states from the stored one
into a per-program scratch buffer (BLOCK_D x CHUNK x N floats, independent of L), then runs the adjoint
recurrence backwards through the chunk. Memory therefore grows as batch*dim*N*L/CHUNK, not *L.

Input-dependent B/C gradients are summed over the channels of a block in registers, then added with
one atomic per (group, n, t); a block never spans two groups (BLOCK_D divides dim/groups, or groups == 1).
Per-channel parameter gradients (A, D, delta_bias, fixed B/C) are written per batch row and summed in
torch, so they are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _load_params(A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, d, n, dm, nm, s_ad, s_an, s_bn, s_bl, s_cn, s_cl,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel parameters (absent ones as zeros): A, D, delta_bias, and fixed B/C."""
    m2 = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * s_ad + n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    Bf = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    Cf = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if not VAR_B:
        Bf = tl.load(B_ptr + d[:, None] * s_bn + n[None, :] * s_bl, mask=m2, other=0.0).to(tl.float32)
    if not VAR_C:
        Cf = tl.load(C_ptr + d[:, None] * s_cn + n[None, :] * s_cl, mask=m2, other=0.0).to(tl.float32)
    return A, Dv, bias, Bf, Cf


@triton.jit
def _step_inputs(u_base, dl_base, B_base, seq_ptr, t, pid_b, s_ul, s_dl, s_bl, s_sb, s_sl, dm, nm, A, bias, Bf,
                 VAR_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Step t: u, delta (+ bias, before softplus), dt, the decay exp(dt A) (0 where a document starts), B_t."""
    u = tl.load(u_base + t * s_ul, mask=dm, other=0.0).to(tl.float32)
    dt_raw = tl.load(dl_base + t * s_dl, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw = dt_raw + bias
    dt = dt_raw
    if SOFTPLUS:
        dt = _softplus(dt_raw)
    dA = tl.exp(dt[:, None] * A)
    if HAS_SEQ:
        cur = tl.load(seq_ptr + pid_b * s_sb + t * s_sl)
        prv = tl.load(seq_ptr + pid_b * s_sb + tl.maximum(t - 1, 0) * s_sl)
        dA = tl.where((t > 0) & (cur != prv), 0.0, dA)
    if VAR_B:
        Bt = tl.load(B_base + t * s_bl, mask=nm, other=0.0).to(tl.float32)[None, :]
    else:
        Bt = Bf
    return u, dt_raw, dt, dA, Bt


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, out_ptr, states_ptr, last_ptr,
    DIM, L, DSTATE, DG, NCHUNKS,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_sb, s_sl,
    s_stb, s_std, s_stc, s_stn,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < DIM
    nm = n < DSTATE
    m2 = dm[:, None] & nm[None, :]
    group = (pid_d * BLOCK_D) // DG
    A, Dv, bias, Bf, Cf = _load_params(A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, d, n, dm, nm, s_ad, s_an, s_bn, s_bl,
                                       s_cn, s_cl, BLOCK_D, BLOCK_N, VAR_B, VAR_C, HAS_D, HAS_BIAS)
    u_base = u_ptr + pid_b * s_ub + d * s_ud
    dl_base = delta_ptr + pid_b * s_db + d * s_dd
    B_base = B_ptr + pid_b * s_bb + group * s_bg + n * s_bn
    C_base = C_ptr + pid_b * s_cb + group * s_cg + n * s_cn
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, NCHUNKS):
        tl.store(states_ptr + pid_b * s_stb + d[:, None] * s_std + c * s_stc + n[None, :] * s_stn, h, mask=m2)
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        for t in range(t0, t1):
            u, dt_raw, dt, dA, Bt = _step_inputs(u_base, dl_base, B_base, seq_ptr, t, pid_b, s_ul, s_dl, s_bl, s_sb, s_sl,
                                                 dm, nm, A, bias, Bf, VAR_B, HAS_BIAS, HAS_SEQ, SOFTPLUS)
            if VAR_C:
                Ct = tl.load(C_base + t * s_cl, mask=nm, other=0.0).to(tl.float32)[None, :]
            else:
                Ct = Cf
            h = dA * h + (dt * u)[:, None] * Bt
            y = tl.sum(h * Ct, axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zv = tl.load(z_ptr + pid_b * s_zb + d * s_zd + t * s_zl, mask=dm, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + pid_b * s_ob + d * s_od + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=dm)
    tl.store(last_ptr + pid_b * DIM * DSTATE + d[:, None] * DSTATE + n[None, :], h, mask=m2)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, dout_ptr, states_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    DIM, L, DSTATE, DG, NCHUNKS, NBLK_D,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
    s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_sb, s_sl,
    s_stb, s_std, s_stc, s_stn,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < DIM
    nm = n < DSTATE
    m2 = dm[:, None] & nm[None, :]
    group = (pid_d * BLOCK_D) // DG
    A, Dv, bias, Bf, Cf = _load_params(A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, d, n, dm, nm, s_ad, s_an, s_bn, s_bl,
                                       s_cn, s_cl, BLOCK_D, BLOCK_N, VAR_B, VAR_C, HAS_D, HAS_BIAS)
    u_base = u_ptr + pid_b * s_ub + d * s_ud
    dl_base = delta_ptr + pid_b * s_db + d * s_dd
    B_base = B_ptr + pid_b * s_bb + group * s_bg + n * s_bn
    C_base = C_ptr + pid_b * s_cb + group * s_cg + n * s_cn
    # dB/dC for input-dependent B/C: fp32 buffers of shape (batch, G, N, L), contiguous
    dB_base = dB_ptr + (pid_b * (DIM // DG) + group) * DSTATE * L + n * L
    dC_base = dC_ptr + (pid_b * (DIM // DG) + group) * DSTATE * L + n * L
    scratch = scratch_ptr + (pid_b * NBLK_D + pid_d) * CHUNK * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dA_{t+1} * (adjoint of h_{t+1})
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dBf_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dCf_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for ci in range(0, NCHUNKS):
        c = NCHUNKS - 1 - ci
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        h_start = tl.load(states_ptr + pid_b * s_stb + d[:, None] * s_std + c * s_stc + n[None, :] * s_stn,
                          mask=m2, other=0.0)
        # 1. recompute this chunk's states into scratch
        h = h_start
        for t in range(t0, t1):
            u, dt_raw, dt, dA, Bt = _step_inputs(u_base, dl_base, B_base, seq_ptr, t, pid_b, s_ul, s_dl, s_bl, s_sb, s_sl,
                                                 dm, nm, A, bias, Bf, VAR_B, HAS_BIAS, HAS_SEQ, SOFTPLUS)
            h = dA * h + (dt * u)[:, None] * Bt
            tl.store(scratch + (t - t0) * BLOCK_D * BLOCK_N, h)
        # 2. adjoint, backwards through the chunk
        for tt in range(0, t1 - t0):
            t = t1 - 1 - tt
            u, dt_raw, dt, dA, Bt = _step_inputs(u_base, dl_base, B_base, seq_ptr, t, pid_b, s_ul, s_dl, s_bl, s_sb, s_sl,
                                                 dm, nm, A, bias, Bf, VAR_B, HAS_BIAS, HAS_SEQ, SOFTPLUS)
            if VAR_C:
                Ct = tl.load(C_base + t * s_cl, mask=nm, other=0.0).to(tl.float32)[None, :]
            else:
                Ct = Cf
            h = tl.load(scratch + (t - t0) * BLOCK_D * BLOCK_N)
            h_prev = tl.where(t > t0, tl.load(scratch + (tl.maximum(t - 1, t0) - t0) * BLOCK_D * BLOCK_N), h_start)
            dy = tl.load(dout_ptr + pid_b * s_ob + d * s_od + t * s_ol, mask=dm, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_ptr + pid_b * s_zb + d * s_zd + t * s_zl, mask=dm, other=0.0).to(tl.float32)
                sz = tl.sigmoid(zv)
                y = tl.sum(h * Ct, axis=1)
                if HAS_D:
                    y += Dv * u
                dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + pid_b * s_zb + d * s_zd + t * s_zl, dz.to(dz_ptr.dtype.element_ty), mask=dm)
                dy = dy * zv * sz
            g = Ct * dy[:, None] + g_next  # adjoint of h_t
            g = tl.where(m2, g, 0.0)
            if VAR_C:
                tl.atomic_add(dC_base + t, tl.sum(h * dy[:, None], axis=0), mask=nm)
            else:
                dCf_acc += h * dy[:, None]
            if VAR_B:
                tl.atomic_add(dB_base + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=nm)
            else:
                dBf_acc += g * (dt * u)[:, None]
            decay_term = g * dA * h_prev
            dA_acc += decay_term * dt[:, None]
            ddt = tl.sum(g * Bt * u[:, None] + decay_term * A, axis=1)
            du = dt * tl.sum(g * Bt, axis=1)
            if HAS_D:
                du += Dv * dy
                dD_acc += dy * u
            if SOFTPLUS:
                ddt = tl.where(dt_raw <= 20.0, ddt * tl.sigmoid(dt_raw), ddt)
            dbias_acc += ddt
            tl.store(du_ptr + pid_b * s_ub + d * s_ud + t * s_ul, du.to(du_ptr.dtype.element_ty), mask=dm)
            tl.store(ddelta_ptr + pid_b * s_db + d * s_dd + t * s_dl, ddt.to(ddelta_ptr.dtype.element_ty), mask=dm)
            g_next = dA * g
    # per-batch partial sums of per-channel gradients (summed over batch in torch)
    pp = pid_b * DIM * DSTATE + d[:, None] * DSTATE + n[None, :]
    tl.store(dA_ptr + pp, dA_acc, mask=m2)
    if not VAR_B:
        tl.store(dB_ptr + pp, dBf_acc, mask=m2)
    if not VAR_C:
        tl.store(dC_ptr + pp, dCf_acc, mask=m2)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DIM + d, dD_acc, mask=dm)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DIM + d, dbias_acc, mask=dm)


def _block_d(dim: int, dg: int, groups: int, dstate: int) -> int:
    cap = max(1, min(32, 2048 // triton.next_power_of_2(dstate)))
    if groups == 1:
        return min(cap, triton.next_power_of_2(dim))
    b = 1
    while b * 2 <= cap and dg % (b * 2) == 0:  # a block must not span two groups
        b *= 2
    return b


def _matrix_strides(M, dim):
    """(batch, group, n, l) strides for B/C; fixed (dim, N) uses (n=dim stride, l=n stride) slots."""
    if M.dim() == 2:
        return 0, 0, M.stride(0), M.stride(1)
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _common(u, delta, A, B, C, D, z, delta_bias, seq_idx):
    batch, dim, L = u.shape
    dstate = A.shape[1]
    groups = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    dg = dim // groups
    block_d = _block_d(dim, dg, groups, dstate)
    block_n = triton.next_power_of_2(dstate)
    nchunks = triton.cdiv(L, CHUNK)
    zs = (z.stride(0), z.stride(1), z.stride(2)) if z is not None else (0, 0, 0)
    ss = (seq_idx.stride(0), seq_idx.stride(1)) if seq_idx is not None else (0, 0)
    flags = dict(VAR_B=B.dim() >= 3, VAR_C=C.dim() >= 3, HAS_D=D is not None, HAS_Z=z is not None,
                 HAS_BIAS=delta_bias is not None, HAS_SEQ=seq_idx is not None)
    strides = (u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
               A.stride(0), A.stride(1), *_matrix_strides(B, dim), *_matrix_strides(C, dim), *zs)
    return batch, dim, L, dstate, groups, dg, block_d, block_n, nchunks, strides, ss, flags


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus):
    batch, dim, L, dstate, groups, dg, block_d, block_n, nchunks, strides, ss, flags = _common(
        u, delta, A, B, C, D, z, delta_bias, seq_idx)
    out = torch.empty_like(u)
    states = torch.empty(batch, dim, nchunks, dstate, device=u.device, dtype=torch.float32)
    last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    dummy = u  # placeholder pointer for absent optional tensors (never read: constexpr flags)
    grid = (batch, triton.cdiv(dim, block_d))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
        out, states, last, dim, L, dstate, dg, nchunks, *strides,
        out.stride(0), out.stride(1), out.stride(2), *ss, *states.stride(),
        CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, SOFTPLUS=softplus, **flags)
    return out, states, last


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus, states):
    batch, dim, L, dstate, groups, dg, block_d, block_n, nchunks, strides, ss, flags = _common(
        u, delta, A, B, C, D, z, delta_bias, seq_idx)
    dout = dout.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    f32 = dict(device=u.device, dtype=torch.float32)
    dA = torch.empty(batch, dim, dstate, **f32)
    dB = torch.zeros(batch, groups, dstate, L, **f32) if B.dim() >= 3 else torch.empty(batch, dim, dstate, **f32)
    dC = torch.zeros(batch, groups, dstate, L, **f32) if C.dim() >= 3 else torch.empty(batch, dim, dstate, **f32)
    dD = torch.empty(batch, dim, **f32) if D is not None else None
    dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
    nblk = triton.cdiv(dim, block_d)
    scratch = torch.empty(batch * nblk * CHUNK * block_d * block_n, **f32)
    dummy = dA
    _selective_scan_bwd_kernel[(batch, nblk)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy,
        dout, states, scratch, du, ddelta, dz if dz is not None else dummy, dA, dB, dC,
        dD if dD is not None else dummy, dbias if dbias is not None else dummy,
        dim, L, dstate, dg, nchunks, nblk, *strides,
        dout.stride(0), dout.stride(1), dout.stride(2), *ss, *states.stride(),
        CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, SOFTPLUS=softplus, **flags)
    if B.dim() >= 3:
        dB = dB if B.dim() == 4 else dB[:, 0]
    else:
        dB = dB.sum(0)
    if C.dim() >= 3:
        dC = dC if C.dim() == 4 else dC[:, 0]
    else:
        dC = dC.sum(0)
    return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if dD is not None else None, dz,
            dbias.sum(0) if dbias is not None else None)
