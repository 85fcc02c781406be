"""The Mamba kernels inside torch.compile (kernels/compile_ops.py): one custom-op node per call, no graph break.

- opcheck: schemas, fake implementations (static and dynamic shapes) and autograd registrations.
- Compiled vs eager, forward and every gradient, both ops, optional arguments on and off, torch and triton
  backends (Triton's interpreter on CPU): the compiled graph runs the same eager kernels, so results agree to
  the last bit but for the fp32 rounding of the surrounding ops that AOTAutograd and Inductor decompose or
  fuse (measured: 0 for the ops alone, 7e-7 in the MoT model); a norm-relative error of 1e-5 allows that and
  nothing more.
- Saved residuals (scan and SSD: torch and triton backends; the Triton ones through the interpreter on CPU at
  tiny shapes, the SSD's with chunk 64 and L = 70): the backward op runs the backend's own
  backward from the forward's residuals, checked by counting forward calls while the backward runs (none),
  bit for bit against eager, and in float64 against the ref backend; several pieces / chunks / blocks
  (budgets shrunk by monkeypatch), dynamic shapes, the ref backend's recompute path kept.
- No graph break and the op present in the graph, for the public functions, the Mamba / Mamba2 modules and
  train_gpt's MoT+Mamba model. Compiles use backend="aot_eager" (dynamo, fake tensors, AOTAutograd: every
  piece of the op registration) because Inductor's C++ codegen takes minutes on CPU; one Inductor test checks
  that the real outputs' strides are the ones the fake implementations declare (Inductor asserts them).
"""
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._pytree import tree_leaves

import kernels
from helpers import CUDA, TRITON_DEVICE, rel
from kernels import compile_ops
from kernels.compile_ops import selective_scan_bwd_saved, selective_scan_fwd, ssd_bwd_saved, ssd_fwd
from kernels.selective_scan import torch_scan
from kernels.ssd import torch_ssd_fast

SCAN_OP = torch.ops.nanogpt_mamba.selective_scan_fwd.default
SSD_OP = torch.ops.nanogpt_mamba.ssd_fwd.default
TOL = 1e-5  # norm-relative (tests/helpers.rel); see the module docstring


def leaf(*shape, device="cpu", scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def scan_args(options, device="cpu", L=7):
    """selective_scan_fn keyword arguments; options: "none" (time-invariant B, C, nothing optional),
    "all" (grouped input-dependent B, C, D, z, delta_bias, softplus, seq_idx)."""
    torch.manual_seed(0)
    batch, dim, N = 2, 4, 3
    kw = dict(u=leaf(batch, dim, L, device=device), delta=leaf(batch, dim, L, device=device, scale=0.5),
              A=(-torch.rand(dim, N, device=device) - 0.5).requires_grad_())
    if options == "none":
        kw.update(B=leaf(dim, N, device=device), C=leaf(dim, N, device=device), delta=kw["delta"].detach().abs()
                  .requires_grad_())
    else:
        seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=device)[:, :L].clone()
        kw.update(B=leaf(batch, 2, N, L, device=device), C=leaf(batch, 2, N, L, device=device),
                  D=leaf(dim, device=device), z=leaf(batch, dim, L, device=device),
                  delta_bias=leaf(dim, device=device, scale=0.5), delta_softplus=True, seq_idx=seq)
    return kw


def ssd_args(options, device="cpu", L=7):
    """mamba_chunk_scan_combined keyword arguments (chunk 4: L = 7 leaves a partial chunk); options "none"
    or "all" (D per channel, z, dt_bias, initial states, seq_idx, softplus, dt_limit)."""
    torch.manual_seed(1)
    batch, H, P, G, N = 2, 4, 2, 2, 3
    kw = dict(x=leaf(batch, L, H, P, device=device), dt=leaf(batch, L, H, device=device, scale=0.5),
              A=(-torch.rand(H, device=device) - 0.5).requires_grad_(), B=leaf(batch, L, G, N, device=device),
              C=leaf(batch, L, G, N, device=device), chunk_size=4)
    if options == "none":
        kw["dt"] = kw["dt"].detach().abs().requires_grad_()
    else:
        kw.update(D=leaf(H, P, device=device), z=leaf(batch, L, H, P, device=device),
                  dt_bias=leaf(H, device=device, scale=0.5), initial_states=leaf(batch, H, P, N, device=device),
                  seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=device)[:, :L].clone(),
                  dt_softplus=True,
                  dt_limit=(0.01, 2.0))
    return kw


def scan_outputs(**kw):
    return kernels.selective_scan_fn(**kw, return_last_state=True)


def ssd_outputs(**kw):
    return kernels.mamba_chunk_scan_combined(**kw, return_final_states=True)


