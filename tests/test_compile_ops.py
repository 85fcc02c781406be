"""The Mamba kernels inside torch.compile (kernels/compile_ops.py): one custom-op node per call, no graph break.

- opcheck: schemas, fake implementations (static and dynamic shapes) and autograd registrations.
- Compiled vs eager, forward and every gradient, both ops, optional arguments on and off, torch and triton
  backends (Triton's interpreter on CPU): the compiled graph runs the same eager kernels (the backward
  recomputes the forward with them), so results agree to the last bit but for the fp32 rounding of the
  surrounding ops that AOTAutograd may decompose; rtol/atol 1e-5 allows that and nothing more.
- No graph break and the op present in the graph, for the public functions, the Mamba / Mamba2 modules and
  train_gpt's MoT+Mamba model. Compiles use backend="aot_eager" (dynamo, fake tensors, AOTAutograd: every
  piece of the op registration) because Inductor's C++ codegen takes minutes on CPU; one Inductor test checks
  that the real outputs' strides are the ones the fake implementations declare (Inductor asserts them).
"""
import pytest
import torch
from torch.utils._pytree import tree_leaves

import kernels
from helpers import CUDA, TRITON_DEVICE
from kernels.compile_ops import selective_scan_fwd, ssd_fwd

SCAN_OP = torch.ops.nanogpt_mamba.selective_scan_fwd.default
SSD_OP = torch.ops.nanogpt_mamba.ssd_fwd.default
TOL = dict(rtol=1e-5, atol=1e-5)


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
        seq = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=device)[:, :L]
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
                  seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7], device=device)[:, :L], dt_softplus=True,
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


def compiled_vs_eager(fn, kw, backend="aot_eager"):
    """fn(**kw) compiled (fullgraph: a graph break fails) against eager: outputs and every input gradient."""
    inputs = [v for v in tree_leaves(kw) if isinstance(v, torch.Tensor) and v.requires_grad]
    eager = fn(**kw)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)(**kw)
    for e, c in zip(eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape
        torch.testing.assert_close(c, e, **TOL)
    eager_grads = torch.autograd.grad(weighted_sum(eager), inputs)
    for e, c in zip(eager_grads, torch.autograd.grad(weighted_sum(compiled), inputs)):
        torch.testing.assert_close(c, e, **TOL)


def graph_ops(fn, *args, **kwargs):
    """(graph breaks, custom Mamba ops in the captured graphs) from dynamo's explain."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args, **kwargs)
    ops = [n.target for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    return ex.graph_break_count, [op for op in ops if op in (SCAN_OP, SSD_OP)]


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
    compiled_vs_eager(scan_outputs, dict(scan_args(options, device_of(backend)), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", ["none", "all"])
def test_compiled_ssd_matches_eager(options, backend):
    # chunk 64 for triton (its kernels take 64, 128 or 256): L = 7 is then one partial chunk
    kw = dict(ssd_args(options, device_of(backend)), backend=backend)
    compiled_vs_eager(ssd_outputs, dict(kw, chunk_size=64) if backend == "triton" else kw)


def both_outputs(scan, ssd):
    return scan_outputs(**scan) + ssd_outputs(**ssd)


def test_inductor_runs_the_ops_with_declared_strides():
    """Inductor asserts every extern kernel output's size and stride against the fake implementation."""
    compiled_vs_eager(both_outputs, dict(scan=scan_args("all"), ssd=ssd_args("all")), backend="inductor")


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
    assert breaks == 0 and ops == [SCAN_OP if kind == "mamba" else SSD_OP]
    params = list(module.parameters())
    eager = module(x, seq_idx=seq_idx)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x, seq_idx=seq_idx)
    torch.testing.assert_close(compiled, eager, **TOL)
    w = torch.randn_like(eager)
    for c, e in zip(torch.autograd.grad((compiled * w).sum(), params), torch.autograd.grad((eager * w).sum(), params)):
        torch.testing.assert_close(c, e, **TOL)


def mot_model(mot):
    import train_gpt as tg
    from test_mot import tiny
    torch.manual_seed(0)
    model = tg.GPT(tiny(mot=mot), max_seq_len=256)
    with torch.no_grad():  # the zero-initialised projections would leave the char path without gradient
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    seq = torch.randint(0, 50257, (64,))
    seq[[0, 30]] = 50256  # three documents
    return model, (seq, torch.randint(0, 50257, (64,)), torch.tensor(2, dtype=torch.int32), True)


@pytest.mark.parametrize("mot", ["cross+mamba", "cross+mamba2"])
def test_mot_mamba_model_has_no_graph_break(mot):
    model, args = mot_model(mot)
    breaks, ops = graph_ops(model, *args)
    assert breaks == 0 and ops == [SCAN_OP if mot == "cross+mamba" else SSD_OP]


def test_mot_mamba_model_compiled_matches_eager():
    """The whole GPT with the char Mamba (dense masks: flex attention needs CUDA), forward and backward."""
    model, args = mot_model("cross+mamba")
    params = [p for p in model.parameters()]
    eager = model(*args)
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)(*args)
    compiled_grads = torch.autograd.grad(compiled, params, allow_unused=True)
    torch.testing.assert_close(compiled, eager, **TOL)
    mixer = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("mot.encoder.mixer.")]
    assert mixer and all(eager_grads[i] is not None and eager_grads[i].abs().sum() > 0 for i in mixer)
    for c, e in zip(compiled_grads, eager_grads):
        assert (c is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
