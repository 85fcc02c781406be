"""selective_scan_fn against an independent float64 recurrence, every backend, forward and every gradient.

The Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set in conftest), on
small shapes, with chunks of 8 steps and the two-level carry from 4 chunks on (fixture small_chunks), so
that lengths 7..300 cover one chunk, partial chunks, several chunks and both carry levels; (dstate, chunk)
tiles of 4 x 8 .. 16 x 8 are smaller than a warp group, the case where the old backward raced. On a CUDA
machine the same cases run compiled, and real shapes are checked against the torch path.

Tolerances: float32 paths accumulate in fp32 over at most 300 steps, so the norm-relative error against
float64 stays near 1e-7 (measured: at most 6.3e-7 on the half-precision test's shape); we allow 1e-5 (and
check upstream's elementwise fp32 tolerances, rtol 6e-4 / atol 2e-3, on top). bf16/fp16 inputs are compared
with the oracle run on the same rounded inputs; the error is then the rounding of outputs, gradients and the
output gradient (rounded to the input dtype, exact in the oracle) to 8 (bf16) or 11 (fp16) mantissa bits:
measured norm-relative at most 4.0e-3 (bf16; 5.4e-3 for ddelta_bias, which gets 4x; the interpreter truncates
to bf16) and 8.4e-4 (fp16), over the triton and torch backends, seeds 3..5, shape 2 x 4 x 40 x 4
(/tmp/scan_half.py, quoted in the devlog).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import TRITON_DEVICE, rel
from kernels import selective_scan_fn

HAS_TRITON = kernels._utils.triton_available()
CUDA = torch.cuda.is_available()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 steps, two-level carry past 3 chunks: small shapes cross every boundary the kernels have."""
    if HAS_TRITON:
        from kernels.selective_scan import triton_scan
        monkeypatch.setattr(triton_scan, "MAX_CHUNK", 8)
        monkeypatch.setattr(triton_scan, "CARRY_SINGLE_MAX", 3)


