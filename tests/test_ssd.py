"""mamba_chunk_scan_combined against an independent float64 recurrence, forward and every gradient;
packed documents; the Mamba2 module; errors; the Triton chain's traffic model and compile specs.

Tolerances: fp32 paths against float64 are compared by norm-relative error < 1e-5 for outputs and 1e-4 for
gradients (1e-5 for the Triton chain). Measured for the Triton chain under the interpreter (IEEE dots) at
2 x 300 steps x 4 heads x 8 x 16 with four documents, chunk 64/128/256: outputs <= 7.5e-7, gradients
<= 1.3e-6 (dA); the torch path <= 2.5e-7.
bf16 inputs (Triton dots on bf16 operands, fp32 sums): measured 6.2e-3 for the output and at most 9.4e-3 for a
gradient, the torch path (fp32 inside) 1.6e-3 / 2.5e-3; 2e-2 / 3e-2 leave a 3x margin.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import CUDA, TRITON_DEVICE, rel
from kernels import InferenceParams, Mamba2, mamba_chunk_scan_combined, ssd_minimal_discrete

HAS_TRITON = kernels._utils.triton_available()
BACKENDS = ["torch", "ref"] + (["triton"] if HAS_TRITON else [])


def oracle(x, dt, A, B, C, D=None, z=None, dt_bias=None, h0=None, seq_idx=None, softplus=False,
           dt_limit=(0.0, float("inf"))):
    """Float64, one head and one time step at a time."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    G, N = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    if tuple(dt_limit) != (0.0, float("inf")):  # upstream clamps only for a non-default limit
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    y = torch.zeros(batch, L, H, P, dtype=torch.float64)
    finals = torch.zeros(batch, H, P, N, dtype=torch.float64)
    ys = [[None] * H for _ in range(batch)]
    fs = [[None] * H for _ in range(batch)]
    for b in range(batch):
        for h in range(H):
            g = h // (H // G)
            s = h0[b, h].double() if h0 is not None else torch.zeros(P, N, dtype=torch.float64)
            rows = []
            for t in range(L):
                decay = torch.exp(dt[b, t, h] * A[h])
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    decay = decay * 0
                s = decay * s + dt[b, t, h] * torch.outer(x[b, t, h], B[b, t, g])
                rows.append(s @ C[b, t, g])
            ys[b][h] = torch.stack(rows)
            fs[b][h] = s
    y = torch.stack([torch.stack(r, 1) for r in ys])  # (b, L, H, P)
    finals = torch.stack([torch.stack(r) for r in fs])
    if D is not None:
        y = y + (D.double()[:, None] if D.dim() == 1 else D.double()) * x
    if z is not None:
        y = y * F.silu(z.double())
    return y, finals


def make(batch, L, H, P, G, N, D="hp", z=True, bias=True, h0=True, docs=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(x=r(batch, L, H, P), dt=r(batch, L, H) * 0.7, A=-(torch.rand(H, generator=g) * 1.5 + 0.1),
               B=r(batch, L, G, N), C=r(batch, L, G, N))
    inp["D"] = r(H, P) if D == "hp" else (r(H) if D == "h" else None)
    inp["z"] = r(batch, L, H, P) if z else None
    inp["dt_bias"] = r(H) * 0.5 if bias else None
    inp["initial_states"] = r(batch, H, P, N) if h0 else None
    low = ("x", "dt", "B", "C", "z") if dtype != torch.float64 else tuple(inp)  # float64: everything
    inp = {k: (v.to(dtype) if v is not None and k in low else v) for k, v in inp.items()}
    seq = None
    if docs:
        seq = torch.zeros(batch, L, dtype=torch.int32)
        for s in docs:
            seq[:, s:] += 1
    return inp, seq


def check(backend, inp, seq, chunk, softplus, dt_limit, tol=1e-5, tol_grad=None):
    dev = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    leaves = {k: v.to(dev).requires_grad_() for k, v in inp.items() if v is not None}
    out, final = mamba_chunk_scan_combined(
        leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk, D=leaves.get("D"), z=leaves.get("z"),
        dt_bias=leaves.get("dt_bias"), initial_states=leaves.get("initial_states"),
        seq_idx=seq.to(dev) if seq is not None else None,
        dt_softplus=softplus, dt_limit=dt_limit, return_final_states=True, backend=backend)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inp.items() if v is not None}
    ref, ref_final = oracle(ref_leaves["x"], ref_leaves["dt"], ref_leaves["A"], ref_leaves["B"], ref_leaves["C"],
                            ref_leaves.get("D"), ref_leaves.get("z"), ref_leaves.get("dt_bias"),
                            ref_leaves.get("initial_states"), seq, softplus, dt_limit)
    assert out.dtype == inp["x"].dtype and final.dtype == torch.float32
    assert rel(out.cpu(), ref) < tol, rel(out.cpu(), ref)
    assert rel(final.cpu(), ref_final) < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    gf = torch.randn(final.shape, generator=torch.Generator().manual_seed(4))
    (out.float() * g.to(dev)).sum().add((final * gf.to(dev)).sum()).backward()
    (ref * g.double()).sum().add((ref_final * gf.double()).sum()).backward()
    for k in leaves:
        assert leaves[k].grad is not None, f"no gradient for {k}"
        e = rel(leaves[k].grad.cpu(), ref_leaves[k].grad)
        assert e < (tol_grad or tol * 10), f"d{k} rel err {e:.2e}"


