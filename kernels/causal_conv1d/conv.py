"""Depthwise causal conv1d (causal-conv1d's API), with packed-document resets and decoding updates.

Numerics follow causal-conv1d's CUDA kernels: x, weight, bias (and the conv state) are read into fp32 (float64
when any of them is float64), the taps are summed and SiLU is applied there, and the output is rounded once to
x's dtype; gradients are computed in the same precision (autograd through the up-cast) and rounded once to each
input's dtype. The convolution is a sum of `width` shifted multiply-adds (width <= 8 passes over memory): no
cuDNN call, so no TF32 can creep into the fp32 arithmetic on a GPU.

Beyond causal-conv1d (documented supersets): float64 inputs; weight, bias, initial_states and conv_state of any
float dtype (causal-conv1d wants bias/weight alike and the states in x's dtype); seq_idx int32 or int64 in any
layout, also together with return_final_states; width up to 8 for every dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, check, check_tensor

ACTIVATIONS = (None, "silu", "swish")
INDEX_DTYPES = (torch.int32, torch.int64)


def compute_dtype(*tensors) -> torch.dtype:
    """fp32, or float64 when any given tensor is float64 (the precision causal-conv1d reads everything in)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_weight_bias_activation(weight, bias, activation, dim, device):
    check_tensor("weight", weight, (dim, None), FLOAT_DTYPES, device)
    width = weight.shape[1]
    check(1 <= width <= 8, f"weight must have width 1..8 (dim, width), got width={width}")
    check_tensor("bias", bias, (dim,), FLOAT_DTYPES, device, optional=True)
    check(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return width


def _validate(x, weight, bias, seq_idx, initial_states, activation):
    check_tensor("x", x, (None, None, None), FLOAT_DTYPES)
    batch, dim, L = x.shape
    check(dim >= 1 and L >= 1, f"x must be (batch, dim, L) with dim >= 1 and L >= 1, got {tuple(x.shape)}")
    width = _check_weight_bias_activation(weight, bias, activation, dim, x.device)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, (batch, L), INDEX_DTYPES, x.device)
        check(initial_states is None, "initial_states and seq_idx cannot be combined (as in causal-conv1d)")
    check_tensor("initial_states", initial_states, (batch, dim, width - 1), FLOAT_DTYPES, x.device, optional=True)
    return width


