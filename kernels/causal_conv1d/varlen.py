"""causal_conv1d_varlen_states (causal-conv1d's causal_conv1d_varlen module): the conv states at the end of each
packed sequence, to start decoding after a packed prefill."""
from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES, check, check_tensor
from .conv import INDEX_DTYPES


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """x: (total_tokens, dim) packed sequences; cu_seqlens: (num_seqs + 1,) int, non-decreasing, the sequence
    boundaries (sequence i is x[cu_seqlens[i]:cu_seqlens[i + 1]]); state_len: int >= 1.
    Returns states (num_seqs, dim, state_len) in x's dtype: the last state_len inputs of each sequence, right
    aligned, zeros on the left of a shorter sequence (never another sequence's inputs). Like causal-conv1d the
    result is a (num_seqs, state_len, dim) tensor transposed (channel-last strides). Forward only: no gradient.
    The boundaries are checked on the host (one device sync)."""
    check_tensor("x", x, (None, None), FLOAT_DTYPES)
    check(x.shape[0] >= 1 and x.shape[1] >= 1, f"x must be (total_tokens, dim), both >= 1, got {tuple(x.shape)}")
    check_tensor("cu_seqlens", cu_seqlens, (None,), INDEX_DTYPES, x.device)
    check(cu_seqlens.numel() >= 1, "cu_seqlens must hold at least one boundary (num_seqs + 1 values)")
    check(isinstance(state_len, int) and not isinstance(state_len, bool) and state_len >= 1,
          f"state_len must be an int >= 1, got {state_len!r}")
    check(bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all()), "cu_seqlens must be non-decreasing")
    check(int(cu_seqlens[0]) >= 0 and int(cu_seqlens[-1]) <= x.shape[0],
          f"cu_seqlens must lie in [0, total_tokens={x.shape[0]}], got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    bounds = cu_seqlens.long()
    # token read into slot j of sequence i: end_i - state_len + j, kept when it is not before start_i
    tokens = bounds[1:, None] - state_len + torch.arange(state_len, device=x.device)
    inside = tokens >= bounds[:-1, None]
    with torch.no_grad():
        states = torch.where(inside[..., None], x[tokens.clamp(min=0)], 0)  # (num_seqs, state_len, dim)
    return states.transpose(1, 2)
