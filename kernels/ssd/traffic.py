"""Bytes each kernel of an SSD chain reads and writes, counted from shapes and dtypes (no GPU needed).

    ssd_traffic(8, 2048, 24, 64, 128, 1, 256, torch.bfloat16)            # ours (kernels/ssd/triton_ssd.py)
    ssd_traffic(..., impl="mamba_ssm")                                   # mamba_ssm's Triton chain

Rule, the same for both chains: every tensor a launch touches counts once at its full size (re-reads of the
same tile by other programs are assumed to hit L2); (heads,)-sized vectors, seq_idx and per-program partial
sums of a few KB are left out; torch ops between launches that move whole tensors count as launches.
Chunk states are (batch, heads, chunks, headdim, dstate); "scratch" vectors (dt after processing, the chunk
cumsum, d(cumsum) and friends) are fp32 of (batch, heads, chunks * chunk_size).

mamba_ssm's chain is read from state-spaces/mamba, mamba_ssm/ops/triton/: ssd_combined.py
(_mamba_chunk_scan_combined_fwd / _bwd: the order of launches, the dtypes they ask for, and the backward's
recomputation of dA_cumsum, C.B^T, chunk states and state passing before the gradient kernels),
ssd_chunk_state.py (_chunk_cumsum_fwd/_bwd, _chunk_state_fwd with states_in_fp32, _chunk_state_bwd_db with
its fp32 (batch, L, nsplits, groups, dstate) partials summed in torch), ssd_state_passing.py
(_state_passing_fwd, out_dtype=C.dtype in the forward and fp32 in the backward's recompute;
_state_passing_bwd writing dstates and states in x's dtype), ssd_bmm.py (_bmm_chunk_fwd, fp32 C.B^T of
(batch, chunks, groups, Q, Q); _bmm_chunk_bwd) and ssd_chunk_scan.py (_chunk_scan_fwd writing out and, with z,
out_x; _chunk_scan_bwd_dz, _chunk_scan_bwd_dstates, _chunk_scan_chunk_state_bwd_dx, _chunk_scan_bwd_dC and
_chunk_scan_bwd_dcb with nsplits fp32 partials, _chunk_scan_bwd_ddAcs_stable). nsplits follows their rule
cdiv(heads/groups, max(min(ceil(batch * chunks * heads / SMs), heads/groups), 1)) with 132 SMs (H100 SXM).
"""
from __future__ import annotations

import math

import torch

_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
H100_SMS = 132