def weighted_sum(outputs, seed=5):
    """A scalar reading every output with fixed random weights (a plain sum would hide sign errors)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outputs)


def check_compiled(fn, kwargs, wrt, expected_ops, backend="aot_eager"):
    """fn(**kwargs) compiled with fullgraph=True (a graph break raises) calls exactly `expected_ops` and
    matches eager (assert_same). Returns the eager gradients."""
    found = []

    def recording(gm, example_inputs):  # the last graph dynamo hands over (it may restart a trace)
        found[:] = [n.target for n in gm.graph.nodes if n.target in (SCAN_OP, SSD_OP)]
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording, fullgraph=True, dynamic=False)
    grads = assert_same(fn, compiled, kwargs, wrt)
    assert found == expected_ops, found
    return grads


def assert_same(fn, compiled, kwargs, wrt):
    """compiled(**kwargs) equals fn(**kwargs): outputs (dtype, shape, values) and the gradients with respect
    to `wrt` of a weighted sum of them. Returns the eager gradients."""
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    eager, compiled = as_tuple(fn(**kwargs)), as_tuple(compiled(**kwargs))
    for e, c in zip(eager, compiled, strict=True):
        assert c.dtype == e.dtype and c.shape == e.shape
        assert rel(c, e) < TOL
    eager_grads = torch.autograd.grad(weighted_sum(eager), wrt, allow_unused=True)
    for e, c in zip(eager_grads, torch.autograd.grad(weighted_sum(compiled), wrt, allow_unused=True)):
        assert (c is None) == (e is None)
        assert e is None or rel(c, e) < TOL
    return eager_grads


def graph_ops(fn, *args, **kwargs):
    """(graph breaks, custom Mamba ops in the captured graphs) from dynamo's explain."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    ops = [n.target for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    return ex.graph_break_count, [op for op in ops if op in (SCAN_OP, SSD_OP)]


def requiring_grad(kwargs):
    return [v for v in tree_leaves(kwargs) if isinstance(v, torch.Tensor) and v.requires_grad]


# Under Triton's interpreter one scan forward + backward takes ~8 s at these shapes (measured on the shared
# 2-core machine), so the triton cases run where there is a GPU.
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not CUDA, reason="triton backend through the interpreter is too slow for this file; runs on CUDA"))]


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


# ---------------------------------------------------------------- op registrations

@pytest.mark.parametrize("options", ["none", "all"])
def test_opcheck_selective_scan(options):
    kw = scan_args(options)
    torch.library.opcheck(selective_scan_fwd, (
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw.get("D"), kw.get("z"), kw.get("delta_bias"),
        kw.get("seq_idx"), kw.get("delta_softplus", False), "zoh" if options == "all" else "bilinear", "torch"))


@pytest.mark.parametrize("options", ["none", "all"])
def test_opcheck_ssd(options):
    kw = ssd_args(options)
    torch.library.opcheck(ssd_fwd, (
        kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw.get("D"), kw.get("z"), kw.get("dt_bias"),
        kw.get("initial_states"), kw.get("seq_idx"), kw["chunk_size"], kw.get("dt_softplus", False),
        list(kw.get("dt_limit", (0.0, float("inf")))), "torch"))


# ---------------------------------------------------------------- compiled == eager

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ["none", "all"])
def test_compiled_selective_scan_matches_eager(options, backend):
    kw = dict(scan_args(options, device_of(backend)), backend=backend)
    check_compiled(scan_outputs, kw, requiring_grad(kw), [SCAN_OP])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ["none", "all"])
def test_compiled_ssd_matches_eager(options, backend):
    # chunk 64 for triton (its kernels take 64, 128 or 256): L = 7 is then one partial chunk
    kw = dict(ssd_args(options, device_of(backend)), backend=backend)
    kw = dict(kw, chunk_size=64) if backend == "triton" else kw
    check_compiled(ssd_outputs, kw, requiring_grad(kw), [SSD_OP])


def cast(kw, names, dtype):
    return dict(kw, **{k: kw[k].detach().to(dtype).requires_grad_() for k in names})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_compiled_dtypes_match_eager(dtype):
    """Outputs in the input's dtype, states float32 (float64 for float64 inputs), gradients in each input's."""
    fp64 = dtype == torch.float64  # A, D and the biases take float32 or float64 only
    scan = cast(scan_args("all"), ("u", "delta", "B", "C", "z") + (("A", "D", "delta_bias") if fp64 else ()), dtype)
    ssd = cast(ssd_args("all"), ("x", "dt", "B", "C", "z") + (("A", "D", "dt_bias") if fp64 else ()), dtype)
    check_compiled(both_outputs, dict(scan=scan, ssd=ssd), requiring_grad([scan, ssd]), [SCAN_OP, SSD_OP])


def both_outputs(scan, ssd):
    return scan_outputs(**scan) + ssd_outputs(**ssd)


def test_inductor_runs_the_ops_with_declared_strides():
    """Inductor asserts every extern kernel output's size and stride against the fake implementation."""
    kw = dict(scan=scan_args("all"), ssd=ssd_args("all"))
    check_compiled(both_outputs, kw, requiring_grad(kw), [SCAN_OP, SSD_OP], backend="inductor")


