"""mamba_chunk_scan_combined's upstream parity (issue 17, item 2): mamba_ssm's argument order, cu_seqlens +
return_varlen_states (each packed sequence's final state), state_dtype, the return convention and errors.

Expected varlen states come from ssd_sequential_ref (the float64 recurrence, one step at a time) run on each
sequence alone: from initial_states for the sequence holding token 0, from zero otherwise. Float64 inputs:
the only differences are summation orders, so 1e-12 relative. fp32 triton inputs: the row's output is a chunked
fp32 sum against the float64 recurrence, 1e-5 relative as in tests/test_ssd.py.
"""
import inspect

import pytest
import torch

from helpers import TRITON_DEVICE, rel
from kernels import mamba_chunk_scan_combined, ssd_sequential_ref
from kernels._utils import triton_available
from kernels.compile_ops import ssd_compiled

# mamba_ssm e9594ce, mamba_ssm/ops/triton/ssd_combined.py: the parameter names in order
UPSTREAM_PARAMS = ["x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "initial_states", "seq_idx",
                   "cu_seqlens", "dt_softplus", "dt_limit", "return_final_states", "return_varlen_states",
                   "state_dtype"]
H, P, G, N = 4, 3, 2, 5


def inputs(L, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)  # noqa: E731
    A = -torch.rand(H, generator=gen, dtype=torch.float64).to(device, torch.promote_types(dtype, torch.float32))
    return dict(x=r(1, L, H, P), dt=r(1, L, H), A=A, B=r(1, L, G, N), C=r(1, L, G, N))


def seq_idx_of(cu_seqlens):
    return torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())[None]


def per_sequence_states(xs, cu_seqlens, seq_idx=None, initial_states=None, **opts):
    """Each sequence's final state, the float64 recurrence run on that sequence alone."""
    states = []
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if s == e:
            states.append(torch.zeros(H, P, N, dtype=torch.float64))
            continue
        part = {k: (v[:, s:e] if k != "A" else v).double().cpu() for k, v in xs.items()}
        _, final = ssd_sequential_ref(**part, seq_idx=None if seq_idx is None else seq_idx[:, s:e].cpu(),
                                      initial_states=initial_states.double().cpu() if s == 0 and initial_states
                                      is not None else None, return_final_states=True, **opts)
        states.append(final[0])
    return torch.stack(states)


OPTS = dict(dt_bias=torch.linspace(-1.0, 1.0, H, dtype=torch.float64), dt_softplus=True, dt_limit=(0.05, 3.0))
# lengths 1, 0 (empty), several spanning chunk boundaries (chunk 8 below, 64 for triton)
CU_SEQLENS = torch.tensor([0, 1, 10, 10, 30, 45])


@pytest.mark.parametrize("backend", ["torch", "ref"])
@pytest.mark.parametrize("with_seq_idx", [True, False])
@pytest.mark.parametrize("with_init", [True, False])
def test_varlen_states_are_each_sequences_final_state(backend, with_seq_idx, with_init):
    xs = inputs(45)
    init = torch.randn(1, H, P, N, dtype=torch.float64) if with_init else None
    seq_idx = seq_idx_of(CU_SEQLENS) if with_seq_idx else None
    out, final, varlen = mamba_chunk_scan_combined(
        **xs, chunk_size=8, initial_states=init, seq_idx=seq_idx, cu_seqlens=CU_SEQLENS, return_final_states=True,
        return_varlen_states=True, backend=backend, **OPTS)
    expected = per_sequence_states(xs, CU_SEQLENS, initial_states=init, **OPTS)
    assert varlen.shape == (5, H, P, N) and varlen.dtype == torch.float64
    assert rel(varlen, expected) < 1e-12
    assert varlen[2].abs().max() == 0  # the empty sequence
    # out and final states are those of the call without varlen states
    plain_out, plain_final = mamba_chunk_scan_combined(**xs, chunk_size=8, initial_states=init, seq_idx=seq_idx,
                                                       return_final_states=True, backend=backend, **OPTS)
    assert torch.equal(out, plain_out) and torch.equal(final, plain_final)
    if with_seq_idx:  # the row's final state is the last sequence's
        assert rel(final[0], varlen[-1]) < 1e-12