# (batch, L, H, P, G, N, chunk, D, z, bias, h0, softplus, dt_limit, docs)
INF = float("inf")
CASES = [
    (1, 1, 4, 3, 1, 4, 16, "hp", True, True, True, True, (0.0, INF), None),
    (2, 31, 4, 3, 2, 4, 16, "h", True, True, True, True, (0.0, INF), [7, 16]),
    (1, 64, 4, 2, 1, 3, 32, None, False, False, False, False, (0.0, INF), None),
    (2, 65, 4, 2, 2, 5, 64, "hp", False, True, True, True, (0.05, 1.5), [32, 33, 64]),
    (1, 200, 4, 2, 2, 3, 32, "h", True, True, True, True, (0.0, INF), [1, 64, 150]),
    (2, 48, 4, 3, 4, 2, 16, "hp", True, False, True, False, (0.0, 0.3), [16, 32]),
]


# the Triton chain takes chunk sizes 64 / 128 / 256 only; tiny headdim / dstate keep the interpreter quick
TRITON_CASES = [
    (1, 1, 4, 3, 1, 4, 64, "hp", True, True, True, True, (0.0, INF), None),  # L = 1
    (2, 150, 4, 3, 2, 4, 64, "h", True, True, True, True, (0.0, INF), [7, 64, 100]),  # documents cross 64, 128
    (1, 200, 4, 2, 1, 3, 128, None, False, False, False, False, (0.0, INF), None),  # every option off
    (2, 65, 4, 2, 2, 5, 64, "hp", False, True, True, True, (0.05, 1.5), [32, 33, 64]),  # dt_limit, doc at 64
    (1, 130, 4, 2, 4, 2, 128, "hp", True, False, True, False, (0.0, 0.3), [60]),  # groups == heads
    (1, 300, 2, 2, 1, 2, 256, "h", True, True, True, True, (0.0, INF), [100, 255]),  # chunk 256, doc crosses it
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", CASES, ids=[f"L{c[1]}-Q{c[6]}-G{c[4]}" for c in CASES])
def test_against_float64_recurrence(backend, case):
    batch, L, H, P, G, N, chunk, D, z, bias, h0, sp, lim, docs = case
    inp, seq = make(batch, L, H, P, G, N, D, z, bias, h0, docs, seed=L)
    check(backend, inp, seq, chunk, sp, lim)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"L{c[1]}-Q{c[6]}-G{c[4]}" for c in TRITON_CASES])
