"""A non-finite value in one packed document must not reach the next one, on every CPU backend.

The state reset at a document border has to be a select: multiplying the old state by an exact 0 keeps a
NaN (0 * NaN = NaN). Each case puts a NaN in document 0 and compares document 1 with a run on document 1
alone (same backend), which must be finite and equal up to fp32 rounding of a different summation order.
For the SSD the border sits on a chunk border: inside one chunk the matmul form multiplies a NaN input by
an exact zero weight (mamba_ssm's kernels do the same), so isolation of non-finite values is promised
across chunk borders only (README, Kernels).
"""
import pytest
import torch

import kernels

BORDER, L = 5, 12
SEQ = torch.tensor([[0] * BORDER + [1] * (L - BORDER)], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_scan_nan_stays_in_its_document(backend):
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 4, L, generator=g), torch.rand(1, 4, L, generator=g)
    A = -torch.rand(4, 3, generator=g) - 0.1
    B, C = torch.randn(1, 3, L, generator=g), torch.randn(1, 3, L, generator=g)
    poisoned = u.clone()
    poisoned[0, :, 2] = float("nan")
    y = kernels.selective_scan_fn(poisoned, delta, A, B, C, seq_idx=SEQ, backend=backend)
    alone = kernels.selective_scan_fn(u[..., BORDER:], delta[..., BORDER:], A, B[..., BORDER:], C[..., BORDER:],
                                      backend=backend)
    assert torch.isnan(y[..., :BORDER]).any()  # the NaN is really there
    torch.testing.assert_close(y[..., BORDER:], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_ssd_nan_stays_in_its_document(backend):
    chunk, Ls = 64, 64 + 9
    seq = torch.tensor([[0] * chunk + [1] * (Ls - chunk)], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    x, dt = torch.randn(1, Ls, 2, 4, generator=g), torch.rand(1, Ls, 2, generator=g)
    A = -torch.rand(2, generator=g) - 0.1
    B, C = torch.randn(1, Ls, 1, 3, generator=g), torch.randn(1, Ls, 1, 3, generator=g)
    poisoned = x.clone()
    poisoned[0, 2] = float("nan")
    y = kernels.mamba_chunk_scan_combined(poisoned, dt, A, B, C, chunk_size=chunk, seq_idx=seq, backend=backend)
    alone = kernels.mamba_chunk_scan_combined(x[:, chunk:], dt[:, chunk:], A, B[:, chunk:], C[:, chunk:],
                                              chunk_size=chunk, backend=backend)
    assert torch.isnan(y[:, :chunk]).any()
    torch.testing.assert_close(y[:, chunk:], alone, rtol=1e-5, atol=1e-6)
