"""The CPU fast paths of the torch selective scan (kernels/selective_scan/torch_scan.py): pieces whose start
states the forward saves, the in-place chunked scan `_linear_scan_` in both of its forms (one step per op for
short pieces, sqrt(S) sub-chunks otherwise), exp as exp2, against float64 loops written here; forward and
every gradient, several pieces, packed documents, NaN isolation.

Tolerance: norm-relative error vs float64 2e-5 for fp32 (errors land near 1e-7; a wrong term is O(1)),
1e-10 for the float64 runs of the same code.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.selective_scan.torch_scan as torch_scan
from helpers import rel
from kernels import selective_scan_fn

FP32_TOL = 2e-5
FP64_TOL = 1e-10


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, seq_idx=None):
    """Float64, one step at a time. B, C: (dim, N), (batch, N, L) or (batch, G, N, L)."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, L = u.shape
    dt = F.softplus(delta + (delta_bias.double()[:, None] if delta_bias is not None else 0))

    def at(M, t):  # (batch, dim, N) matrix of step t
        M = M.double()
        if M.dim() == 2:
            return M.expand(batch, dim, M.shape[1])
        if M.dim() == 3:
            return M[:, None, :, t].expand(batch, dim, M.shape[1])
        return M[..., t].repeat_interleave(dim // M.shape[1], dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            h = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None], 0.0, h)
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    return y * F.silu(z.double()) if z is not None else y


def case(batch, dim, L, N, layout, G=1, opts=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    BC = {"fixed": (dim, N), "shared": (batch, N, L), "groups": (batch, G, N, L)}[layout]
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-(torch.rand(dim, N, generator=g) + 0.5),
                B=r(*BC), C=r(*BC), D=r(dim) if opts else None, z=r(batch, dim, L) if opts else None,
                delta_bias=0.5 * r(dim) if opts else None)


def check(inputs, seq_idx, tol):
    fn = lambda **kw: selective_scan_fn(**kw, delta_softplus=True, seq_idx=seq_idx, backend="torch")  # noqa: E731
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    ref_leaves = {k: v.double().requires_grad_() for k, v in leaves.items()}
    out = fn(**leaves)
    ref = oracle(**ref_leaves, seq_idx=seq_idx)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), w.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), w)
    assert rel(out, ref) < tol, f"out {rel(out, ref):.1e}"
    for k, a, b in zip(leaves, grads, ref_grads):
        assert rel(a, b) < tol, f"d{k} {rel(a, b):.1e}"


CASES = [  # batch, dim, L, N, B/C layout, groups, D/z/bias, document starts
    (1, 4, 1, 3, "shared", 1, True, ()),
    (2, 6, 23, 4, "groups", 3, True, (5, 6)),
    (2, 4, 37, 3, "fixed", 1, False, ()),
    (1, 8, 50, 2, "groups", 2, True, (1, 9, 10, 33)),
    (2, 4, 41, 5, "shared", 1, True, (20,)),
]