def test_triton_against_float64_recurrence(case):
    batch, L, H, P, G, N, chunk, D, z, bias, h0, sp, lim, docs = case
    inp, seq = make(batch, L, H, P, G, N, D, z, bias, h0, docs, seed=L)
    check("triton", inp, seq, chunk, sp, lim, tol_grad=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ref"])
def test_bf16_inputs(backend):
    inp, seq = make(2, 150, 4, 8, 2, 16, docs=[7, 64, 100], dtype=torch.bfloat16, seed=3)
    check(backend, inp, seq, 64, True, (0.0, INF), tol=2e-2, tol_grad=3e-2)


def test_result_does_not_depend_on_chunk_size():
    inp, seq = make(1, 50, 4, 2, 2, 3, docs=[10, 30], dtype=torch.float64, seed=1)
    outs = [mamba_chunk_scan_combined(**inp, chunk_size=c, seq_idx=seq, dt_softplus=True, backend="torch")
            for c in (1, 7, 16, 256)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-10, atol=1e-12)


def test_minimal_discrete_reference_agrees():
    inp, _ = make(2, 32, 4, 3, 4, 5, D=None, z=False, bias=False, h0=True, dtype=torch.float64, seed=2)
    dt = F.softplus(inp["dt"])
    y, final = ssd_minimal_discrete(inp["x"] * dt[..., None], inp["A"] * dt, inp["B"], inp["C"], 8,
                                    initial_states=inp["initial_states"])
    ref, ref_final = oracle(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], h0=inp["initial_states"], softplus=True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(final, ref_final)


def test_gradcheck_float64():
    inp, seq = make(1, 9, 2, 2, 1, 2, dtype=torch.float64, seed=5, docs=[4])
    keys = [k for k, v in inp.items() if v is not None]
    f = lambda *a: mamba_chunk_scan_combined(**dict(zip(keys, a)), chunk_size=4, seq_idx=seq, dt_softplus=True,  # noqa: E731
                                             backend="torch")
    assert torch.autograd.gradcheck(f, [inp[k].double().requires_grad_() for k in keys], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strong_decay_with_documents_stays_finite(backend):
    """Regression (found training MoT with Mamba2 on chars): with seq_idx, exp of a cumsum difference across
    documents overflowed to inf before its 0 mask, giving NaN. Large dt * |A| makes the exponents big."""
    # one chunk holding a 40-step document and then a 24-step one: the earlier document's cumsum ends far
    # below the later one's, so (cumsum at chunk end) - (cumsum in the earlier document) is >> 88 (fp32 exp)
    # (a second chunk reads that chunk's state, so a NaN there reaches outputs and gradients)
    inp, seq = make(1, 96, 4, 2, 2, 3, docs=[40], seed=8)
    inp["dt"] = inp["dt"].abs() * 0.2 + 0.1
    inp["dt"][:, :40] = inp["dt"][:, :40] * 30 + 2  # the long earlier document decays fast
    inp["A"] = inp["A"] * 10
    xs = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    dev = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    xs = {k: v.detach().to(dev).requires_grad_() for k, v in xs.items()}
    out, final = mamba_chunk_scan_combined(**xs, chunk_size=64, seq_idx=seq.to(dev), return_final_states=True,
                                           backend=backend)
    (out.square().sum() + final.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(x.grad).all() for x in xs.values())
    ref, _ = oracle(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
                    inp["initial_states"], seq)
    assert rel(out.detach().cpu(), ref) < 1e-5


def run_with_grads(backend, inp, seq, chunk):
    """Output and input gradients (CPU) for a fixed output weighting."""
    dev = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    xs = {k: v.to(dev).requires_grad_() for k, v in inp.items() if v is not None}
    out = mamba_chunk_scan_combined(**xs, chunk_size=chunk, seq_idx=seq.to(dev), dt_softplus=True, backend=backend)
    (out * torch.linspace(-1, 1, out.numel(), device=dev).view_as(out)).sum().backward()
    return out.detach().cpu(), {k: v.grad.cpu() for k, v in xs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_isolation(backend):
    # the middle document crosses the chunk border at 64
    inp, seq = make(1, 150, 4, 2, 2, 3, h0=False, docs=[20, 100], seed=6)
    changed = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    for k in ("x", "dt", "B", "C", "z"):
        changed[k][:, 20:100] += torch.randn_like(changed[k][:, 20:100])
    o0, g0 = run_with_grads(backend, inp, seq, 64)
    o1, g1 = run_with_grads(backend, changed, seq, 64)
    for sl in (slice(0, 20), slice(100, 150)):
        # exact: another document's values only ever meet exact zeros
        torch.testing.assert_close(o0[:, sl], o1[:, sl], rtol=0, atol=0)
        for k in ("x", "dt", "B", "C", "z"):
            torch.testing.assert_close(g0[k][:, sl], g1[k][:, sl], rtol=0, atol=0)
    assert not torch.allclose(o0[:, 20:100], o1[:, 20:100])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_takes_strided_inputs_as_they_are():
    """x, z, B, C, dt as views into one packed projection (as Mamba2's in_proj split makes them), dout with a
    zero stride: the kernels read through the strides and give the bits of the contiguous run."""
    inp, seq = make(2, 70, 4, 3, 2, 4, docs=[40], seed=13)
    batch, L = 2, 70
    widths = [4 * 3, 4 * 3, 2 * 4, 2 * 4, 4]  # z, x, B, C, dt
    packed = torch.randn(batch, L, sum(widths) + 5)
    z, x, B, C, dt = torch.split(packed[..., :sum(widths)], widths, dim=-1)
    views = dict(inp, z=z.unflatten(-1, (4, 3)), x=x.unflatten(-1, (4, 3)), B=B.unflatten(-1, (2, 4)),
                 C=C.unflatten(-1, (2, 4)), dt=dt)
    assert not views["x"].is_contiguous() and not views["dt"].is_contiguous()
    dense = {k: (v.contiguous() if v is not None else None) for k, v in views.items()}

    def run(d):
        xs = {k: v.to(TRITON_DEVICE).requires_grad_() for k, v in d.items() if v is not None}
        out = mamba_chunk_scan_combined(**xs, chunk_size=64, seq_idx=seq.to(TRITON_DEVICE), dt_softplus=True,
                                        backend="triton")
        out.sum().backward()  # dout = ones expanded: stride 0
        return out.detach().cpu(), {k: v.grad.cpu() for k, v in xs.items()}

    o_view, g_view = run(views)
    o_dense, g_dense = run(dense)
    torch.testing.assert_close(o_view, o_dense, rtol=0, atol=0)
    for k in g_dense:
        torch.testing.assert_close(g_view[k], g_dense[k], rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_nan_in_one_document_does_not_reach_the_next():
    """Document A = steps [0, 100) crosses the chunk border at 64, its first chunk is NaN; the state entering
    chunk 1 is then NaN. Document B = [100, 150) starts inside chunk 1: its outputs and gradients must be
    those of a run with a clean A (resets are selects, not multiplications by 0)."""
    inp, seq = make(1, 150, 4, 2, 2, 3, h0=False, docs=[100], seed=12)
    poisoned = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    poisoned["x"][:, :64] = float("nan")
    o_clean, g_clean = run_with_grads("triton", inp, seq, 64)
    o_nan, g_nan = run_with_grads("triton", poisoned, seq, 64)
    assert torch.isnan(o_nan[:, :64]).any()  # the poison is there
    doc_b = slice(100, 150)
    torch.testing.assert_close(o_nan[:, doc_b], o_clean[:, doc_b], rtol=0, atol=0)
    for k in ("x", "dt", "B", "C", "z"):
        assert torch.isfinite(g_nan[k][:, doc_b]).all(), k
        torch.testing.assert_close(g_nan[k][:, doc_b], g_clean[k][:, doc_b], rtol=0, atol=0)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, 10, 4)), r"x must have shape \(\*, \*, \*, \*\)"),
    (dict(dt=torch.randn(2, 10, 3)), r"dt must have shape \(2, 10, 4\)"),
    (dict(A=torch.randn(4, 1)), r"A must have shape \(4\)"),
    (dict(B=torch.randn(2, 10, 3, 5), C=torch.randn(2, 10, 3, 5)), "B has 3 groups, which must divide nheads=4"),
    (dict(C=torch.randn(2, 10, 2, 4)), r"C must have shape \(2, 10, 2, 5\)"),
    (dict(D=torch.randn(3)), r"D must have shape \(4,\) or \(4, 3\)"),
    (dict(initial_states=torch.randn(2, 4, 3, 4)), r"initial_states must have shape \(2, 4, 3, 5\)"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit must be"),
    (dict(seq_idx=torch.zeros(2, 10, dtype=torch.float32)), "seq_idx must have dtype in"),
    (dict(B=torch.randn(2, 10, 2, 0), C=torch.randn(2, 10, 2, 0)), "d_state >= 1"),
])
def test_bad_inputs(change, message):
    inp, _ = make(2, 10, 4, 3, 2, 5, seed=0)
    args = dict(inp, chunk_size=8)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        mamba_chunk_scan_combined(**args)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("chunk", [32, 100, 512])
