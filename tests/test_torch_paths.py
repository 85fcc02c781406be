"""The pure-PyTorch (CPU) paths, backend="torch": the chunked SSD (kernels/ssd/torch_ssd.py) and the
chunked selective scan (kernels/selective_scan/torch_scan.py), against float64 oracles written here (one
time step per loop step), forward and every gradient, at edge shapes; packed documents (NaN isolation);
the SSD backward's memory growing linearly in L.

Tolerances: the fp32 paths are compared with the float64 oracle by norm-relative error. fp32 rounding is
6e-8 per operation; sums run over at most ~100 terms here and the decays are products/exps of segment
sums inside one chunk (never differences of long cumsums), so errors land near 1e-7; 2e-5 leaves margin for
the gradients of A and dt_bias (sums over every step and channel) and still fails any wrong term (a
wrong term is an O(1) error). The float64 runs of the same paths must agree to 1e-10.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.selective_scan.torch_scan as torch_scan
from helpers import rel
from kernels import mamba_chunk_scan_combined, selective_scan_fn
from kernels.ssd.torch_ssd import ssd_torch

FP32_TOL = 2e-5
FP64_TOL = 1e-10


def documents(batch, L, starts):
    seq = torch.zeros(batch, L, dtype=torch.int32)
    for s in starts:
        seq[:, s:] += 1
    return seq


def value_and_grads(fn, inputs, weight):
    """fn(**inputs) and the gradients of sum(out * weight) for every floating input."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None and v.is_floating_point() else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    diff = [v for v in leaves.values() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, diff, weight.to(out.dtype))
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    return out.detach(), dict(zip(names, grads))


def assert_matches_oracle(fn, oracle, inputs, tol):
    weight = torch.randn(oracle(**{k: (v.double() if v is not None and v.is_floating_point() else v)
                                   for k, v in inputs.items()}).shape, generator=torch.Generator().manual_seed(7))
    out, grads = value_and_grads(fn, inputs, weight)
    ref_out, ref_grads = value_and_grads(
        oracle, {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()},
        weight.double())
    assert rel(out, ref_out) < tol, f"output: {rel(out, ref_out):.2e}"
    for k, g in ref_grads.items():
        assert rel(grads[k], g) < tol, f"d{k}: {rel(grads[k], g):.2e}"


# ------------------------------------------------------------------ SSD

def ssd_oracle(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, softplus=True):
    """Float64 recurrence, one step at a time: h = exp(dt A) h + dt x B^T (reset at a new document),
    y = h C + D x, out = y * silu(z)."""
    batch, L, H, P = x.shape
    R = H // B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    Bh, Ch = B.repeat_interleave(R, 2), C.repeat_interleave(R, 2)
    h = initial_states if initial_states is not None else x.new_zeros(batch, H, P, B.shape[-1])
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    return y * F.silu(z) if z is not None else y


def ssd_case(batch, L, H, P, N, G, D="hp", z=True, bias=True, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(batch, L, H, P), dt=r(batch, L, H) * 0.7, A=-(torch.rand(H, generator=g) * 1.5 + 0.1),
                B=r(batch, L, G, N), C=r(batch, L, G, N), D={"hp": r(H, P), "h": r(H), None: None}[D],
                z=r(batch, L, H, P) if z else None, dt_bias=r(H) * 0.5 if bias else None,
                initial_states=r(batch, H, P, N) if h0 else None)


def ssd_fn(chunk, seq_idx=None):
    return lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=chunk, seq_idx=seq_idx, dt_softplus=True,
                                                  backend="torch")


SSD_CASES = [  # (batch, L, heads, headdim, dstate, groups, chunk, options, document starts)
    (1, 1, 2, 3, 4, 1, 16, {}, ()),  # L = 1
    (2, 37, 4, 3, 5, 2, 8, {}, ()),  # L not a multiple of the chunk, 2 groups
    (1, 20, 4, 2, 3, 4, 64, {"D": "h", "h0": False}, ()),  # chunk longer than L, groups = heads
    (2, 33, 2, 3, 4, 1, 1, {"z": False, "bias": False}, ()),  # chunk 1
    (1, 45, 4, 2, 3, 2, 16, {}, (5, 16, 17, 40)),  # documents crossing chunk borders, one of length 1
    (2, 24, 2, 2, 3, 1, 8, {"h0": False}, (8, 16)),  # documents starting exactly at chunk borders
]


