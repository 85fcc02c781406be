"""Depthwise causal conv1d (causal-conv1d's API), with packed-document resets and decoding updates.

Without seq_idx it is one grouped F.conv1d over the left-padded input (cuDNN / oneDNN do the work).
With seq_idx it is a sum of `width` shifted multiply-adds, each tap masked where it would read an
earlier document: width <= 4 passes over memory, and autograd gives the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, check, check_tensor

ACTIVATIONS = (None, "silu", "swish")


def _validate(x, weight, bias, seq_idx, initial_states, activation):
    check_tensor("x", x, (None, None, None), FLOAT_DTYPES)
    batch, dim, L = x.shape
    check(dim >= 1 and L >= 1, f"x must be (batch, dim, L) with dim >= 1 and L >= 1, got {tuple(x.shape)}")
    check_tensor("weight", weight, (dim, None), FLOAT_DTYPES, x.device)
    width = weight.shape[1]
    check(1 <= width <= 8, f"weight must have width 1..8 (dim, width), got width={width}")
    check_tensor("bias", bias, (dim,), FLOAT_DTYPES, x.device, optional=True)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, (batch, L), (torch.int32, torch.int64), x.device)
        check(initial_states is None, "initial_states and seq_idx cannot be combined (as in causal-conv1d)")
    check_tensor("initial_states", initial_states, (batch, dim, width - 1), FLOAT_DTYPES, x.device, optional=True)
    check(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return width


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """x: (batch, dim, L); weight: (dim, width); bias: (dim,); seq_idx: (batch, L) int (a tap never reads an
    earlier document); initial_states: (batch, dim, width - 1), the inputs before x; activation None or "silu".
    out[t] = sum_k weight[:, k] * x[t - (width - 1) + k] (+ bias). Returns out, and the final states
    (batch, dim, width - 1) if return_final_states (written into final_states_out when given)."""
    width = _validate(x, weight, bias, seq_idx, initial_states, activation)
    batch, dim, L = x.shape
    pad = initial_states.to(x.dtype) if initial_states is not None else x.new_zeros(batch, dim, width - 1)
    xp = torch.cat([pad, x], dim=-1)
    w = weight.to(x.dtype)
    if seq_idx is None:
        out = F.conv1d(xp, w.unsqueeze(1), bias.to(x.dtype) if bias is not None else None, groups=dim)
    else:
        out = w[:, width - 1, None] * x
        for s in range(1, width):  # tap reading x[t - s]
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, s:] = seq_idx[:, s:] == seq_idx[:, :-s]
            # a select, not a multiply by 0: a NaN or Inf in one document must not reach the next
            tap = torch.where(same[:, None, :], xp[..., width - 1 - s: width - 1 - s + L], 0)
            out = out + w[:, width - 1 - s, None] * tap
        if bias is not None:
            out = out + bias.to(x.dtype)[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if not return_final_states:
        return out
    final = xp[..., xp.shape[-1] - (width - 1):]
    if final_states_out is not None:
        check_tensor("final_states_out", final_states_out, (batch, dim, width - 1), None, x.device)
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


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Decoding: x (batch, dim) or (batch, dim, seqlen) new inputs; conv_state (batch, dim, state_len) with
    state_len >= width - 1 holds the latest inputs and is updated in place. Returns out shaped like x."""
    check_tensor("conv_state", conv_state, (None, None, None), FLOAT_DTYPES)
    batch, dim, state_len = conv_state.shape
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    check_tensor("x", x, (batch, dim, None), FLOAT_DTYPES, conv_state.device)
    check(dim >= 1 and x.shape[-1] >= 1, f"x must hold at least one channel and one step, got {tuple(x.shape)}")
    check_tensor("weight", weight, (dim, None), FLOAT_DTYPES, x.device)
    width = weight.shape[1]
    check(1 <= width <= 8, f"weight must have width 1..8 (dim, width), got width={width}")
    check(state_len >= width - 1, f"conv_state must hold at least width - 1 = {width - 1} steps, got {state_len}")
    check_tensor("bias", bias, (dim,), FLOAT_DTYPES, x.device, optional=True)
    check(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    seqlen = x.shape[-1]
    full = torch.cat([conv_state.to(x.dtype), x], -1)
    window = full[..., state_len - (width - 1):]
    out = F.conv1d(window, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype) if bias is not None else None, groups=dim)
    if activation in ("silu", "swish"):
        out = F.silu(out)
    conv_state.copy_(full[..., seqlen:])
    return out.squeeze(-1) if squeeze else out