def test_triton_rejects_other_chunk_sizes(chunk):
    inp, _ = make(1, 10, 2, 3, 1, 4, seed=0)
    args = {k: (v.to(TRITON_DEVICE) if v is not None else None) for k, v in inp.items()}
    with pytest.raises(ValueError, match=r"chunk_size must be one of \(64, 128, 256\)"):
        mamba_chunk_scan_combined(**args, chunk_size=chunk, backend="triton")


# ------------------------------------------------------------------ traffic model, compile specs

def test_traffic_ours_below_mamba_ssm_and_linear_in_batch():
    from kernels.ssd.traffic import ssd_traffic, traffic_totals
    shape = dict(seqlen=2048, nheads=24, headdim=64, dstate=128, ngroups=1, chunk_size=256, dtype=torch.bfloat16)
    ours = traffic_totals(ssd_traffic(8, **shape))
    theirs = traffic_totals(ssd_traffic(8, **shape, impl="mamba_ssm"))
    assert ours["forward"] <= theirs["forward"] and ours["backward"] <= theirs["backward"], (ours, theirs)
    for impl in ("ours", "mamba_ssm"):
        one, four = ssd_traffic(1, **shape, impl=impl), ssd_traffic(4, **shape, impl=impl)
        for part in ("forward", "backward"):
            assert [k for k, _, _ in one[part]] == [k for k, _, _ in four[part]]
            if impl == "ours":  # mamba_ssm's dB/dC/dcb split count depends on the batch (SM count rule)
                assert [(4 * r, 4 * w) for _, r, w in one[part]] == [(r, w) for _, r, w in four[part]]
    # what the forward writes: y once in bf16 (and y before the gate for dz), the states in bf16, final fp32
    x_bytes = 8 * 2048 * 24 * 64 * 2
    fwd = dict((k, w) for k, _, w in ssd_traffic(8, **shape)["forward"])
    assert fwd["chunk_scan_fwd (+D, z, cast)"] == 2 * x_bytes
    assert dict((k, w) for k, _, w in ssd_traffic(8, **shape, has_z=False)["forward"])[
        "chunk_scan_fwd (+D, z, cast)"] == x_bytes
    assert fwd["state_fwd (chunk states + passing)"] == 8 * 24 * 8 * 64 * 128 * 2 + 8 * 24 * 64 * 128 * 4
    with pytest.raises(ValueError, match="impl"):
        ssd_traffic(8, **shape, impl="fla")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_compile_specs_describe_every_kernel_argument():
    from kernels.ssd import triton_ssd
    specs = triton_ssd.compile_specs()
    kernels_seen = {s["fn"].__name__ for s in specs}
    assert kernels_seen == {fn.__name__ for fn, _, _ in triton_ssd._KERNEL_FLAGS.values()}
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names), s["name"]
        assert {a for a, t in s["signature"].items() if t == "constexpr"} == set(s["constexprs"]), s["name"]
        assert set(s["divisible_by_16"]) <= set(s["signature"]) and s["num_warps"] in (1, 2, 4, 8), s["name"]
        assert all(t in ("constexpr", "*bf16", "*fp32", "*i32", "i32", "fp32") for t in s["signature"].values())
    assert len({s["name"] for s in specs}) == len(specs)