@pytest.mark.parametrize("scan_form", ["sequential", "sub-chunks"])
@pytest.mark.parametrize("pieces", ["one", "many"])
@pytest.mark.parametrize("c", CASES)
def test_scan_pieces_and_scan_forms_against_float64(c, pieces, scan_form, monkeypatch):
    batch, dim, L, N, layout, G, opts, starts = c
    monkeypatch.setattr(torch_scan, "SEQUENTIAL_STEPS", 1000 if scan_form == "sequential" else 0)
    if pieces == "many":  # pieces of 7 steps (one leftover step past sqrt(7)^2 = 4 in the sub-chunk form)
        monkeypatch.setattr(torch_scan, "MIN_PIECE_STEPS", 1)
        monkeypatch.setattr(torch_scan, "BACKWARD_BUDGET", batch * dim * N * 7)
    seq = None
    if starts:
        seq = torch.zeros(batch, L, dtype=torch.int64)
        for s in starts:
            seq[:, s:] += 1
    inputs = case(batch, dim, L, N, layout, G, opts)
    check(inputs, seq, FP32_TOL)
    check({k: (v.double() if v is not None else None) for k, v in inputs.items()}, seq, FP64_TOL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("sequential", [0, 1000])
@pytest.mark.parametrize("S", [1, 2, 9, 26])
def test_linear_scan_in_place_both_forms(S, sequential, reverse, monkeypatch):
    """x_t <- a_t x_prev + x_t from h0, with resets (selects), on a strided a (shifted by one step, as the
    backward passes it), against a loop."""
    monkeypatch.setattr(torch_scan, "SEQUENTIAL_STEPS", sequential)
    g = torch.Generator().manual_seed(S)
    a_full = torch.rand(3, S + 1, 4, generator=g, dtype=torch.float64)
    a = a_full[:, 1:]
    x = torch.randn(3, S, 4, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    keep = torch.rand(3, S, generator=g) > 0.3
    for k in (None, keep):
        want, h = x.clone(), h0
        for t in (range(S - 1, -1, -1) if reverse else range(S)):
            carried = a[:, t] * h if k is None else torch.where(k[:, t, None], a[:, t] * h, 0.0)
            want[:, t] += carried
            h = want[:, t]
        got = torch_scan._linear_scan_(a, x.clone(), h0, k, reverse=reverse)
        assert rel(got, want) < 1e-12


@pytest.mark.parametrize("sequential", [0, 1000])
def test_nan_stays_in_its_document_across_pieces(sequential, monkeypatch):
    monkeypatch.setattr(torch_scan, "SEQUENTIAL_STEPS", sequential)
    monkeypatch.setattr(torch_scan, "MIN_PIECE_STEPS", 1)
    monkeypatch.setattr(torch_scan, "BACKWARD_BUDGET", 4 * 3 * 6)  # pieces of 6 steps
    L, boundary = 37, 15
    inputs = {k: v.clone().requires_grad_() for k, v in case(1, 4, L, 3, "groups", 2).items()}
    with torch.no_grad():
        inputs["u"][0, 1, 4] = float("nan")
    seq = torch.zeros(1, L, dtype=torch.int32)
    seq[:, boundary:] = 1
    out = selective_scan_fn(**inputs, delta_softplus=True, seq_idx=seq, backend="torch")
    assert torch.isnan(out[..., :boundary]).any() and torch.isfinite(out[..., boundary:]).all()
    out[..., boundary:].sum().backward()
    for k in ("u", "delta", "B", "C", "z"):
        assert torch.isfinite(inputs[k].grad[..., boundary:]).all(), k


def test_last_state_matches_across_piece_sizes(monkeypatch):
    inputs = case(2, 6, 29, 4, "shared")
    def run():
        return selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True, backend="torch")
    out, last = run()
    monkeypatch.setattr(torch_scan, "MIN_PIECE_STEPS", 1)
    monkeypatch.setattr(torch_scan, "BACKWARD_BUDGET", 2 * 6 * 4 * 5)
    out2, last2 = run()
    assert rel(out2, out) < 1e-6 and rel(last2, last) < 1e-6


@pytest.mark.parametrize("discretization", ["zoh_exact", "bilinear"])
def test_other_discretizations_across_pieces(discretization, monkeypatch):
    """The non-zoh forward (_segment_fast) and its recompute backward, piece by piece, against the ref
    backend in float64 (forward and every gradient)."""
    monkeypatch.setattr(torch_scan, "MIN_PIECE_STEPS", 1)
    monkeypatch.setattr(torch_scan, "BACKWARD_BUDGET", 2 * 4 * 3 * 7)  # pieces of 7 steps
    inputs = {k: v.double() for k, v in case(2, 4, 30, 3, "shared").items()}
    seq = torch.zeros(2, 30, dtype=torch.int64)
    seq[:, 11:] = 1
    results = []
    for backend in ("torch", "ref"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out = selective_scan_fn(**leaves, delta_softplus=True, seq_idx=seq, discretization=discretization,
                                backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        results.append((out, torch.autograd.grad(out, list(leaves.values()), w)))
    (out, grads), (ref, ref_grads) = results
    assert rel(out, ref) < FP64_TOL
    for k, a, b in zip(inputs, grads, ref_grads):
        assert rel(a, b) < FP64_TOL, k


# ------------------------------------------------------------------ opt-in torch.compile (kernels/cpu_compile.py)

@pytest.mark.parametrize("layout,G,opts", [("groups", 2, True), ("fixed", 1, False)])
def test_compiled_scan_matches_float64(layout, G, opts):
    """Inductor's C++ code for the functional scan: forward and every gradient against the float64 loop
    (one compile per case, ~5-10 s each on a 2-core machine)."""
    from kernels.cpu_compile import compiled_selective_scan
    inputs = {k: v for k, v in case(2, 4, 13, 3, layout, G, opts).items() if v is not None}
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.double().requires_grad_() for k, v in inputs.items()}
    out = compiled_selective_scan(**leaves, delta_softplus=True)
    ref = oracle(**ref_leaves)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), w.float())
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), w)
    assert out.dtype == torch.float32 and rel(out, ref) < FP32_TOL, f"out {rel(out, ref):.1e}"
    for k, a, b in zip(leaves, grads, ref_grads):
        assert rel(a, b) < FP32_TOL, f"d{k} {rel(a, b):.1e}"


def test_compiled_scan_rejects_bad_input():
    from kernels.cpu_compile import compiled_selective_scan
    inputs = case(1, 4, 5, 3, "shared")
    with pytest.raises(ValueError, match="delta"):
        compiled_selective_scan(**{**inputs, "delta": inputs["delta"][..., :4]})
