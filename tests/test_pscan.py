"""kernels.selective_scan.pscan: the parallel scans against a float64 sequential loop."""
import math

import pytest
import torch

from kernels.selective_scan.pscan import log_space_scan, parallel_scan, sequential_scan

LENGTHS = [1, 2, 3, 7, 16, 33, 100, 257]


def inputs(S, dtype, positive_decay=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    # decays in (0.5, 1): long memory, so errors made early are carried to the end (the hard case)
    a = 0.5 + 0.5 * torch.rand(3, S, 4, generator=g, dtype=torch.float64)
    if not positive_decay:  # the bilinear discretisation can give decays in (-1, 0)
        a = a * torch.where(torch.rand(3, S, 4, generator=g) < 0.3, -1.0, 1.0).double()
    b = torch.randn(3, S, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), h0.to(dtype)


def error_bound(a, b, h0, rounds, dtype):
    """A first-order rounding bound: each h_t is a tree of `rounds` fused multiply-adds, each with relative
    error <= eps, applied to terms whose magnitudes sum to at most the scan of |a|, |b|, |h0|; x4 slack
    for the products of decays accumulated on the way (each also rounded once per round)."""
    scale = sequential_scan(a.abs().double(), b.abs().double(), h0.abs().double())
    return 4 * (rounds + 1) * torch.finfo(dtype).eps * scale + torch.finfo(dtype).tiny


@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("positive_decay", [True, False])
def test_parallel_scan_float32_matches_float64_loop(S, positive_decay):
    a, b, h0 = inputs(S, torch.float32, positive_decay)
    got = parallel_scan(a, b, h0).double()
    ref = sequential_scan(a.double(), b.double(), h0.double())
    bound = error_bound(a, b, h0, math.ceil(math.log2(S)) if S > 1 else 0, torch.float32)
    assert ((got - ref).abs() <= bound).all(), f"max error {(got - ref).abs().max():.3g}, bound {bound.min():.3g}"


@pytest.mark.parametrize("S", [1, 5, 64, 129])
def test_parallel_scan_float64_exact_and_without_h0(S):
    a, b, _ = inputs(S, torch.float64, seed=1)
    torch.testing.assert_close(parallel_scan(a, b), sequential_scan(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("S", [1, 6, 33])
def test_parallel_scan_gradients_match_loop(S):
    """Gradients of a weighted sum of all states with respect to a, b and h0, float32 vs the float64 loop.
    The backward is autograd through the same log2(S) rounds; tolerance 1e-5 relative: the gradient sums
    are O(S) terms of size <= 1 each, with float32 eps 1.2e-7 times a few dozen operations per path."""
    a, b, h0 = inputs(S, torch.float64, positive_decay=False, seed=2)
    w = torch.randn(a.shape, dtype=torch.float64)
    grads = {}
    for name, fn, dtype in (("ref", sequential_scan, torch.float64), ("par", parallel_scan, torch.float32)):
        xs = [t.to(dtype).detach().requires_grad_() for t in (a, b, h0)]
        (fn(*xs) * w.to(dtype)).sum().backward()
        grads[name] = [x.grad.double() for x in xs]
    for ref, got in zip(grads["ref"], grads["par"]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("S", [1, 9, 64])
def test_log_space_scan_matches_loop_in_float64(S):
    a, b, h0 = inputs(S, torch.float64, seed=3)
    torch.testing.assert_close(log_space_scan(a, b, h0), sequential_scan(a, b, h0), rtol=1e-9, atol=1e-9)


def test_log_space_error_grows_faster_than_parallel():
    """The reason parallel_scan exists: at 4096 steps with decays near 1 in float32 the log-space scan
    (seed 004's) is at least 5x further from the float64 loop than the linear-space doubling scan."""
    g = torch.Generator().manual_seed(4)
    a = (1 - 0.01 * torch.rand(2, 4096, 8, generator=g, dtype=torch.float64))
    b = torch.randn(2, 4096, 8, generator=g, dtype=torch.float64)
    ref = sequential_scan(a, b)
    err = {fn.__name__: (fn(a.float(), b.float()).double() - ref).abs().max().item()
           for fn in (parallel_scan, log_space_scan)}
    assert err["log_space_scan"] > 5 * err["parallel_scan"], err


def test_bad_inputs_raise():
    a = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="same shape"):
        parallel_scan(a, torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="h0 must have shape"):
        parallel_scan(a, a, torch.rand(2, 5))
    with pytest.raises(ValueError, match="a must be > 0"):
        log_space_scan(-a, a)
    with pytest.raises(ValueError, match="S >= 1"):
        parallel_scan(torch.rand(2, 0, 3), torch.rand(2, 0, 3))