# ------------------------------------------------------------------ full size on a GPU

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,precision,tol,tol_grad", [
    # ieee fp32: the interpreter's 7.5e-7 / 1.3e-6 at 300 steps, with room for 2048 steps and 64 x 128 sums
    (torch.float32, "ieee", 1e-5, 1e-4),
    # tf32 operands keep 10 mantissa bits (relative rounding 4.9e-4 per operand), sums stay fp32
    (torch.float32, "tf32", 5e-3, 3e-2),
    # bf16: the interpreter's 6.2e-3 / 9.4e-3 (same rounding points as the tensor cores); the errors come from
    # in-chunk sums and do not grow with L, but 2048 steps are unmeasured here: 3x / 5x margins
    (torch.bfloat16, "tf32", 2e-2, 5e-2),
], ids=["fp32-ieee", "fp32-tf32", "bf16"])
def test_cuda_full_size_against_float64_torch_path(dtype, precision, tol, tol_grad, monkeypatch):
    """8 x 2048 x 24 heads x 64 x dstate 128, chunk 256, every option on, two document breaks. The reference is
    the torch path in float64 (itself checked against the recurrence above); the torch path on the same
    inputs in fp32 is reported next to ours."""
    from kernels.ssd import triton_ssd
    monkeypatch.setattr(triton_ssd, "DOT_PRECISION", precision)
    inp, seq = make(8, 2048, 24, 64, 1, 128, D="h", docs=[700, 1500], dtype=dtype, seed=11)
    inp["dt"] = inp["dt"] - 3.0  # softplus(dt + bias) around 0.05, Mamba2's dt range
    g = torch.randn(8, 2048, 24, 64, generator=torch.Generator().manual_seed(3)).cuda()

    def run(backend, work):
        xs = {k: v.cuda().to(work if v.is_floating_point() and work == torch.float64 else v.dtype).requires_grad_()
              for k, v in inp.items() if v is not None}
        out = mamba_chunk_scan_combined(**xs, chunk_size=256, seq_idx=seq.cuda(), dt_softplus=True, backend=backend)
        (out.double() * g.double()).sum().backward()
        return out.detach(), {k: v.grad for k, v in xs.items()}

    ref, ref_g = run("torch", torch.float64)
    ours, ours_g = run("triton", dtype)
    torch_path, torch_g = run("torch", dtype)
    errors = {"out": (rel(ours, ref), rel(torch_path, ref))}
    errors.update({"d" + k: (rel(ours_g[k], ref_g[k]), rel(torch_g[k], ref_g[k])) for k in ref_g})
    print({k: f"ours {a:.1e} torch {b:.1e}" for k, (a, b) in errors.items()})
    assert errors["out"][0] < tol, errors
    assert all(a < tol_grad for k, (a, _) in errors.items() if k != "out"), errors


