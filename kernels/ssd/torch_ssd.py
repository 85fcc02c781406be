"""Chunked SSD in PyTorch (the CPU path): per chunk of Q steps, the output is a masked C.B^T matmul
against dt*x plus the carried state read through C; chunk states pass sequentially between chunks.
Autograd gives the gradients.

Decays are exp of differences of a cumsum inside one chunk (at most Q terms) and one document, never a
long cumsum minus another, so precision does not degrade with L and documents do not leak rounding. Heads are laid out as (groups, heads per group) so B and
C broadcast over a group's heads without copies. Memory is O(batch * L * heads * Q), so the internal
chunk is min(chunk_size, 64): the chunking is an implementation detail, the result does not depend on it.

Packed documents (seq_idx): C_t.B_s terms and decays between different documents are masked; a chunk's
end state only collects tokens of the document that chunk ends in; the incoming state reaches only tokens
of the document it belongs to (the initial state belongs to the first document of each row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import process_dt

MAX_TORCH_CHUNK = 64


def ssd_torch(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
              dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    Q = min(chunk_size, MAX_TORCH_CHUNK)
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

    mask = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    if seq is None:
        cs = torch.cumsum(dA, dim=-1)  # within each chunk
    else:
        sc = seq.view(batch, nc, Q)
        mask = mask & (sc[:, :, None, :, None] == sc[:, :, None, None, :])[:, :, None]  # (b, nc, 1, 1, Q, Q)
        # cumsum restarted at every document start (a masked matmul), so a decay never subtracts two sums
        # that contain another document's dt: isolation holds exactly, not only up to rounding
        cs = (mask.to(work) @ dA[..., None]).squeeze(-1)
        seq_end = sc[:, :, -1]  # document each chunk ends in
        seq_in = torch.cat([seq[:, :1], seq_end[:, :-1]], 1)  # document of the state entering each chunk
    # 1. inside each chunk: y_t += sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s
    decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~mask, -torch.inf))  # (b, nc, G, R, Q, Q)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, nc, G, Q, Q)
    y = (CB[:, :, :, None] * decay) @ xdt  # (b, nc, G, R, Q, P)
    # 2. each chunk's own contribution to its end state
    # other documents are masked inside the exponent: their per-document cumsums can make the difference
    # large and positive, and exp would overflow to inf (inf * 0 = NaN)
    end_gap = cs[..., -1:] - cs
    if seq is not None:
        end_gap = end_gap.masked_fill((sc != seq_end[..., None])[:, :, None, None, :], -torch.inf)
    w_end = torch.exp(end_gap)
    states = (xdt * w_end[..., None]).transpose(-1, -2) @ Bc[:, :, :, None]  # (b, nc, G, R, P, N)
    # 3. pass states between chunks
    chunk_decay = torch.exp(cs[..., -1])  # (b, nc, G, R)
    if seq is not None:
        chunk_decay = chunk_decay * (seq_end == seq_in)[..., None, None]
    h = (initial_states.to(work).view(batch, G, R, P, N) if initial_states is not None
         else xw.new_zeros(batch, G, R, P, N))
    incoming = []
    for c in range(nc):
        incoming.append(h)
        h = chunk_decay[:, c, ..., None, None] * h + states[:, c]
    h_in = torch.stack(incoming, 1)  # (b, nc, G, R, P, N)
    # 4. the incoming state, decayed to each step and read through C
    w_in = torch.exp(cs if seq is None else cs.masked_fill((sc != seq_in[..., None])[:, :, None, None, :], -torch.inf))
    y = y + (Cc[:, :, :, None] @ h_in.transpose(-1, -2)) * w_in[..., None]
    y = y.permute(0, 1, 4, 2, 3, 5)  # (b, nc, Q, G, R, P)
    y = y.reshape(batch, nc * Q, H, P)[:, :L]
    if D is not None:
        Dw = D.to(work)
        y = y + (Dw[:, None] if Dw.dim() == 1 else Dw) * xw[:, :L]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(x.dtype)
    if return_final_states:
        return y, h.reshape(batch, H, P, N).to(torch.float64 if work == torch.float64 else torch.float32)
    return y