@pytest.mark.parametrize("case", SSD_CASES)
def test_ssd_torch_against_float64_recurrence(case):
    batch, L, H, P, N, G, chunk, opts, starts = case
    inp = ssd_case(batch, L, H, P, N, G, **opts)
    seq = documents(batch, L, starts) if starts else None
    oracle = lambda **kw: ssd_oracle(**kw, seq_idx=seq)  # noqa: E731
    assert_matches_oracle(ssd_fn(chunk, seq), oracle, inp, FP32_TOL)
    assert_matches_oracle(ssd_fn(chunk, seq), oracle, {k: (v.double() if v is not None else v) for k, v in inp.items()},
                          FP64_TOL)


def test_ssd_torch_final_states_and_chunk_independence():
    inp = ssd_case(2, 29, 4, 3, 5, 2, D=None, z=False)
    seq = documents(2, 29, (11,))
    outs = [mamba_chunk_scan_combined(**inp, chunk_size=c, seq_idx=seq, dt_softplus=True, return_final_states=True,
                                      backend="torch") for c in (1, 4, 7, 29, 64)]
    h = inp["initial_states"].double()  # the final state of the last document, by the recurrence
    dt = F.softplus(inp["dt"].double() + inp["dt_bias"].double())
    for t in range(11, 29):
        h = (torch.exp(dt[:, t] * inp["A"].double())[..., None, None] * (h if t > 11 else 0)
             + (dt[:, t, :, None] * inp["x"][:, t].double())[..., None]
             * inp["B"].double().repeat_interleave(2, 2)[:, t, :, None, :])
    for y, final in outs:
        assert rel(final, h) < FP32_TOL
        assert rel(y, outs[0][0]) < FP32_TOL