def on_triton_device(inp, backend):
    return {k: (v.to(TRITON_DEVICE) if (v is not None and backend == "triton") else v) for k, v in inp.items()}


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, seq_idx=None, bilinear=False):
    """Float64 recurrence written from the definition, one (batch, channel) state vector at a time."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)

    def at(M, b, d, t):
        if M.dim() == 2:
            return M[d].double()
        if M.dim() == 3:
            return M[b, :, t].double()
        return M[b, d // (dim // M.shape[1]), :, t].double()

    ys, last = [], []
    for b in range(batch):
        rows, lrow = [], []
        for d in range(dim):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            col = []
            for t in range(L):
                dt = delta[b, d, t]
                if bilinear:
                    decay = (1 + dt * A[d] / 2) / (1 - dt * A[d] / 2)
                    coef = dt / (1 - dt * A[d] / 2)
                else:
                    decay, coef = torch.exp(dt * A[d]), dt
                if seq_idx is not None and t > 0 and seq_idx[b, t] != seq_idx[b, t - 1]:
                    decay = decay * 0
                h = decay * h + coef * at(B, b, d, t) * u[b, d, t]
                col.append((h * at(C, b, d, t)).sum())
            rows.append(torch.stack(col))
            lrow.append(h)
        ys.append(torch.stack(rows))
        last.append(torch.stack(lrow))
    y = torch.stack(ys)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, torch.stack(last)


def make_inputs(batch, dim, L, N, bc="var4", groups=1, D=True, z=True, bias=True, dtype=torch.float32, seed=0,
                docs=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5,
               A=-(torch.rand(dim, N, generator=g) * 1.5 + 0.2))
    shapes = dict(fixed=(dim, N), var3=(batch, N, L), var4=(batch, groups, N, L))
    inp["B"], inp["C"] = r(*shapes[bc]), r(*shapes[bc])
    inp["D"] = r(dim) if D else None
    inp["z"] = r(batch, dim, L) if z else None
    inp["delta_bias"] = r(dim) * 0.5 if bias else None
    low = ("u", "delta", "B", "C", "z")  # A, D, delta_bias stay fp32, as upstream
    inp = {k: (v.to(dtype) if (v is not None and k in low) else v) for k, v in inp.items()}
    seq = None
    if docs:
        seq = torch.zeros(batch, L, dtype=torch.int32)
        for s in docs:
            seq[:, s:] += 1
    return inp, seq


def check_case(backend, inp, seq, softplus, last_state, dtype, tol):
    dev = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    leaves = {k: v.detach().to(dev).requires_grad_() for k, v in inp.items() if v is not None}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inp.items() if v is not None}
    res = selective_scan_fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
                            z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), delta_softplus=softplus,
                            return_last_state=last_state, seq_idx=seq.to(dev) if seq is not None else None,
                            backend=backend)
    out, last = res if last_state else (res, None)
    ref_out, ref_last = oracle(ref_leaves["u"], ref_leaves["delta"], ref_leaves["A"], ref_leaves["B"], ref_leaves["C"],
                               ref_leaves.get("D"), ref_leaves.get("z"), ref_leaves.get("delta_bias"), softplus, seq)
    assert out.dtype == inp["u"].dtype and out.shape == inp["u"].shape
    assert torch.isfinite(out).all()
    assert rel(out.cpu(), ref_out) < tol, f"out rel err {rel(out.cpu(), ref_out):.2e}"
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), ref_out, rtol=6e-4, atol=2e-3)
    if last_state:
        assert last.dtype == torch.float32 and last.shape == ref_last.shape
        assert rel(last.cpu(), ref_last) < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(g.to(out.dtype).to(dev))
    ref_out.backward(g.double())
    for k in leaves:
        assert leaves[k].grad is not None, f"no gradient for {k}"
        assert leaves[k].grad.dtype == leaves[k].dtype, f"d{k} dtype"
        e = rel(leaves[k].grad.cpu(), ref_leaves[k].grad)
        assert e < tol * (4 if k in ("delta", "delta_bias", "A") else 1), f"d{k} rel err {e:.2e}"


# (batch, dim, L, N, B/C form, groups, D, z, bias, softplus, last_state, docs)
CASES = [
    (1, 4, 1, 4, "var4", 1, True, True, True, True, True, None),
    (1, 4, 7, 4, "var4", 1, True, True, True, True, True, None),
    (1, 4, 64, 8, "var4", 1, True, True, True, True, True, [20, 40]),
    (1, 2, 129, 16, "var4", 1, True, True, True, True, True, [63, 64, 65]),
    (1, 2, 300, 3, "var4", 1, True, True, True, True, True, [100]),
    (2, 4, 20, 4, "var4", 2, True, True, True, True, False, None),
    (2, 4, 20, 4, "var4", 4, False, False, False, False, True, [1, 19]),
    (2, 3, 33, 5, "var3", 1, True, False, True, True, False, None),
    (2, 3, 33, 5, "fixed", 1, False, True, False, True, True, None),
    (2, 5, 17, 3, "var4", 1, False, False, False, False, False, [0, 5]),
]
IDS = [f"L{c[2]}-{c[4]}-G{c[5]}-{'D' if c[6] else ''}{'z' if c[7] else ''}{'b' if c[8] else ''}{'sp' if c[9] else ''}"
       f"{'-last' if c[10] else ''}{'-docs' if c[11] else ''}" for c in CASES]
BACKENDS = ["ref", "torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_against_float64_oracle(backend, case):
    batch, dim, L, N, bc, groups, D, z, bias, sp, last, docs = case
    inp, seq = make_inputs(batch, dim, L, N, bc, groups, D, z, bias, seed=L + groups)
    check_case(backend, inp, seq, sp, last, torch.float32, 1e-5)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_precision_inputs(backend, dtype, tol):
    """Tolerances: 2.5x (bf16) and 2.4x (fp16) the largest measured error (see the module docstring)."""
    inp, seq = make_inputs(2, 4, 40, 4, "var4", 2, dtype=dtype, seed=3, docs=[25])
    check_case(backend, inp, seq, True, True, dtype, tol)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("groups,dim", [(1, 8), (2, 12)], ids=["G1-partial-block", "G2"])
def test_triton_channel_blocks(monkeypatch, groups, dim):
    """Programs of 3 channels: a partial last block (dim 8), and blocks inside groups of 6 channels."""
    from kernels.selective_scan import triton_scan
    monkeypatch.setattr(triton_scan, "CHANNELS_PER_PROGRAM", 3)
    assert triton_scan.channels_per_program(dim, groups) == 3
    inp, seq = make_inputs(1, dim, 19, 4, "var4", groups, seed=21, docs=[6])
    check_case("triton", inp, seq, True, True, torch.float32, 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.usefixtures("small_chunks")
def test_triton_strided_inputs():
    """Any strides: time-strided delta (as mamba_inner_fn makes it), B/C and z views, int64 seq_idx."""
    inp, seq = make_inputs(2, 4, 21, 4, "var4", 2, seed=9, docs=[11])
    inp = on_triton_device(inp, "triton")
    dense = selective_scan_fn(**inp, delta_softplus=True, seq_idx=seq.to(TRITON_DEVICE), backend="triton")
    strided = dict(inp, delta=inp["delta"].transpose(1, 2).contiguous().transpose(1, 2),
                   B=torch.cat([inp["B"], inp["B"]], 2)[:, :, :4], z=torch.stack([inp["z"], inp["z"]], 2)[:, :, 0])
    assert strided["delta"].stride(-1) != 1 and not strided["B"].is_contiguous() and not strided["z"].is_contiguous()
    out = selective_scan_fn(**strided, delta_softplus=True, seq_idx=seq.long().to(TRITON_DEVICE), backend="triton")
    torch.testing.assert_close(out, dense, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter meets the NaNs
def test_triton_nan_in_one_document_stays_there():
    """Resets are selects: NaN/Inf inputs in document 0 (steps 0..12, across a chunk boundary) leave document 1's
    outputs and gradients finite and equal to a run on document 1 alone."""
    inp, seq = make_inputs(1, 4, 40, 4, "var4", 1, seed=13, docs=[13])
    alone_inp = {k: (v[..., 13:].clone() if (v is not None and v.dim() >= 3) else v) for k, v in inp.items()}
    poisoned = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    poisoned["u"][0, 1, 5] = float("nan")
    poisoned["delta"][0, 2, 9] = float("inf")
    poisoned["B"][0, 0, 1, 11] = float("nan")

    weights = torch.randn(1, 4, 40, generator=torch.Generator().manual_seed(5))

    def run(d, seq_idx, w):
        xs = {k: v.to(TRITON_DEVICE).requires_grad_() for k, v in d.items() if v is not None}
        out = selective_scan_fn(**xs, delta_softplus=True, seq_idx=seq_idx, backend="triton")
        (out * w.to(out)).sum().backward()
        return out.detach().cpu(), {k: v.grad.cpu() for k, v in xs.items()}

    out_p, grad_p = run(poisoned, seq.to(TRITON_DEVICE), weights)
    out_a, grad_a = run(alone_inp, None, weights[..., 13:])
    assert torch.isnan(out_p[..., :13]).any()  # the poison is really there
    assert torch.isfinite(out_p[..., 13:]).all()
    torch.testing.assert_close(out_p[..., 13:], out_a, rtol=1e-6, atol=1e-6)
    for k in ("u", "delta", "B", "C", "z"):
        assert torch.isfinite(grad_p[k][..., 13:]).all(), k
        torch.testing.assert_close(grad_p[k][..., 13:], grad_a[k], rtol=1e-5, atol=1e-6)


# (batch, dim, L, dstate): Mamba-1 at GPT-2-small width, and the MoT char model's single long sequence
REAL_SHAPES = [(8, 1536, 2048, 16), (1, 256, 786432, 16)]


def mamba_like_inputs(batch, dim, L, N, dtype, seed):
    """Mamba-1's initialisation ranges (dt in [1e-3, 0.1] through softplus(delta + bias), A = -(1..N)),
    input-dependent B/C, and packed documents."""
    g = torch.Generator(device=TRITON_DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=TRITON_DEVICE)  # noqa: E731
    log_dt = torch.rand(dim, generator=g, device=TRITON_DEVICE) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = torch.exp(log_dt)
    inp = dict(u=r(batch, dim, L).to(dtype), delta=(r(batch, dim, L) * 0.5).to(dtype),
               A=-torch.arange(1, N + 1, device=TRITON_DEVICE, dtype=torch.float32).repeat(dim, 1),
               B=r(batch, N, L).to(dtype), C=r(batch, N, L).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype),
               delta_bias=dt + torch.log(-torch.expm1(-dt)))
    starts = torch.sort(torch.randint(1, L, (batch, 3), generator=g, device=TRITON_DEVICE), dim=1).values
    seq = (torch.arange(L, device=TRITON_DEVICE)[None, :, None] >= starts[:, None, :]).sum(-1).to(torch.int32)
    return inp, seq


def run_scan(inp, seq, backend, dout):
    xs = {k: v.detach().requires_grad_() for k, v in inp.items()}
    out, last = selective_scan_fn(**xs, delta_softplus=True, return_last_state=True, seq_idx=seq, backend=backend)
    out.backward(dout)
    return dict(out=out.detach(), last=last.detach(), **{"d" + k: v.grad for k, v in xs.items()})


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=["8x1536x2048x16", "mot-char-1x256x786432x16"])
def test_cuda_real_shapes(shape, dtype):
    """20 fresh inputs. Every repetition runs the Triton scan twice: everything but the atomically summed
    dB/dC must be bitwise identical (a race shows up as a difference). Against the torch path: every repetition
    at 8 x 1536, the first at the MoT shape (the torch path is slow there). Tolerances: both paths compute in
    fp32 from the same inputs and round to the same dtype; sums over up to 8 x 786k terms in different orders
    (fp32: ~sqrt(n) x 6e-8 < 1e-4 norm-relative) or a final rounding (bf16: 2^-9); a wrong chunk would give
    an O(1) error in the elementwise max."""
    batch, dim, L, N = shape
    norm_tol, max_tol = (1e-4, 1e-3) if dtype == torch.float32 else (1e-2, 5e-2)
    for rep in range(20):
        inp, seq = mamba_like_inputs(batch, dim, L, N, dtype, seed=rep)
        dout = torch.randn(batch, dim, L, device="cuda", generator=torch.Generator("cuda").manual_seed(99 + rep))
        first = run_scan(inp, seq, "triton", dout.to(dtype))
        second = run_scan(inp, seq, "triton", dout.to(dtype))
        for k, v in first.items():
            assert torch.isfinite(v).all(), f"rep {rep}: non-finite {k}"
            if k in ("dB", "dC"):  # atomics: fp32 sums in any order, then rounded to the dtype (a rare ulp flip)
                assert rel(second[k], v) < (1e-5 if dtype == torch.float32 else 1e-3), f"rep {rep}: {k} differs"
            else:
                assert torch.equal(second[k], v), f"rep {rep}: {k} differs between two identical runs"
        if rep == 0 or L <= 4096:
            ref = run_scan(inp, seq, "torch", dout.to(dtype))
            for k, v in first.items():
                assert rel(v, ref[k]) < norm_tol, f"rep {rep}: {k} norm-relative {rel(v, ref[k]):.2e}"
                assert max_rel(v, ref[k]) < max_tol, f"rep {rep}: {k} max-relative {max_rel(v, ref[k]):.2e}"
            del ref
        del first, second


def test_gradcheck_float64_torch_and_ref():
    inp, seq = make_inputs(1, 2, 6, 2, "var4", 1, dtype=torch.float64, seed=1, docs=[3])
    keys = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    xs = [inp[k].double().requires_grad_() for k in keys]
    for backend in ("torch", "ref"):
        f = lambda *a: selective_scan_fn(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True,  # noqa: E731
                                         seq_idx=seq, backend=backend)
        assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6)


def test_torch_path_spans_several_segments(monkeypatch):
    """Force tiny segments so the carried state and its gradient cross segment boundaries."""
    from kernels.selective_scan import torch_scan
    monkeypatch.setattr(torch_scan, "SEGMENT_BUDGET", 2 * 4 * 4 * 7)  # 7 steps per segment
    inp, seq = make_inputs(2, 4, 50, 4, "var4", 2, seed=5, docs=[14, 30])
    check_case("torch", inp, seq, True, True, torch.float32, 1e-5)


def exact_zoh_oracle(u, delta, A, B, C):
    """x_t = exp(dt A) x_{t-1} + (exp(dt A) - 1) / A * B_t u_t (softplus dt; B, C: (batch, 1, N, L)), float64."""
    dt = torch.nn.functional.softplus(delta.double())
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        dA = dt[..., t, None] * A.double()
        h = torch.exp(dA) * h + torch.expm1(dA) / A.double() * B[:, :, :, t].double() * u[..., t, None].double()
        ys.append((h * C[:, :, :, t].double()).sum(-1))
    return torch.stack(ys, -1)


@pytest.mark.parametrize("discretization", ["bilinear", "zoh_exact"])
@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_other_discretizations(backend, discretization):
    inp, _ = make_inputs(2, 4, 30, 4, "var4", 1, D=False, z=False, bias=False, dtype=torch.float64, seed=2)
    xs = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
    out = selective_scan_fn(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], delta_softplus=True,
                            discretization=discretization, backend=backend)
    rs = {k: v.detach().double().requires_grad_() for k, v in xs.items()}
    if discretization == "bilinear":
        ref, _ = oracle(rs["u"], rs["delta"], rs["A"], rs["B"], rs["C"], softplus=True, bilinear=True)
    else:
        ref = exact_zoh_oracle(rs["u"], rs["delta"], rs["A"], rs["B"], rs["C"])
    assert rel(out, ref) < 1e-12
    zoh = selective_scan_fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=True, backend=backend)
    assert rel(zoh, ref) > 1e-3  # the option really changes the model
    weight = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * weight).sum(), list(xs.values()))
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(rs.values()))
    for name, g, r in zip(xs, grads, ref_grads):  # float64 maths; A stays fp32 (as upstream), so dA is rounded to fp32
        assert rel(g, r) < (1e-6 if name == "A" else 1e-10), name


# ------------------------------------------------------------------ packed documents

@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_idx_equals_separate_documents(backend):
    bounds = [0, 9, 10, 31, 40]  # documents of length 9, 1, 21, 9
    inp, seq = make_inputs(1, 4, 40, 4, "var4", 1, seed=11, docs=bounds[1:-1])
    inp = on_triton_device(inp, backend)
    packed = selective_scan_fn(**inp, delta_softplus=True, seq_idx=seq.to(inp["u"].device), backend=backend)
    for s, e in zip(bounds, bounds[1:]):
        part = {k: (v[..., s:e] if (v is not None and v.dim() >= 3) else v) for k, v in inp.items()}
        alone = selective_scan_fn(**part, delta_softplus=True, backend=backend)
        torch.testing.assert_close(packed[..., s:e], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("backend", BACKENDS)
def test_perturbing_one_document_changes_no_other(backend):
    inp, seq = make_inputs(1, 4, 36, 4, "var4", 1, seed=12, docs=[12, 24])
    inp = on_triton_device(inp, backend)
    seq = seq.to(inp["u"].device)
    changed = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    for k in ("u", "delta", "B", "C", "z"):
        changed[k][..., 12:24] += torch.randn_like(changed[k][..., 12:24])  # document 1 only

    def run(d):
        xs = {k: v.clone().requires_grad_() for k, v in d.items() if v is not None}
        out = selective_scan_fn(**xs, delta_softplus=True, seq_idx=seq, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out)).sum().backward()
        return out.detach(), {k: v.grad for k, v in xs.items()}

    out0, g0 = run(inp)
    out1, g1 = run(changed)
    for sl in (slice(0, 12), slice(24, 36)):
        torch.testing.assert_close(out0[..., sl], out1[..., sl], rtol=0, atol=0)  # exact: nothing crosses a reset
        for k in ("u", "delta", "B", "C", "z"):
            torch.testing.assert_close(g0[k][..., sl], g1[k][..., sl], rtol=0, atol=0)
    assert not torch.allclose(out0[..., 12:24], out1[..., 12:24])


# ------------------------------------------------------------------ errors

def base_args():
    inp, _ = make_inputs(2, 4, 10, 3, "var4", 2, seed=0)
    return inp


@pytest.mark.parametrize("change,exc,message", [
    (dict(u=torch.randn(4, 10)), ValueError, r"u must have shape \(\*, \*, \*\), got \(4, 10\)"),
    (dict(delta=torch.randn(2, 4, 9)), ValueError, r"delta must have shape \(2, 4, 10\), got \(2, 4, 9\)"),
    (dict(A=torch.randn(5, 3)), ValueError, r"A must have shape \(4, \*\), got \(5, 3\)"),
    (dict(A=-torch.rand(4, 3, dtype=torch.complex64)), NotImplementedError, "complex A is not supported"),
    (dict(A=-torch.rand(4, 300)), ValueError, "1..256 state dims"),
    (dict(B=torch.randn(2, 3, 3, 10)), ValueError, "B has 3 groups, which must divide dim=4"),
    (dict(C=torch.randn(2, 4, 3, 10)), ValueError, r"B and C must have the same number of groups, got \[2, 4\]"),
    (dict(B=torch.randn(2, 3, 11)), ValueError, r"B must have shape \(2, 3, 10\), got \(2, 3, 11\)"),
    (dict(D=torch.randn(3)), ValueError, r"D must have shape \(4\), got \(3,\)"),
    (dict(z=torch.randn(2, 4, 11)), ValueError, r"z must have shape \(2, 4, 10\)"),
    (dict(delta_bias=torch.randn(4, dtype=torch.float16)), ValueError, "delta_bias must have dtype in"),
    (dict(seq_idx=torch.zeros(2, 10)), ValueError, "seq_idx must have dtype in"),
    (dict(seq_idx=torch.zeros(2, 9, dtype=torch.int32)), ValueError, r"seq_idx must have shape \(2, 10\)"),
    (dict(discretization="euler"), ValueError, "discretization must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_raise_clear_errors(change, exc, message):
    args = dict(base_args(), **change)
    with pytest.raises(exc, match=message):
        selective_scan_fn(**args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_only_errors():
    args = base_args()
    with pytest.raises(ValueError, match="bilinear.*torch and ref backends only"):
        selective_scan_fn(**args, discretization="bilinear", backend="triton")
    a64 = {k: (v.double() if v is not None else None) for k, v in args.items()}
    with pytest.raises(ValueError, match="use backend='torch' or 'ref' for float64"):
        selective_scan_fn(**a64, backend="triton")


def test_default_backend_and_override():
    inp, _ = make_inputs(1, 2, 5, 2, "var4", 1, seed=0)
    assert kernels._utils.resolve_backend(None, inp["u"]) == "torch"  # CPU tensors
    with kernels.use_backend("ref"):
        assert kernels._utils.resolve_backend(None, inp["u"]) == "ref"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("fast")
    assert math.isfinite(selective_scan_fn(**inp).sum().item())