def test_varlen_states_honour_seq_idx_resets_inside_a_sequence():
    """A seq_idx change inside a cu_seqlens sequence restarts its state there, as the recurrence does."""
    xs = inputs(30, seed=1)
    cu_seqlens = torch.tensor([0, 12, 30])
    seq_idx = torch.tensor([[0] * 5 + [1] * 7 + [2] * 10 + [3] * 8])
    varlen = mamba_chunk_scan_combined(**xs, chunk_size=8, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                       return_varlen_states=True, backend="torch")[1]
    assert rel(varlen, per_sequence_states(xs, cu_seqlens, seq_idx=seq_idx)) < 1e-12


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_varlen_states_triton_backend():
    xs = inputs(150, dtype=torch.float32, device=TRITON_DEVICE, seed=2)
    cu_seqlens = torch.tensor([0, 3, 70, 150], device=TRITON_DEVICE)
    opts = {**OPTS, "dt_bias": OPTS["dt_bias"].float().to(TRITON_DEVICE)}
    out, varlen = mamba_chunk_scan_combined(**xs, chunk_size=64, seq_idx=seq_idx_of(cu_seqlens.cpu()).to(
        TRITON_DEVICE, torch.int32), cu_seqlens=cu_seqlens, return_varlen_states=True, backend="triton", **opts)
    assert varlen.dtype == torch.float32 and varlen.device == out.device  # C's dtype
    assert rel(varlen, per_sequence_states(xs, cu_seqlens.cpu(), **OPTS)) < 1e-5


def test_varlen_states_gradients_match_per_sequence_reference():
    """Ours is differentiable (upstream's backward refuses return_varlen_states): the same gradients as the
    per-sequence recurrence."""
    xs = inputs(20, seed=3)
    cu_seqlens = torch.tensor([0, 7, 20])
    init = torch.randn(1, H, P, N, dtype=torch.float64)
    weight = torch.randn(2, H, P, N, dtype=torch.float64)
    grads = []
    for compute in ("ours", "reference"):
        leaves = {k: v.clone().requires_grad_() for k, v in {**xs, "initial_states": init}.items()}
        if compute == "ours":
            varlen = mamba_chunk_scan_combined(**leaves, chunk_size=4, seq_idx=seq_idx_of(cu_seqlens),
                                               cu_seqlens=cu_seqlens, return_varlen_states=True, backend="torch",
                                               **OPTS)[1]
        else:
            init_leaf = leaves.pop("initial_states")
            varlen = per_sequence_states(leaves, cu_seqlens, initial_states=init_leaf, **OPTS)
            leaves["initial_states"] = init_leaf
        (varlen * weight).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    assert grads[0]["C"] is None and grads[1]["C"] is None  # states do not read C
    for name in ("x", "dt", "A", "B", "initial_states"):
        assert rel(grads[0][name], grads[1][name]) < 1e-12, name


def test_signature_binds_positionally_like_upstream():
    params = inspect.signature(mamba_chunk_scan_combined).parameters
    assert list(params)[:len(UPSTREAM_PARAMS)] == UPSTREAM_PARAMS
    assert params["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(ssd_compiled).parameters) == list(params)
    xs = inputs(12, seed=4)
    init = torch.randn(1, H, P, N, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 5, 12])
    D, z = torch.randn(H, dtype=torch.float64), torch.randn(1, 12, H, P, dtype=torch.float64)
    positional = mamba_chunk_scan_combined(xs["x"], xs["dt"], xs["A"], xs["B"], xs["C"], 4, D, z, OPTS["dt_bias"],
                                           init, seq_idx_of(cu_seqlens), cu_seqlens, True, (0.05, 3.0), True, True,
                                           torch.float32, backend="torch")
    keyword = mamba_chunk_scan_combined(**xs, chunk_size=4, D=D, z=z, initial_states=init,
                                        seq_idx=seq_idx_of(cu_seqlens), cu_seqlens=cu_seqlens,
                                        return_final_states=True, return_varlen_states=True, state_dtype=torch.float32,
                                        backend="torch", **OPTS)
    assert len(positional) == 3 and positional[2].dtype == torch.float32
    for a, b in zip(positional, keyword):
        assert torch.equal(a, b)