def test_one_dynamic_shape_graph_serves_several_lengths():
    """Symbolic lengths reach the fake implementations (which then leave the argument checks to the op)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(both_outputs, backend=counter, fullgraph=True, dynamic=True)
    graphs = []
    for L in (7, 5, 6):
        kw = dict(scan=scan_args("all", L=L), ssd=ssd_args("all", L=L))
        assert_same(both_outputs, compiled, kw, requiring_grad(kw))
        graphs.append(counter.frame_count)  # dynamo may restart the first trace once (symbolic floats)
    assert graphs[0] == graphs[-1]


def test_bad_input_raises_the_eager_error_while_compiling():
    kw = scan_args("all")
    kw["delta"] = kw["delta"][:, :3]
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"delta must have shape \(2, 4, 7\)"):
        torch.compile(scan_outputs, backend="aot_eager", fullgraph=True)(**kw)


# ---------------------------------------------------------------- no graph breaks

def test_public_functions_are_one_graph_node_each():
    breaks, ops = graph_ops(both_outputs, scan_args("all"), ssd_args("all"))
    assert breaks == 0 and ops == [SCAN_OP, SSD_OP]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_modules_compile_without_graph_breaks(kind):
    torch.manual_seed(0)
    module = (kernels.Mamba(16, d_state=4) if kind == "mamba" else
              kernels.Mamba2(16, d_state=8, headdim=8, chunk_size=4))
    x = torch.randn(2, 9, 16)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int32)
    breaks, ops = graph_ops(module, x, seq_idx=seq_idx)
    op = SCAN_OP if kind == "mamba" else SSD_OP
    assert breaks == 0 and ops == [op]
    check_compiled(module, dict(hidden_states=x, seq_idx=seq_idx) if kind == "mamba" else dict(u=x, seq_idx=seq_idx),
                   list(module.parameters()), [op])


def mot_model(mot):
    import train_gpt as tg
    from test_mot import tiny
    torch.manual_seed(0)
    a = tiny(mot=mot, num_layers=6, window_pattern="LSSSSL", no_attn_layers="")  # the fewest layers allowed
    model = tg.GPT(a, max_seq_len=256)
    with torch.no_grad():  # the zero-initialised projections would leave the char path without gradient
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    seq = torch.randint(0, 50257, (64,))
    seq[[0, 30]] = tg.EOT_ID  # two documents, each starting with its EOT
    return model, dict(input_seq=seq, target_seq=torch.randint(0, 50257, (64,)),
                       window_blocks=torch.tensor(2, dtype=torch.int32), dense_mask=True)


def test_mot_mamba2_encoder_has_no_graph_break():
    """The MoT input embedding with the char Mamba2 (the whole GPT is compiled for Mamba below; tracing it
    again costs ~5 s and adds no Mamba2 code)."""
    model, args = mot_model("cross+mamba2")
    seq = args["input_seq"]
    breaks, ops = graph_ops(model.mot, seq, model.embed(seq))
    assert breaks == 0 and ops == [SSD_OP]


def test_mot_mamba_model_compiles_without_graph_breaks():
    """The whole GPT with the char Mamba (dense masks: flex attention needs CUDA), forward and backward
    compiled as one graph that calls the scan op, equal to eager."""
    model, args = mot_model("cross+mamba")
    names, params = zip(*model.named_parameters())
    grads = check_compiled(model, args, params, [SCAN_OP])
    mixer = [g for n, g in zip(names, grads) if n.startswith("mot.encoder.mixer.")]
    assert mixer and all(g is not None and g.abs().sum() > 0 for g in mixer)  # the char Mamba gets gradients


# ---------------------------------------------------------------- the scan op's saved residuals (torch backend)

@pytest.fixture
def short_pieces(monkeypatch):
    """Pieces of 4 steps (at these sizes the torch scan's pieces are otherwise ~5000 steps long, one piece):
    several start states saved, a partial last piece. The fake implementation counts pieces the same way."""
    monkeypatch.setattr(torch_scan, "BACKWARD_BUDGET", 1)
    monkeypatch.setattr(torch_scan, "MIN_PIECE_STEPS", 4)


@pytest.fixture
def forward_calls(monkeypatch):
    """Counts calls of the torch scan's piece forwards (zoh and the other discretizations) and of
    compile_ops' eager recompute, the work a recomputing backward would do."""
    calls = []

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped
    for module, name in ((torch_scan, "_piece_forward"), (torch_scan, "_segment_fast"), (compile_ops, "_scan_eager")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return calls


def residual_args(options, dtype, L, seed=3):
    """Fresh random selective_scan_fn arguments in `dtype`; options: a set of "seq_idx", "D", "z", "delta_bias"
    (each on or off), B and C input-dependent with 2 groups, time-invariant with "fixed_BC"."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, N = 2, 4, 3
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()  # noqa: E731
    kw = dict(u=r(batch, dim, L), delta=r(batch, dim, L, scale=0.5),
              A=(-torch.rand(dim, N, generator=g, dtype=dtype) - 0.5).requires_grad_(),
              B=r(dim, N) if "fixed_BC" in options else r(batch, 2, N, L),
              C=r(dim, N) if "fixed_BC" in options else r(batch, 2, N, L), delta_softplus=True, backend="torch")
    if "D" in options:
        kw["D"] = r(dim)
    if "z" in options:
        kw["z"] = r(batch, dim, L)
    if "delta_bias" in options:
        kw["delta_bias"] = r(dim, scale=0.5)
    if "seq_idx" in options:  # three documents in row 0 (the second starts mid-piece), one in row 1
        kw["seq_idx"] = torch.tensor([[0] * (L // 3) + [1] * (L // 3) + [2] * (L - 2 * (L // 3)), [0] * L])
    return kw


def weighted_loss(out, last, last_weight=1.0):
    """A scalar reading out and the last state with fixed random weights."""
    g = torch.Generator().manual_seed(9)
    w_out, w_last = torch.randn(out.shape, generator=g).to(out), torch.randn(last.shape, generator=g).to(last)
    return (out * w_out).sum() + last_weight * (last * w_last).sum()


def outputs_and_grads(fn, kw, last_weight=1.0):
    """fn's (out, last state) and the gradients of weighted_loss w.r.t. every input needing one."""
    out, last = fn(**kw)
    return (out, last), torch.autograd.grad(weighted_loss(out, last, last_weight), requiring_grad(kw))


RESIDUAL_OPTIONS = [set(), {"seq_idx"}, {"D", "z", "delta_bias"}, {"seq_idx", "D", "z", "delta_bias"},
                    {"z", "fixed_BC"}]


@pytest.mark.parametrize("options", RESIDUAL_OPTIONS, ids=lambda o: "+".join(sorted(o)) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_scan_backward_uses_the_saved_residuals(options, dtype, short_pieces, forward_calls):
    """torch backend: the backward op runs the hand-written backward from the forward's residuals (no forward
    call of any kind while it runs), bit-identical to eager; float64 matches the sequential reference."""
    L = 11  # pieces of 4, 4, 3 steps
    kw = residual_args(options, dtype, L)
    torch._dynamo.reset()
    compiled = torch.compile(scan_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    out, last = compiled(**kw)
    assert forward_calls == ["_piece_forward"] * 3  # one per piece, straight from the op (no eager dispatch)
    forward_calls.clear()
    compiled_grads = torch.autograd.grad(weighted_loss(out, last), requiring_grad(kw))
    assert forward_calls == []
    eager, eager_grads = outputs_and_grads(scan_outputs, kw)
    for c, e in zip((out, last, *compiled_grads), (*eager, *eager_grads), strict=True):
        assert c.dtype == e.dtype and c.shape == e.shape and torch.equal(c, e)
    if dtype == torch.float64:  # the last state's gradient is not propagated by the torch backend: out only
        ref, ref_grads = outputs_and_grads(scan_outputs, dict(kw, backend="ref"), last_weight=0.0)
        _, got_grads = outputs_and_grads(compiled, kw, last_weight=0.0)
        for c, e in zip((out, last, *got_grads), (*ref, *ref_grads), strict=True):
            assert rel(c, e) < 1e-12


@pytest.mark.parametrize("discretization", ["bilinear", "zoh_exact"])
def test_compiled_scan_other_discretizations_recompute_per_piece_only(discretization, short_pieces, forward_calls):
    """The other discretizations' eager backward recomputes each piece under autograd from its saved start
    state (torch_scan._segment); compiled, it does the same inside the op, with no whole forward."""
    kw = dict(residual_args({"seq_idx", "D", "z", "delta_bias"}, torch.float64, 10), discretization=discretization)
    torch._dynamo.reset()
    compiled = torch.compile(scan_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    got, got_grads = outputs_and_grads(compiled, kw)
    assert forward_calls == ["_segment_fast"] * 3  # the forward's pieces only
    eager, eager_grads = outputs_and_grads(scan_outputs, kw)
    for c, e in zip((*got, *got_grads), (*eager, *eager_grads), strict=True):
        assert torch.equal(c, e)
    ref, ref_grads = outputs_and_grads(scan_outputs, dict(kw, backend="ref"), last_weight=0.0)
    _, got_grads = outputs_and_grads(compiled, kw, last_weight=0.0)
    for c, e in zip((*got, *got_grads), (*ref, *ref_grads), strict=True):
        assert rel(c, e) < 1e-12


def test_compiled_scan_residuals_under_dynamic_shapes(short_pieces):
    """Symbolic lengths: the fake implementation's piece count (2 to 4 pieces here) follows the length."""
    torch._dynamo.reset()
    compiled = torch.compile(scan_outputs, backend="aot_eager", fullgraph=True, dynamic=True)
    for L in (9, 6, 13, 8, 1):
        kw = residual_args({"seq_idx", "D", "z", "delta_bias"}, torch.float32, L)
        got, got_grads = outputs_and_grads(compiled, kw)
        eager, eager_grads = outputs_and_grads(scan_outputs, kw)
        for c, e in zip((*got, *got_grads), (*eager, *eager_grads), strict=True):
            assert rel(c, e) < TOL


def test_other_backends_keep_the_recompute(forward_calls):
    """The ref backend saves no residuals: empty residual outputs, the backward recomputes."""
    kw = dict(residual_args({"seq_idx", "D", "z"}, torch.float32, 6), backend="ref")
    _, _, y_pre, starts = selective_scan_fwd(*(kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                    "delta_bias", "seq_idx")), True, "zoh", "ref")
    assert y_pre.shape == starts.shape == (0,)
    forward_calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(scan_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    got, got_grads = outputs_and_grads(compiled, kw)
    assert forward_calls.count("_scan_eager") == 2  # forward, then the backward's recompute
    eager, eager_grads = outputs_and_grads(scan_outputs, kw)
    for c, e in zip((*got, *got_grads), (*eager, *eager_grads), strict=True):
        assert rel(c, e) < TOL


@pytest.mark.parametrize("L", [12, 10])
def test_opcheck_scan_with_residuals(L, short_pieces):
    """Both ops with several pieces (a whole number of pieces, and a partial last one): the fake
    implementations' residual shapes (piece count) and the backward op's registration."""
    kw = residual_args({"seq_idx", "D", "z", "delta_bias"}, torch.float32, L)
    args = [kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "seq_idx")]
    torch.library.opcheck(selective_scan_fwd, (*args, True, "zoh", "torch"))
    detached = [a.detach() if a is not None and a.is_floating_point() else a for a in args]
    out, last, y_pre, starts = selective_scan_fwd(*detached, True, "zoh", "torch")
    assert y_pre.shape == (2, 4, L) and starts.shape == (3, 2, 4, 3)  # pieces of 4, 4, 4 / 4, 4, 2 steps
    torch.library.opcheck(selective_scan_bwd_saved, (torch.randn_like(out), *detached, y_pre, starts, True, "zoh",
                                                    "torch"))


def test_scan_backward_rejects_wrong_residuals(short_pieces):
    kw = residual_args({"z"}, torch.float32, 10)
    args = [kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args = [a.detach() if a is not None else None for a in args]
    out, _, y_pre, starts = torch_scan.scan_forward(*args, None, True, "zoh")
    with pytest.raises(ValueError, match=r"starts must have shape \(3, 2, 4, 3\)"):
        torch_scan.scan_backward(out, *args, None, y_pre, starts[:2], True, "zoh")
    with pytest.raises(ValueError, match=r"y_pre must have shape \(2, 4, 10\)"):
        torch_scan.scan_backward(out, *args, None, None, starts, True, "zoh")


def test_compiled_scan_triton_backward_uses_the_saved_boundaries(monkeypatch):
    """triton: the forward op keeps the kernels' boundary states (batch, dim, chunks + 1, N) and the backward op
    hands them to triton_scan.selective_scan_bwd: no forward kernel runs in the backward; bit-identical to
    eager. Chunks of 8 steps (2 here, the last partial); tiny shapes for Triton's interpreter on a CPU."""
    from kernels.selective_scan import triton_scan
    calls = []
    forward = triton_scan.selective_scan_fwd
    monkeypatch.setattr(triton_scan, "selective_scan_fwd", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(triton_scan, "chunk_size", lambda dstate: 8)
    kw = residual_args({"seq_idx", "D", "z", "delta_bias"}, torch.float32, 11)
    kw = {k: v.detach().to(TRITON_DEVICE).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
          for k, v in kw.items()}
    kw["backend"] = "triton"
    torch._dynamo.reset()
    compiled = torch.compile(scan_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    fake = torch._subclasses.FakeTensorMode()
    with fake:  # the fake implementation's residual shapes
        fk = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        residuals = selective_scan_fwd(*(fk.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                                             "seq_idx")), True, "zoh", "triton")[2:]
    assert [tuple(r.shape) for r in residuals] == [(0,), (2, 4, 3, 3)]
    out, last = compiled(**kw)
    assert len(calls) == 1
    calls.clear()
    compiled_grads = torch.autograd.grad(weighted_loss(out, last), requiring_grad(kw))
    assert calls == []
    eager, eager_grads = outputs_and_grads(scan_outputs, kw)
    for c, e in zip((out, last, *compiled_grads), (*eager, *eager_grads), strict=True):
        assert c.dtype == e.dtype and c.shape == e.shape and torch.equal(c, e)


# ---------------------------------------------------------------- the SSD op's saved states (torch backend)

@pytest.fixture
def one_chunk_blocks(monkeypatch):
    """Blocks of one chunk in the SSD core (at these sizes one block otherwise holds the whole sequence, and
    the eager forward keeps that block's tensors): per-block states carried, a partial last chunk."""
    monkeypatch.setattr(torch_ssd_fast, "BLOCK_BYTES", 1)


@pytest.fixture
def ssd_forward_calls(monkeypatch):
    """Counts calls of the SSD core's forward (eager SSDCore and the compiled op both go through
    torch_ssd_fast.core_forward) and of compile_ops' eager recompute."""
    calls = []
    core_forward, eager = torch_ssd_fast.core_forward, compile_ops._ssd_eager
    monkeypatch.setattr(torch_ssd_fast, "core_forward",
                        lambda *a, **k: calls.append("core_forward") or core_forward(*a, **k))
    monkeypatch.setattr(compile_ops, "_ssd_eager", lambda *a: calls.append("_ssd_eager") or eager(*a))
    return calls


def ssd_residual_args(options, dtype, L, seed=4):
    """Fresh random mamba_chunk_scan_combined arguments in `dtype` (chunk 4, 4 heads in 2 groups); options: a
    set of "seq_idx", "D" (per head and channel; "D1" per head), "z", "dt_bias", "initial_states", "limits"
    (dt_softplus and dt_limit)."""
    g = torch.Generator().manual_seed(seed)
    batch, H, P, G, N = 2, 4, 2, 2, 3
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()  # noqa: E731
    kw = dict(x=r(batch, L, H, P), dt=(torch.rand(batch, L, H, generator=g, dtype=dtype) * 0.5).requires_grad_(),
              A=(-torch.rand(H, generator=g, dtype=dtype) - 0.5).requires_grad_(), B=r(batch, L, G, N),
              C=r(batch, L, G, N), chunk_size=4, backend="torch")
    if "D" in options:
        kw["D"] = r(H, P)
    if "D1" in options:
        kw["D"] = r(H)
    if "z" in options:
        kw["z"] = r(batch, L, H, P)
    if "dt_bias" in options:
        kw["dt_bias"] = r(H, scale=0.5)
    if "initial_states" in options:
        kw["initial_states"] = r(batch, H, P, N)
    if "limits" in options:
        kw.update(dt_softplus=True, dt_limit=(0.01, 2.0))
    if "seq_idx" in options:  # row 0: documents starting mid-chunk and on a chunk border (step 4)
        kw["seq_idx"] = torch.tensor([([0] * 2 + [1] * 2 + [2] * L)[:L], [0] * L])
    return kw


def ssd_outputs_and_grads(fn, kw):
    y, final = fn(**kw)
    return (y, final), torch.autograd.grad(weighted_loss(y, final), requiring_grad(kw))


SSD_RESIDUAL_OPTIONS = [set(), {"seq_idx"}, {"D", "z", "dt_bias", "limits"}, {"D1", "initial_states"},
                        {"seq_idx", "D", "z", "dt_bias", "initial_states", "limits"}]


@pytest.mark.parametrize("options", SSD_RESIDUAL_OPTIONS, ids=lambda o: "+".join(sorted(o)) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_ssd_backward_uses_the_saved_states(options, dtype, one_chunk_blocks, ssd_forward_calls):
    """torch backend: the backward op runs the core's hand-written backward from the forward's per-chunk
    incoming states (no forward of the core, no eager recompute while it runs), bit-identical to eager;
    float64 matches the sequential reference."""
    L = 11  # chunks of 4, 4, 3 steps, one block each
    kw = ssd_residual_args(options, dtype, L)
    torch._dynamo.reset()
    compiled = torch.compile(ssd_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    y, final = compiled(**kw)
    assert ssd_forward_calls == ["core_forward"]
    ssd_forward_calls.clear()
    compiled_grads = torch.autograd.grad(weighted_loss(y, final), requiring_grad(kw))
    assert ssd_forward_calls == []
    eager, eager_grads = ssd_outputs_and_grads(ssd_outputs, kw)
    for c, e in zip((y, final, *compiled_grads), (*eager, *eager_grads), strict=True):
        assert c.dtype == e.dtype and c.shape == e.shape and torch.equal(c, e)
    if dtype == torch.float64:
        ref, ref_grads = ssd_outputs_and_grads(ssd_outputs, dict(kw, backend="ref"))
        for c, e in zip((y, final, *compiled_grads), (*ref, *ref_grads), strict=True):
            assert rel(c, e) < 1e-12


def test_compiled_ssd_states_under_dynamic_shapes(one_chunk_blocks):
    """Symbolic lengths: the fake implementation's chunk count (1 to 4 chunks here) follows the length."""
    torch._dynamo.reset()
    compiled = torch.compile(ssd_outputs, backend="aot_eager", fullgraph=True, dynamic=True)
    for L in (9, 6, 13, 8, 1):
        kw = ssd_residual_args({"seq_idx", "D", "z", "dt_bias", "initial_states", "limits"}, torch.float32, L)
        got, got_grads = ssd_outputs_and_grads(compiled, kw)
        eager, eager_grads = ssd_outputs_and_grads(ssd_outputs, kw)
        for c, e in zip((*got, *got_grads), (*eager, *eager_grads), strict=True):
            assert rel(c, e) < TOL


def test_ssd_other_backends_keep_the_recompute(ssd_forward_calls):
    kw = dict(ssd_residual_args({"seq_idx", "D", "z"}, torch.float32, 6), backend="ref")
    torch._dynamo.reset()
    compiled = torch.compile(ssd_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    got, got_grads = ssd_outputs_and_grads(compiled, kw)
    assert ssd_forward_calls == ["_ssd_eager"] * 2  # forward, then the backward's recompute
    eager, eager_grads = ssd_outputs_and_grads(ssd_outputs, kw)
    for c, e in zip((*got, *got_grads), (*eager, *eager_grads), strict=True):
        assert rel(c, e) < TOL


SSD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "seq_idx")


@pytest.mark.parametrize("L", [12, 10])
def test_opcheck_ssd_with_states(L, one_chunk_blocks):
    kw = ssd_residual_args({"seq_idx", "D", "z", "dt_bias", "initial_states", "limits"}, torch.float32, L)
    args = [kw.get(k) for k in SSD_NAMES]
    rest = (4, True, [0.01, 2.0])
    torch.library.opcheck(ssd_fwd, (*args, *rest, "torch"))
    detached = [a.detach() if a is not None and a.is_floating_point() else a for a in args]
    y, final, y_core, h_in, dtp, cs = ssd_fwd(*detached, *rest, "torch")
    assert dtp.shape == cs.shape == (0,)  # the triton backend's residuals
    assert y_core.shape == (2, L, 4, 2) and h_in.shape == (2, 4, 3, 2, 3)  # chunks of 4, 4, 4 / 4, 4, 2
    torch.library.opcheck(ssd_bwd_saved, (torch.randn_like(y), torch.randn_like(final), *detached, y_core, h_in,
                                          *rest))
    with pytest.raises(ValueError, match=r"h_in must have shape \(2, 4, 3, 2, 3\)"):
        ssd_bwd_saved(torch.randn_like(y), None, *detached, y_core, h_in[:, :, :2], *rest)


# ---------------------------------------------------------------- the SSD op's saved residuals (triton backend)

@pytest.fixture
def triton_ssd_calls(monkeypatch):
    """Counts calls of the Triton SSD's forward launcher (eager and compiled both go through it) and of
    compile_ops' eager recompute."""
    from kernels.ssd import triton_ssd
    calls = []
    forward, eager = triton_ssd.ssd_triton_fwd, compile_ops._ssd_eager
    monkeypatch.setattr(triton_ssd, "ssd_triton_fwd", lambda *a: calls.append("ssd_triton_fwd") or forward(*a))
    monkeypatch.setattr(compile_ops, "_ssd_eager", lambda *a: calls.append("_ssd_eager") or eager(*a))
    return calls


def triton_ssd_args(options, dtype=torch.float32, L=70, batch=2):
    """ssd_residual_args on TRITON_DEVICE with chunk 64 (L = 70: a whole chunk and a partial one); x, dt, B, C,
    z and the initial states in `dtype`, A, D, dt_bias float32 (float64 with a 16-bit dtype: the launcher's
    fp32 casts both ways); seq_idx: row 0 a document crossing the chunk border, row 1 one starting on it. The
    first `batch` rows (1 or 2; the interpreter's time grows with batch * heads)."""
    kw = dict(ssd_residual_args(options - {"seq_idx"}, torch.float32, L, seed=6), chunk_size=64, backend="triton")
    if "seq_idx" in options:
        kw["seq_idx"] = torch.tensor([[0] * 30 + [1] * (L - 30), [0] * 64 + [1] * (L - 64)])
    low = ("x", "dt", "B", "C", "z", "initial_states")
    to = lambda k, v: v.to(dtype if k in low else torch.float64 if dtype.itemsize == 2 else v.dtype)  # noqa: E731
    kw = {k: v[:batch] if isinstance(v, torch.Tensor) and k not in ("A", "D", "dt_bias") else v for k, v in kw.items()}
    return {k: to(k, v.detach()).to(TRITON_DEVICE).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and
            v.is_floating_point() else v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


ALL_SSD = {"seq_idx", "D", "z", "dt_bias", "initial_states", "limits"}


@pytest.mark.parametrize("options,dtype,batch", [
    (set(), torch.float32, 1), (ALL_SSD, torch.float32, 2), (ALL_SSD - {"D"} | {"D1"}, torch.bfloat16, 1)],
    ids=["plain", "all", "all-D1-bf16"])
def test_compiled_ssd_triton_backward_uses_the_saved_residuals(options, dtype, batch, triton_ssd_calls):
    """triton: the forward op keeps ssd_triton_fwd's residuals (dtp, cs, hin, ypre) and the backward op runs
    ssd_triton_bwd on them: no forward launcher call and no eager recompute while the backward runs,
    forward and every gradient bit-identical to eager (bf16: A, D, dt_bias, initial states in bf16, their
    fp32 kernel gradients cast as eager autograd casts them); fp32 matches the float64 ref backend."""
    kw = triton_ssd_args(options, dtype, batch=batch)
    torch._dynamo.reset()
    compiled = torch.compile(ssd_outputs, backend="aot_eager", fullgraph=True, dynamic=False)
    y, final = compiled(**kw)
    assert triton_ssd_calls == ["ssd_triton_fwd"]  # straight from the op, no eager dispatch
    triton_ssd_calls.clear()
    compiled_grads = torch.autograd.grad(weighted_loss(y, final), requiring_grad(kw))
    assert triton_ssd_calls == []
    eager, eager_grads = ssd_outputs_and_grads(ssd_outputs, kw)
    assert len(compiled_grads) == len(eager_grads) == len(requiring_grad(kw))
    for c, e in zip((y, final, *compiled_grads), (*eager, *eager_grads), strict=True):
        assert c.dtype == e.dtype and c.shape == e.shape and torch.equal(c, e)
    if dtype == torch.float32:
        ref_kw = {k: v.detach().cpu().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and
                  v.is_floating_point() else v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        ref, ref_grads = ssd_outputs_and_grads(ssd_outputs, dict(ref_kw, backend="ref", chunk_size=4))
        for c, e in zip((y, final, *compiled_grads), (*ref, *ref_grads), strict=True):
            assert rel(c.cpu(), e) < 1e-5


def test_ssd_triton_residual_shapes_and_opcheck():
    """The fake implementation's residuals are ssd_triton_fwd's allocations (shapes, dtypes, strides): dtp and
    cs (batch * heads, chunks * 64) fp32, hin (batch * heads, chunks, headdim, dstate) and ypre (batch, L,
    heads, headdim) in x's dtype; opcheck of both ops (schemas, fakes, autograd registration); a wrong residual
    is a ValueError; a chunk size or dtype the kernels do not take raises while compiling."""
    kw = triton_ssd_args(ALL_SSD, L=70, batch=1)
    args = [kw.get(k) for k in SSD_NAMES]
    rest = (64, True, [0.01, 2.0])
    detached = [a.detach() if a is not None and a.is_floating_point() else a for a in args]
    real = ssd_fwd(*detached, *rest, "triton")
    fake = torch._subclasses.FakeTensorMode()
    with fake:
        fk = ssd_fwd(*(fake.from_tensor(a) if a is not None else None for a in detached), *rest, "triton")
    assert [tuple(r.shape) for r in real[2:]] == [(1, 70, 4, 2), (4, 2, 2, 3), (4, 128), (4, 128)]
    for r, f in zip(real, fk, strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    no_z = list(detached)
    no_z[SSD_NAMES.index("z")] = None
    assert ssd_fwd(*no_z, *rest, "triton")[2].shape == (0,)  # no gate: no ypre
    torch.library.opcheck(ssd_fwd, (*args, *rest, "triton"))  # incl. forward + backward with symbolic shapes
    y, final, *res = real
    torch.library.opcheck(compile_ops.ssd_bwd_triton, (torch.randn_like(y), torch.randn_like(final), *detached,
                                                       *res, *rest), test_utils=("test_faketensor",))
    y_core, h_in, dtp, cs = res
    with pytest.raises(ValueError, match=r"residuals must be dtp, cs \(4, 128\), hin \(4, 2, 2, 3\)"):
        compile_ops.ssd_bwd_triton(torch.randn_like(y), None, *detached, y_core, h_in[:, :1], dtp, cs, *rest)
    with fake:  # what compiling runs: the fake implementation's checks
        fk = [fake.from_tensor(a) if a is not None else None for a in detached]
        with pytest.raises(ValueError, match="chunk_size must be one of"):
            ssd_fwd(*fk, 32, *rest[1:], "triton")
        with pytest.raises(ValueError, match="float16/bfloat16/float32"):
            ssd_fwd(*(a.double() if a is not None and a.is_floating_point() else a for a in fk), *rest, "triton")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="ValueError.*chunk_size must be one of"):  # dynamo wraps it
        torch.compile(ssd_outputs, backend="aot_eager", fullgraph=True, dynamic=False)(**dict(kw, chunk_size=128 + 1))


def test_switching_the_global_backend_after_compiling_recompiles():
    """The backend is resolved while tracing (the residual outputs depend on it): a compiled function run
    under another global backend is traced again and matches eager with that backend."""
    from kernels._utils import use_backend
    for fn, kw in ((scan_outputs, scan_args("all")), (ssd_outputs, ssd_args("all"))):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
        assert_same(fn, compiled, kw, requiring_grad(kw))  # default: the torch backend on a CPU
        with use_backend("ref"):
            assert_same(fn, compiled, kw, requiring_grad(kw))
        assert counter.frame_count == 2


def test_default_backend_is_resolved_without_tracing_the_triton_import(monkeypatch):
    """Where triton is not installed the traced resolution must not trace the failing `import triton`
    (a fullgraph compile would fail); it is evaluated as a constant."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    torch._dynamo.reset()
    assert torch.compile(lambda x: x + compile_ops._triton_installed(), fullgraph=True,
                         backend="aot_eager")(torch.zeros(2)).tolist() == [0.0, 0.0]