def _conv_taps(window, weight, bias, activation, L, seq_idx=None):
    """out[t] = bias + sum_k weight[:, k] * window[t + k], for t < L, in window's dtype; window holds the width - 1
    inputs before x then x. With seq_idx a tap reading another document reads 0."""
    width = weight.shape[1]
    w = weight.to(window.dtype)
    out = w[:, width - 1, None] * window[..., width - 1:width - 1 + L]
    for s in range(1, width):  # tap reading x[t - s]
        tap = window[..., width - 1 - s:width - 1 - s + L]
        if seq_idx is not None:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, s:] = seq_idx[:, s:] == seq_idx[:, :-s]
            # a select, not a multiply by 0: a NaN or Inf in one document must not reach the next
            tap = torch.where(same[:, None, :], tap, 0)
        out = out + w[:, width - 1 - s, None] * tap
    if bias is not None:
        out = out + bias.to(window.dtype)[:, None]
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x: (batch, dim, L); weight: (dim, width); bias: (dim,); seq_idx: (batch, L) int (a tap never reads another
    document; positions with seq_idx < 0 are padding: their output is 0, as in causal-conv1d);
    initial_states: (batch, dim, width - 1), the inputs before x; activation None, "silu" or "swish".
    out[t] = sum_k weight[:, k] * x[t - (width - 1) + k] (+ bias), in fp32, rounded once to x's dtype.
    Returns out, and the final states (batch, dim, width - 1) in x's dtype if return_final_states (written into
    final_states_out when given)."""
    width = _validate(x, weight, bias, seq_idx, initial_states, activation)
    batch, dim, L = x.shape
    if return_final_states and final_states_out is not None:  # ignored otherwise, as in causal-conv1d
        check_tensor("final_states_out", final_states_out, (batch, dim, width - 1), FLOAT_DTYPES, x.device)
    cdtype = compute_dtype(x, weight, bias, initial_states)
    pad = initial_states if initial_states is not None else x.new_zeros(batch, dim, width - 1)
    window = torch.cat([pad.to(cdtype), x.to(cdtype)], dim=-1)
    out = _conv_taps(window, weight, bias, activation, L, seq_idx)
    if seq_idx is not None:
        out = torch.where(seq_idx[:, None, :] >= 0, out, 0)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    final = torch.cat([pad.to(x.dtype), x], dim=-1)[..., L:]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """Plain reference: F.conv1d with padding width - 1 and the right end cut off."""
    width = weight.shape[1]
    xin = x if initial_states is None else torch.cat([initial_states, x], -1)
    out = F.conv1d(xin, weight.unsqueeze(1), bias, padding=width - 1 if initial_states is None else 0,
                   groups=x.shape[1])[..., :x.shape[-1]]
    out = F.silu(out) if activation in ("silu", "swish") else out
    if return_final_states:
        full = torch.cat([x.new_zeros(*x.shape[:2], width - 1) if initial_states is None else initial_states, x], -1)
        return out, full[..., -(width - 1):]
    return out


def check_cache_lines(name, lines, num_lines):
    """lines: (batch,) int cache-line indices (conv_state_indices, state_batch_indices); negatives are padding
    rows; the others must be distinct lines < num_lines. Reads the values: one device sync."""
    used = lines[lines >= 0]
    check(used.numel() == 0 or int(used.max()) < num_lines,
          f"{name} must be < the number of cache lines ({num_lines}) (negative = padding row), "
          f"got max {int(used.max()) if used.numel() else None}")
    check(used.unique().numel() == used.numel(), f"{name} must not repeat a cache line (negatives excepted)")


def _validate_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    check_tensor("x", x, (None, None, None), FLOAT_DTYPES)
    batch, dim, seqlen = x.shape
    check(dim >= 1 and seqlen >= 1, f"x must hold at least one channel and one step, got {tuple(x.shape)}")
    check_tensor("conv_state", conv_state, (None, dim, None), FLOAT_DTYPES, x.device)
    if conv_state_indices is None:
        check(conv_state.shape[0] == batch, f"conv_state must have shape ({batch}, {dim}, *) (x's batch) without "
                                            f"conv_state_indices, got {tuple(conv_state.shape)}")
    else:
        check_tensor("conv_state_indices", conv_state_indices, (batch,), INDEX_DTYPES, x.device)
        check_cache_lines("conv_state_indices", conv_state_indices, conv_state.shape[0])
    width = _check_weight_bias_activation(weight, bias, activation, dim, x.device)
    state_len = conv_state.shape[-1]
    check(state_len >= max(width - 1, 1), f"conv_state must hold at least width - 1 = {width - 1} steps "
                                          f"(and 1), got {state_len}")
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, (batch,), INDEX_DTYPES, x.device)
        check(bool((cache_seqlens >= 0).all()), "cache_seqlens must be >= 0")
    return width


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decoding: x (batch, dim) or (batch, dim, seqlen) new inputs; conv_state (lines, dim, state_len), with
    state_len >= width - 1, holds the latest inputs and is updated in place. Returns out shaped like x.

    cache_seqlens (batch,) int >= 0: conv_state is a circular buffer; the width - 1 inputs before x are read at
    (cache_seqlens - (width - 1) + i) % state_len and x[..., t] is written at (cache_seqlens + t) % state_len (the
    caller advances cache_seqlens). Without it the buffer shifts left by seqlen.
    conv_state_indices (batch,) int: row b uses conv_state[conv_state_indices[b]] (continuous batching; lines
    may outnumber rows); a negative index marks a padding row: its output is 0 and no state is read or written.
    Without it conv_state has one line per row. The tap sums are in fp32 (see the module docstring).
    With conv_state_indices (and cache_seqlens) the values are checked on the host: one device sync."""
    squeeze = isinstance(x, torch.Tensor) and x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    width = _validate_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    if conv_state_indices is None:
        out = _update_lines(x, conv_state, weight, bias, activation, cache_seqlens, width)
    else:
        rows = (conv_state_indices >= 0).nonzero().squeeze(1)
        lines = conv_state_indices[rows].long()
        states = conv_state[lines]  # a copy, written back below
        out = x.new_zeros(x.shape)
        out[rows] = _update_lines(x[rows], states, weight, bias, activation,
                                  None if cache_seqlens is None else cache_seqlens[rows], width)
        conv_state.index_copy_(0, lines, states)
    return out.squeeze(-1) if squeeze else out


def _update_lines(x, state, weight, bias, activation, cache_seqlens, width):
    """causal_conv1d_update for one state line per row of x; updates `state` in place."""
    batch, dim, seqlen = x.shape
    state_len = state.shape[-1]
    cdtype = compute_dtype(x, weight, bias, state)
    if cache_seqlens is None:
        window = torch.cat([state[..., state_len - (width - 1):].to(cdtype), x.to(cdtype)], -1)  # a new tensor
        state.copy_(torch.cat([state, x.to(state.dtype)], dim=-1)[..., seqlen:])
    else:
        start = cache_seqlens.long()[:, None]
        read = (start - (width - 1) + torch.arange(width - 1, device=x.device)) % state_len
        history = state.gather(2, read[:, None, :].expand(batch, dim, width - 1))
        window = torch.cat([history.to(cdtype), x.to(cdtype)], -1)
        # only the last state_len inputs survive a longer x: writing just those keeps the positions distinct
        kept = min(seqlen, state_len)
        write = (start + torch.arange(seqlen - kept, seqlen, device=x.device)) % state_len
        state.scatter_(2, write[:, None, :].expand(batch, dim, kept), x[..., seqlen - kept:].to(state.dtype))
    return _conv_taps(window, weight, bias, activation, seqlen).to(x.dtype)