def ssd_traffic(batch, seqlen, nheads, headdim, dstate, ngroups, chunk_size, dtype, has_z=True, has_D=True,
                impl="ours", sm_count=H100_SMS):
    """{"forward": [(kernel, read_bytes, write_bytes), ...], "backward": [...]} for one call of
    mamba_chunk_scan_combined with inputs of `dtype` (x, z, B, C, dt; fp32 A, D, dt_bias), gradients of every
    input, return_final_states and initial_states on (both chains write the fp32 final state either way)."""
    if impl not in ("ours", "mamba_ssm"):
        raise ValueError(f"impl must be 'ours' or 'mamba_ssm', got {impl!r}")
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of bf16, fp16, fp32 (torch dtype or name), got {dtype!r}")
    e = _BYTES[dtype]
    nc = math.ceil(seqlen / chunk_size)
    X = batch * seqlen * nheads * headdim * e  # x, z, out, dout, dx, dz, ...
    BC = batch * seqlen * ngroups * dstate * e  # B or C (or dB, dC in the input dtype)
    DT = batch * seqlen * nheads * e  # raw dt, ddt
    V32 = batch * nheads * nc * chunk_size * 4  # fp32 scratch per (head, step)
    ST = batch * nheads * nc * headdim * dstate  # elements of one set of chunk states
    FIN = batch * nheads * headdim * dstate * 4
    zx = X if has_z else 0
    if impl == "ours":
        from .triton_ssd import block_config
        J = chunk_size // block_config("chunk_bwd_dcs", headdim, dstate, {2: torch.bfloat16, 4: torch.float32}[e])["BT"]
        forward = [
            ("dt_cumsum_fwd", DT, 2 * V32),
            ("state_fwd (chunk states + passing)", X + BC + 2 * V32, ST * e + FIN),
            ("chunk_scan_fwd (+D, z, cast)", X + zx + 2 * BC + 2 * V32 + ST * e, X + zx),
        ]
        backward = ([("gate_bwd", 3 * X, 2 * X)] if has_z else []) + [
            ("state_bwd (dstates + passing, decay grads)", X + BC + V32 + ST * e, ST * e + FIN),
            ("chunk_bwd_dx", 2 * X + 2 * BC + 2 * V32 + ST * e, X + 2 * V32),
            ("chunk_bwd_db (group sum in program)", 2 * X + BC + 2 * V32 + ST * e, BC),
            ("chunk_bwd_dc (group sum in program)", 2 * X + BC + 2 * V32 + ST * e, BC),
            ("zero-fill dcs column partials", 0, J * V32),
            ("chunk_bwd_dcs", 2 * X + 2 * BC + 2 * V32 + ST * e, (1 + J) * V32),
            ("dt_bwd (reverse cumsum, dt, dA, dt_bias)", DT + (5 + J) * V32, DT),
        ]
        return {"forward": forward, "backward": backward}
    ratio = nheads // ngroups
    nsplits = math.ceil(ratio / max(min(math.ceil(batch * nc * nheads / sm_count), ratio), 1))
    CB32 = batch * nc * ngroups * chunk_size * chunk_size * 4
    G32 = batch * seqlen * ngroups * dstate * 4  # fp32 dB / dC
    recompute_and_forward = [
        ("_chunk_cumsum_fwd", DT, 2 * V32),
        ("_chunk_state_fwd (fp32 states)", X + BC + 2 * V32, ST * 4),
    ]
    forward = recompute_and_forward + [
        ("_state_passing_fwd (states in C's dtype)", ST * 4, ST * e + FIN),
        ("_bmm_chunk_fwd (fp32 C.B^T)", 2 * BC, CB32),
        ("_chunk_scan_fwd (+D, z, out_x)", CB32 + X + zx + 2 * V32 + BC + ST * e, X + zx),
    ]
    backward = recompute_and_forward + [
        ("_state_passing_fwd (recompute, fp32)", ST * 4, ST * 4 + FIN),
        ("_bmm_chunk_fwd (recompute)", 2 * BC, CB32),
    ]
    if has_z:
        backward.append(("_chunk_scan_bwd_dz", (3 + has_D) * X, 2 * X))  # z, out_x, dout, x (for D)
    backward += [
        ("_chunk_scan_bwd_dstates (fp32)", BC + V32 + X, ST * 4),
        ("_state_passing_bwd", 2 * ST * 4, 2 * ST * e + FIN),
        ("_chunk_scan_chunk_state_bwd_dx", 2 * X + CB32 + ST * e + BC + 2 * V32, X + V32),
        ("_chunk_state_bwd_db (nsplits fp32)", X + ST * e + BC + 2 * V32, nsplits * G32 + V32),
        ("dB.sum(splits)", nsplits * G32, G32),
        ("_chunk_scan_bwd_dC (nsplits fp32)", ST * e + X + BC + V32, nsplits * G32 + V32),
        ("dC.sum(splits)", nsplits * G32, G32),
        ("_chunk_scan_bwd_dcb (nsplits fp32)", 2 * X + 2 * V32, nsplits * CB32),
        ("dcb.sum(splits)", nsplits * CB32, CB32),
        ("_bmm_chunk_bwd -> dB", BC + CB32 + G32, BC),
        ("_bmm_chunk_bwd -> dC", BC + CB32 + G32, BC),
        ("ddA_prev flip-cumsum-flip", 3 * V32, 3 * V32),
        ("_chunk_scan_bwd_ddAcs_stable", 2 * X + 2 * V32 + CB32, V32),
        ("ddA += ddA_next + ddA_prev", 3 * V32, V32),
        ("_chunk_cumsum_bwd", 2 * V32 + DT, DT),
    ]
    return {"forward": forward, "backward": backward}


def traffic_totals(traffic: dict) -> dict:
    """{"forward": bytes read + written, "backward": ...}."""
    return {k: sum(r + w for _, r, w in rows) for k, rows in traffic.items()}
