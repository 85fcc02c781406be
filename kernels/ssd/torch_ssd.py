"""Chunked SSD in PyTorch (the CPU path, and the GPU fallback): per chunk of Q = chunk_size steps, the output
is a masked C.B^T matmul against dt*x plus the carried state read through C; chunk states pass sequentially
between chunks.

- `ssd_torch` (the "torch" backend): dt's processing, D and z in autograd around the core
  torch_ssd_fast.SSDCore, an autograd.Function with a hand-written backward that walks the sequence in
  blocks of chunks (temporaries of ~BLOCK_BYTES, reused; memory saved for backward: the inputs plus one
  state per chunk). See torch_ssd_fast.py for the formulas.
- `_ssd_torch_autograd`: the same formulation with autograd doing the gradients, kept as the independent
  reference the tests compare the hand-written backward against (in float64).
- chunk_size is honoured as given (any positive int): it is the chunk length Q. Results do not depend on
  it beyond rounding; the inter-chunk loop has L / Q steps.
- Decays inside a chunk are segment sums exp(dA_{s+1} + ... + dA_t), never exp(cs_t - cs_s) of two long
  float32 cumsums, which cancels digits: _ssd_torch_autograd sums the masked (Q, Q) expansion of dA; the
  fast core takes cs in float64 and differences its float32 hi + lo parts.
- Heads are laid out as (groups, heads per group) so B and C broadcast over a group's heads without copies.

Packed documents (seq_idx, contiguous runs of one id per document): C_t.B_s terms and decays between
documents are masked to -inf before exp (so no inf * 0); a chunk's end state only collects tokens of the
document it ends in; the carried state is dropped with a select (torch.where, not a multiply by 0) where
a document starts, and the incoming state reaches only tokens of its own document through a select too.
So a NaN/inf carried in one document's state never reaches the next one (both paths; the fast core's
backward drops the state gradient at a document start with a select too). Limit: inside one chunk the
masked (Q, Q) matmul still adds 0 * x_s for other documents' tokens, so a non-finite *input* x reaches
the other document's outputs in that same chunk (as in mamba_ssm's kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import process_dt
from .torch_ssd_fast import ssd_core


def _segsum(dA: torch.Tensor) -> torch.Tensor:
    """dA (..., Q) -> (..., Q, Q) with [t, s] = dA[s+1] + ... + dA[t] for s <= t (0 on the diagonal);
    entries above the diagonal are left finite and must be masked by the caller."""
    Q = dA.shape[-1]
    strictly_lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=dA.device), diagonal=-1)
    expanded = dA[..., :, None].expand(*dA.shape, Q).masked_fill(~strictly_lower, 0.0)  # [k, s] = dA_k if k > s
    return torch.cumsum(expanded, dim=-2)


def ssd_epilogue(y_core, xw, D, z, out_dtype):
    """The ops after the SSD core, in autograd: + D x, * silu(z), cast to out_dtype. xw: x in the work dtype
    (same length as y_core)."""
    if D is not None:
        Dw = D.to(xw.dtype)
        y_core = y_core + (Dw[:, None] if Dw.dim() == 1 else Dw) * xw
    if z is not None:
        y_core = y_core * F.silu(z.to(xw.dtype))
    return y_core.to(out_dtype)


def _ssd_torch_autograd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q = min(chunk_size, L)  # a chunk longer than the sequence only adds padding
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, L, H)
    xw, Bw, Cw = x.to(work), B.to(work), C.to(work)
    pad = (-L) % Q
    seq = seq_idx
    if pad:  # identity steps: dt = 0 means no decay and no input
        xw = F.pad(xw, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bw = F.pad(Bw, (0, 0, 0, 0, 0, pad))
        Cw = F.pad(Cw, (0, 0, 0, 0, 0, pad))
        if seq is not None:
            seq = torch.cat([seq, seq[:, -1:].expand(batch, pad)], 1)
    nc = (L + pad) // Q
    # layout (batch, chunk, group, head-in-group, step, ...): every product below is a batched matmul
    xc = xw.view(batch, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (b, nc, G, R, Q, P)
    dtc = dt.view(batch, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # (b, nc, G, R, Q)
    Bc = Bw.view(batch, nc, Q, G, N).transpose(2, 3)  # (b, nc, G, Q, N)
    Cc = Cw.view(batch, nc, Q, G, N).transpose(2, 3)
    dA = dtc * A.to(work).view(G, R, 1)
    xdt = xc * dtc[..., None]
    cs = torch.cumsum(dA, dim=-1)  # decay from the chunk start to step t: a segment sum from the start
    seg = _segsum(dA)  # (b, nc, G, R, Q, Q)

    mask = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    if seq is not None:
        sc = seq.view(batch, nc, Q)
        mask = mask & (sc[:, :, :, None] == sc[:, :, None, :])[:, :, None, None]  # (b, nc, 1, 1, Q, Q)
        seq_end = sc[:, :, -1]  # document each chunk ends in
        seq_in = torch.cat([seq[:, :1], seq_end[:, :-1]], 1)  # document of the state entering each chunk
    # 1. inside each chunk: y_t += sum_{s<=t} (C_t . B_s) exp(segsum[t, s]) dt_s x_s
    decay = torch.exp(seg.masked_fill(~mask, -torch.inf))
    CB = Cc @ Bc.transpose(-1, -2)  # (b, nc, G, Q, Q)
    y = (CB[:, :, :, None] * decay) @ xdt  # (b, nc, G, R, Q, P)
    # 2. each chunk's own contribution to its end state: the decay to the chunk end is the segsum's last
    # row (already 0 for tokens of other documents than the last one)
    w_end = decay[..., -1, :]  # (b, nc, G, R, Q)
    states = (xdt * w_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, nc, G, R, P, N)
    # 3. pass states between chunks
    chunk_decay = torch.exp(cs[..., -1])[..., None, None]  # (b, nc, G, R, 1, 1)
    h = (initial_states.to(work).view(batch, G, R, P, N) if initial_states is not None
         else xw.new_zeros(batch, G, R, P, N))
    incoming = []
    if seq is None:
        for decay_c, state_c in zip(chunk_decay.unbind(1), states.unbind(1)):
            incoming.append(h)
            h = torch.addcmul(state_c, decay_c, h)
    else:
        carried = (seq_end == seq_in)[:, :, None, None, None, None]  # (b, nc, 1, 1, 1, 1)
        for decay_c, state_c, keep_c in zip(chunk_decay.unbind(1), states.unbind(1), carried.unbind(1)):
            incoming.append(h)
            h = torch.addcmul(state_c, decay_c, torch.where(keep_c, h, 0.0))  # select first: backward stays finite
    h_in = torch.stack(incoming, 1)  # (b, nc, G, R, P, N)
    # 4. the incoming state, decayed to each step and read through C
    y_in = (Cc[:, :, :, None] @ h_in.transpose(-1, -2)) * torch.exp(cs)[..., None]
    if seq is not None:  # only tokens of the incoming state's document see it
        y_in = torch.where((sc == seq_in[..., None])[:, :, None, None, :, None], y_in, 0.0)
    y = (y + y_in).permute(0, 1, 4, 2, 3, 5)  # (b, nc, Q, G, R, P)
    y = ssd_epilogue(y.reshape(batch, nc * Q, H, P)[:, :L], xw[:, :L], D, z, x.dtype)
    if return_final_states:
        return y, h.reshape(batch, H, P, N)
    return y


def ssd_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """Same arguments and results as _ssd_torch_autograd; the core runs as torch_ssd_fast.SSDCore (blocks of
    chunks, hand-written backward); dt's processing, D and z stay in autograd."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = x.shape[1]
    Q = min(chunk_size, L)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    xw = x.to(work)
    h0 = initial_states.to(work) if initial_states is not None else None
    y, h = ssd_core(xw, dt, A.to(work), B.to(work), C.to(work), h0, seq_idx, Q, return_final_states)
    y = ssd_epilogue(y, xw, D, z, x.dtype)
    if return_final_states:
        return y, h
    return y