# ------------------------------------------------------------------ Mamba2 module

MAMBA2_KEYS = {  # mamba_ssm Mamba2(d_model=64, d_state=16, headdim=32): names and shapes
    "dt_bias": (4,), "A_log": (4,), "D": (4,), "in_proj.weight": (292, 64), "conv1d.weight": (160, 1, 4),
    "conv1d.bias": (160,), "norm.weight": (128,), "out_proj.weight": (64, 128),
}


def test_mamba2_state_dict_and_init():
    torch.manual_seed(0)
    m = Mamba2(64, d_state=16, headdim=32)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA2_KEYS
    m.load_state_dict({k: torch.randn(s) for k, s in MAMBA2_KEYS.items()}, strict=True)
    m = Mamba2(64, d_state=16, headdim=32, A_init_range=(1, 16))
    A = torch.exp(m.A_log)
    assert (A >= 1).all() and (A <= 16).all() and torch.equal(m.D, torch.ones(4))
    dt = F.softplus(m.dt_bias)
    assert (dt >= 0.001 * 0.999).all() and (dt <= 0.1 * 1.001).all()


@pytest.mark.parametrize("kw", [dict(), dict(ngroups=2, D_has_hdim=True, rmsnorm=False, dt_limit=(0.001, 0.05))],
                         ids=["default", "groups-hdimD-nonorm-limit"])
def test_mamba2_decoding_equals_forward(kw):
    torch.manual_seed(1)
    m = Mamba2(32, d_state=8, headdim=16, chunk_size=8, layer_idx=0, **kw)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        full = m(x)
        ip = InferenceParams(13, 2)
        outs = [m(x[:, :4], inference_params=ip)]
        ip.seqlen_offset = 4
        for t in range(4, 13):
            outs.append(m(x[:, t:t + 1], inference_params=ip))
            ip.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_mamba2_seq_idx_isolates_documents_and_trains():
    torch.manual_seed(2)
    m = Mamba2(32, d_state=8, headdim=16, chunk_size=8)
    x = torch.randn(1, 21, 32, requires_grad=True)
    seq = torch.zeros(1, 21, dtype=torch.int32)
    seq[:, 11:] = 1
    out = m(x, seq_idx=seq)
    torch.testing.assert_close(out[:, 11:], m(x[:, 11:]), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_gated_rmsnorm():
    norm = kernels.RMSNormGated(8, group_size=4, norm_before_gate=False)
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    v = (x * F.silu(z)).view(3, 2, 4)
    expected = (v / v.square().mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8)
    torch.testing.assert_close(norm(x, z), expected)