def test_ssd_torch_nan_in_one_document_stays_there():
    """A NaN in document 0 (chunk 0) reaches document 1 (starting mid chunk 1) only through the carried
    state, which a select drops: document 1's outputs stay finite, and so do the gradients of its tokens
    in chunks holding no token of document 0 (inside a shared chunk the masked (Q, Q) matmul mixes
    0 * NaN into the backward; see torch_ssd.py)."""
    Q, L, boundary = 8, 32, 12
    inp = ssd_case(1, L, 2, 3, 4, 1, h0=False)
    inp["x"][0, 3, 1, 2] = float("nan")
    seq = documents(1, L, (boundary,))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    out = ssd_fn(Q, seq)(**leaves)
    assert torch.isnan(out[:, :boundary]).any()
    assert torch.isfinite(out[:, boundary:]).all()
    out[:, boundary:].sum().backward()
    later = (boundary // Q + 1) * Q  # first chunk after the shared one
    for k in ("x", "dt", "B", "C", "z"):
        assert torch.isfinite(leaves[k].grad[:, later:]).all(), k


def ssd_backward_allocated_bytes(L, Q=4):
    inp = ssd_case(1, L, 2, 16, 16, 1, D=None, z=False, bias=False, h0=False)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    loss = ssd_torch(**leaves, chunk_size=Q).square().sum()
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_ssd_torch_backward_memory_is_linear_in_length():
    """Bytes allocated during backward for 4x the chunks: ~4x when linear. Indexing states[:, c] per chunk
    inside autograd made it ~13x at these sizes (each index's backward allocates a states-sized zero
    tensor), which this test catches; wall time is not used (the machine is shared)."""
    ratio = ssd_backward_allocated_bytes(256) / ssd_backward_allocated_bytes(64)
    assert ratio < 6, ratio


# ------------------------------------------------------------------ selective scan

def scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, seq_idx=None):
    """Float64 Mamba-1 recurrence with softplus: h = exp(dt A) h + dt u B, y = C.h + D u, out = y silu(z)."""
    batch, dim, L = u.shape
    dt = F.softplus(delta + delta_bias[:, None]) if delta_bias is not None else F.softplus(delta)

    def per_step(M, t):  # -> (b|1, dim, N)
        if M.dim() == 2:
            return M[None]
        M = M[..., t]
        return M[:, None] if M.dim() == 2 else M.repeat_interleave(dim // M.shape[1], 1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        decay = torch.exp(dt[..., t, None] * A)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None]
        h = decay * h + (dt[..., t] * u[..., t])[..., None] * per_step(B, t)
        ys.append((h * per_step(C, t)).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def scan_case(batch, dim, L, N, layout, G=1, D=True, z=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shape = {"fixed": (dim, N), "shared": (batch, N, L), "groups": (batch, G, N, L)}[layout]
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-(torch.rand(dim, N, generator=g) + 0.5),
                B=r(*shape), C=r(*shape), D=r(dim) if D else None, z=r(batch, dim, L) if z else None,
                delta_bias=0.5 * r(dim) if bias else None)


def scan_fn(seq_idx=None):
    return lambda **kw: selective_scan_fn(**kw, delta_softplus=True, seq_idx=seq_idx, backend="torch")


SCAN_CASES = [  # (batch, dim, L, N, B/C layout, groups, options, document starts, (segment, backward) budgets)
    (1, 4, 1, 3, "shared", 1, {}, (), None),  # L = 1
    (2, 6, 23, 4, "groups", 3, {}, (), None),  # L not a square: leftover steps after the sub-chunks
    (2, 4, 17, 3, "fixed", 1, {"z": False, "D": False}, (), None),  # B, C fixed per channel
    (1, 8, 30, 2, "groups", 2, {}, (1, 9, 10, 25), None),  # documents, one of length 1
    (2, 4, 41, 3, "shared", 1, {}, (7, 20), (4 * 4 * 3 * 2, None)),  # many segments: state grads carried
    (1, 4, 26, 2, "fixed", 1, {"bias": False}, (13,), (4 * 2 * 5, None)),
    (2, 6, 50, 3, "groups", 2, {}, (20,), (2 * 6 * 3 * 17, 2 * 6 * 3 * 5)),  # backward pieces inside segments
]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_torch_against_float64_recurrence(case, monkeypatch):
    batch, dim, L, N, layout, G, opts, starts, budget = case
    for name, value in zip(("SEGMENT_BUDGET", "BACKWARD_BUDGET"), budget or ()):
        if value:
            monkeypatch.setattr(torch_scan, name, value)
    inp = scan_case(batch, dim, L, N, layout, G, **opts)
    seq = documents(batch, L, starts) if starts else None
    oracle = lambda **kw: scan_oracle(**kw, seq_idx=seq)  # noqa: E731
    assert_matches_oracle(scan_fn(seq), oracle, inp, FP32_TOL)
    assert_matches_oracle(scan_fn(seq), oracle, {k: (v.double() if v is not None else v) for k, v in inp.items()},
                          FP64_TOL)


@pytest.mark.parametrize("budget", [None, "SEGMENT_BUDGET", "BACKWARD_BUDGET"])
def test_scan_torch_nan_in_one_document_stays_there(budget, monkeypatch):
    """The reset is a select in the forward and in the hand-written backward: a NaN input in document 0
    leaves document 1's outputs and every gradient of document 1's tokens finite."""
    if budget:  # segments / backward pieces of 6 steps
        monkeypatch.setattr(torch_scan, budget, 4 * 6 * 3)
    L, boundary = 37, 15
    inp = scan_case(1, 4, L, 3, "groups", G=2)
    inp["u"][0, 1, 4] = float("nan")
    seq = documents(1, L, (boundary,))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    out = scan_fn(seq)(**leaves)
    assert torch.isnan(out[..., :boundary]).any()
    assert torch.isfinite(out[..., boundary:]).all()
    out[..., boundary:].sum().backward()
    for k in ("u", "delta", "B", "C", "z"):
        assert torch.isfinite(leaves[k].grad[..., boundary:]).all(), k