@pytest.mark.parametrize("final,varlen", [(False, False), (True, False), (False, True), (True, True)])
def test_return_convention_and_state_dtype(final, varlen):
    """out, (out, final), (out, varlen), (out, final, varlen); varlen states in state_dtype, default C's dtype;
    final states fp32 whatever state_dtype."""
    xs = {k: (v.to(torch.bfloat16) if k != "A" else v.float()) for k, v in inputs(10, seed=5).items()}
    cu_seqlens = torch.tensor([0, 4, 10])
    for state_dtype, expected_dtype in ((None, torch.bfloat16), (torch.float32, torch.float32)):
        res = mamba_chunk_scan_combined(**xs, chunk_size=4, cu_seqlens=cu_seqlens, return_final_states=final,
                                        return_varlen_states=varlen, state_dtype=state_dtype, backend="torch")
        if not (final or varlen):
            assert isinstance(res, torch.Tensor) and res.shape == xs["x"].shape
            continue
        assert isinstance(res, tuple) and len(res) == 1 + final + varlen
        if final:
            assert res[1].dtype == torch.float32 and res[1].shape == (1, H, P, N)
        if varlen:
            assert res[-1].dtype == expected_dtype and res[-1].shape == (2, H, P, N)


def test_cu_seqlens_ignored_without_return_varlen_states():
    """As upstream: cu_seqlens alone changes nothing and is not checked (transformers passes it through)."""
    xs = {k: torch.cat([v, v]) if k != "A" else v for k, v in inputs(9, seed=6).items()}  # batch 2
    plain = mamba_chunk_scan_combined(**xs, chunk_size=4, backend="torch")
    assert torch.equal(plain, mamba_chunk_scan_combined(**xs, chunk_size=4, cu_seqlens=torch.tensor([0, 3, 5]),
                                                        backend="torch"))


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens=None), "cu_seqlens is required"),
    (dict(cu_seqlens=torch.tensor([0.0, 9.0])), "cu_seqlens must have dtype"),
    (dict(cu_seqlens=torch.tensor([[0, 9]])), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([1, 9])), "cu_seqlens must be"),
    (dict(cu_seqlens=torch.tensor([0, 6, 4, 9])), "cu_seqlens must be"),
    (dict(cu_seqlens=torch.tensor([0, 8])), "cu_seqlens must be"),
    (dict(cu_seqlens=torch.tensor([0])), "cu_seqlens must be"),
    (dict(batch=2), "batch 1"),
    (dict(state_dtype=torch.int32), "state_dtype"),
    (dict(state_dtype="float32"), "state_dtype"),
])
def test_errors_name_the_argument(change, match):
    xs = inputs(9, seed=7)
    change = dict(change)
    if change.pop("batch", 1) == 2:
        xs = {k: torch.cat([v, v]) if k != "A" else v for k, v in xs.items()}
    args = {"cu_seqlens": torch.tensor([0, 4, 9]), "return_varlen_states": True, **change}
    for backend in ("torch", "ref"):
        with pytest.raises(ValueError, match=match):
            mamba_chunk_scan_combined(**xs, chunk_size=4, backend=backend, **args)


def test_compiled_varlen_states_match_eager():
    """Under torch.compile the scan stays one custom-op node; the varlen states follow it as plain torch ops."""
    xs = inputs(20, seed=8)
    cu_seqlens = torch.tensor([0, 6, 20])
    kw = dict(chunk_size=4, seq_idx=seq_idx_of(cu_seqlens), cu_seqlens=cu_seqlens, return_final_states=True,
              return_varlen_states=True, backend="torch", **OPTS)
    eager = mamba_chunk_scan_combined(**xs, **kw)
    compiled = torch.compile(lambda **a: mamba_chunk_scan_combined(**a, **kw), backend="aot_eager")(**xs)
    assert len(compiled) == 3
    for a, b in zip(compiled, eager):
        assert rel(a, b) < 1e-12
