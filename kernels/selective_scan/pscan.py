"""Parallel scans of h_t = a_t * h_{t-1} + b_t (time along dim -2 of a, b: (..., S, N)).

- parallel_scan: Hillis-Steele doubling over (decay, input) pairs in linear space. log2(S) rounds, each a
  multiply and a fused multiply-add on whole tensors; no exp/log, no division, so decays of any sign
  (the bilinear discretisation gives negative ones) and zero decays are exact inputs. Each h_t is a tree
  of depth ceil(log2 S) of products and sums, so its rounding error grows like log2(S) * eps instead of
  the S * eps of a sequential loop. Differentiable by autograd (O(S log S) saved activations).
- log_space_scan: the log-space scan of seed 004 (Heinsen 2023, arXiv 2311.06281): h_t = exp(a*_t) *
  cumsum_s exp(log b_s - a*_s) with a*_t = cumsum log a, done by logcumsumexp. Kept to measure it: it
  needs a > 0, and adding a*_t (large, negative) to a log-sum of similar size cancels, so its relative
  error grows with |a*_t|, i.e. with the length (see seqtasks.pscan_precision).
Both match kernels.selective_scan.torch_scan.chunked_linear_scan(a, b, h0): all h_t, h0 (..., N) optional.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> None:
    if a.dim() < 2 or a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (..., S, N) with S >= 1, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[-2] < 1:
        raise ValueError(f"a must have a length S >= 1 along dim -2, got shape {tuple(a.shape)}")
    if h0 is not None and h0.shape != a.shape[:-2] + a.shape[-1:]:
        raise ValueError(f"h0 must have shape {tuple(a.shape[:-2] + a.shape[-1:])} (a without its time dim), "
                         f"got {tuple(h0.shape)}")


def _fold_h0(a, b, h0):
    if h0 is None:
        return b
    return torch.cat([torch.addcmul(b[..., :1, :], a[..., :1, :], h0.unsqueeze(-2)), b[..., 1:, :]], -2)


def parallel_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All h_t of h_t = a_t h_{t-1} + b_t, h_{-1} = h0 (zeros if None), in ceil(log2 S) doubling rounds."""
    _check(a, b, h0)
    h = _fold_h0(a, b, h0)
    S = a.shape[-2]
    shift = 1
    while shift < S:
        # position t now composes steps t-2*shift+1..t: (A, H) after (A', H') = (A A', A H' + H).
        # The shift is one pad that also crops (pad value: the identity step's h = 0, a = 1), not slices:
        # a slice's backward allocates and zero-fills a whole tensor, which made this 3x slower on CPU.
        h = torch.addcmul(h, a, F.pad(h, (0, 0, shift, -shift)))
        if 2 * shift < S:  # the last round's products are never read
            a = a * F.pad(a, (0, 0, shift, -shift), value=1.0)
        shift *= 2
    return h


def log_space_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The same recurrence in log space (seed 004's P-scan); a must be > 0. Signed b is split into its
    positive and negative parts, each scanned in log space (log 0 = -inf is exact in logcumsumexp)."""
    _check(a, b, h0)
    if not bool((a > 0).all()):
        raise ValueError("a must be > 0 everywhere for the log-space scan (use parallel_scan for other decays)")
    b = _fold_h0(a, b, h0)
    a_star = torch.cumsum(torch.log(a), dim=-2)

    def part(v):  # v >= 0
        return torch.exp(a_star + torch.logcumsumexp(torch.log(v) - a_star, dim=-2))

    return part(b.clamp(min=0)) - part((-b).clamp(min=0))


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The plain loop, one step at a time (the reference; run it in float64 for ground truth)."""
    _check(a, b, h0)
    h = torch.zeros_like(b[..., 0, :]) if h0 is None else h0.to(b.dtype)
    out = []
    for a_t, b_t in zip(a.unbind(-2), b.unbind(-2)):
        h = torch.addcmul(b_t, a_t, h)
        out.append(h)
    return torch.stack(out, -2)
