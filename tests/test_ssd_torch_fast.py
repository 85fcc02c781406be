"""The torch SSD path's hand-written backward (kernels/ssd/torch_ssd_fast.py) against float64 autograd of the
plain chunked formulation (torch_ssd._ssd_torch_autograd) on fresh random inputs: the output, the final state
and every gradient, for the edge shapes (L = 1, one chunk with and without initial/final state, L not a
multiple of the chunk, several groups, chunk 1), packed documents starting on chunk and block borders, and
sequences spanning several blocks of chunks (the block size is shrunk so that a short test crosses them)."""
import pytest
import torch

from kernels.ssd import torch_ssd_fast
from kernels.ssd.reference import ssd_sequential_ref
from kernels.ssd.torch_ssd import _ssd_torch_autograd, ssd_torch

OPTION_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_case(batch, L, H, P, N, G, *, h0=True, D="h", z=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A = -(torch.rand(H, generator=g, dtype=torch.float64) + 0.3)
    return dict(x=r(batch, L, H, P), dt=0.7 * r(batch, L, H), A=A,
                B=r(batch, L, G, N), C=r(batch, L, G, N),
                D={"h": r(H), "hp": r(H, P), None: None}[D], z=r(batch, L, H, P) if z else None,
                dt_bias=0.5 * r(H) if bias else None, initial_states=r(batch, H, P, N) if h0 else None)


def documents(batch, L, starts):
    seq = torch.zeros(batch, L, dtype=torch.int32)
    for s in starts:
        seq[:, s:] += 1
    return seq


def run(fn, inp, dtype, chunk, seq, final, weights):
    leaves = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in inp.items()}
    res = fn(**leaves, chunk_size=chunk, seq_idx=seq, dt_softplus=True, return_final_states=final)
    y, h = res if final else (res, None)
    loss = (y.double() * weights[0]).sum()
    if final:
        loss = loss + (h.double() * weights[1]).sum()
    loss.backward()
    return y.detach(), h, {k: v.grad for k, v in leaves.items() if v is not None}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(inp, chunk, seq=None, final=True, dtype=torch.float32, tol=2e-6, block_chunks=None, monkeypatch=None):
    if block_chunks is not None:  # shrink the blocks so the sequence spans several
        b, _, H, P = inp["x"].shape
        N = inp["B"].shape[-1]
        Q = min(chunk, inp["x"].shape[1])
        elt = torch.empty((), dtype=dtype if dtype == torch.float64 else torch.float32).element_size()
        monkeypatch.setattr(torch_ssd_fast, "BLOCK_BYTES", block_chunks * b * H * Q * max(Q, P, N) * elt)
    g = torch.Generator().manual_seed(7)
    x = inp["x"]
    weights = (torch.randn(x.shape, generator=g, dtype=torch.float64),
               torch.randn(x.shape[0], x.shape[2], x.shape[3], inp["B"].shape[-1], generator=g, dtype=torch.float64))
    ref = run(_ssd_torch_autograd, inp, torch.float64, chunk, seq, final, weights)
    got = run(ssd_torch, inp, dtype, chunk, seq, final, weights)
    assert got[0].dtype == dtype
    errs = {"y": rel(got[0], ref[0])}
    if final:
        assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        errs["final"] = rel(got[1], ref[1])
    assert set(got[2]) == set(ref[2])
    for k in ref[2]:
        errs["d" + k] = rel(got[2][k], ref[2][k])
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, (bad, errs)
    return errs


CASES = [  # (batch, L, heads, headdim, dstate, groups, chunk, options, document starts, final, block chunks)
    (1, 1, 2, 3, 4, 1, 16, {}, (), True, None),  # L = 1
    (1, 1, 2, 3, 4, 1, 16, {"h0": False}, (), False, None),  # L = 1, no state in or out
    (1, 16, 4, 3, 5, 4, 16, {"h0": False}, (), False, None),  # one chunk: both skipped matmuls
    (1, 16, 4, 3, 5, 1, 16, {}, (), False, None),  # one chunk with an initial state, no final state
    (1, 16, 4, 3, 5, 1, 16, {"h0": False, "D": "hp"}, (), True, None),  # one chunk, final state only
    (2, 37, 4, 3, 5, 2, 8, {}, (), True, 2),  # L not a multiple of the chunk, 2 groups, 3 blocks
    (2, 37, 4, 3, 5, 2, 8, {"h0": False, "z": False, "bias": False, "D": None}, (), False, 1),
    (1, 45, 6, 2, 3, 3, 4, {}, (), True, 3),  # 3 groups of 2 heads, last block partial
    (2, 33, 2, 3, 4, 1, 1, {}, (), True, 5),  # chunk 1
    (1, 64, 4, 8, 6, 2, 8, {}, (8, 16, 33, 48, 49), True, 2),  # documents on chunk and block borders, one of length 1
    (2, 70, 4, 3, 5, 1, 8, {"h0": False}, (5, 16, 17, 40, 64), True, 2),  # inside chunks and on block borders
    (1, 45, 4, 2, 3, 2, 16, {}, (5, 16, 17, 40), False, None),
]


@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_float64_autograd(case, monkeypatch):
    batch, L, H, P, N, G, chunk, opts, starts, final, blocks = case
    inp = make_case(batch, L, H, P, N, G, **opts, seed=L + H)
    seq = documents(batch, L, starts) if starts else None
    check(inp, chunk, seq, final, block_chunks=blocks, monkeypatch=monkeypatch)


@pytest.mark.parametrize("blocks", [None, 1, 2])
def test_fast_path_float64_is_exact(blocks, monkeypatch):
    inp = make_case(2, 41, 4, 3, 5, 2, D="hp")
    check(inp, 8, documents(2, 41, (8, 19)), True, dtype=torch.float64, tol=1e-12, block_chunks=blocks,
          monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_half_inputs_compute_in_fp32(dtype):
    """bf16/fp16 inputs: the same as fp32 on the same (rounded) inputs, output rounded once."""
    inp = {k: (v.to(dtype) if v is not None else None) for k, v in make_case(1, 40, 4, 8, 6, 2).items()}
    kw = dict(chunk_size=16, dt_softplus=True, return_final_states=True)
    y, h = ssd_torch(**inp, **kw)
    y32, h32 = _ssd_torch_autograd(**{k: (v.float() if v is not None else None) for k, v in inp.items()}, **kw)
    assert y.dtype == dtype and h.dtype == torch.float32
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    assert rel(h, h32) < 1e-6


def test_fast_path_against_the_recurrence():
    """Also against the sequential float64 recurrence (not the chunked formulation), with documents."""
    inp = make_case(2, 50, 4, 3, 5, 2)
    seq = documents(2, 50, (7, 32))
    y, h = ssd_torch(**{k: (v.float() if v is not None else None) for k, v in inp.items()}, chunk_size=16,
                     seq_idx=seq, dt_softplus=True, return_final_states=True)
    y_ref, h_ref = ssd_sequential_ref(**inp, seq_idx=seq, dt_softplus=True, return_final_states=True)
    assert rel(y, y_ref) < 1e-6 and rel(h, h_ref) < 1e-6


def test_fast_path_dt_limit_and_bf16_grads():
    """dt_limit clamps dt before the core (gradients stop where clamped); grads flow back to bf16 leaves."""
    inp = make_case(1, 30, 2, 3, 4, 1, h0=False)
    leaves = {k: v.to(torch.bfloat16).requires_grad_() for k, v in inp.items() if v is not None}
    y = ssd_torch(**leaves, chunk_size=8, dt_softplus=True, dt_limit=(0.2, 0.9))
    y.float().square().sum().backward()
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    _ssd_torch_autograd(**ref, chunk_size=8, dt_softplus=True, dt_limit=(0.2, 0.9)).square().sum().backward()
    for k in leaves:
        assert leaves[k].grad.dtype == torch.bfloat16
        assert rel(leaves[k].grad, ref[k].grad) < 2e-2, k


def test_blocks_do_not_grow_with_length():
    """Every per-block temporary stays near BLOCK_BYTES: the block holds fewer chunks for bigger shapes."""
    per = lambda Q, P, N: 1 * 8 * Q * max(Q, P, N) * 4  # noqa: E731
    assert torch_ssd_fast.block_chunks(1, 8, 64, 64, 64, 4, 10 ** 6) * per(64, 64, 64) <= torch_ssd_fast.BLOCK_BYTES
    assert torch_ssd_fast.block_chunks(1, 8, 64, 64, 64, 4, 3) == 3
    assert torch_ssd_fast.block_chunks(64, 64, 256, 64, 128, 4, 100) == 1


@pytest.mark.parametrize("cache_bytes", [32 << 20, 4096, 0])
def test_reused_block_buffers_carry_nothing_between_calls(cache_bytes, monkeypatch):
    """The CPU block temporaries are cached across calls: a call with NaN inputs, then one with finite
    inputs of the same shapes, must give the finite call's own result (no stale values read); also with
    a cache too small for some or all of them."""
    monkeypatch.setattr(torch_ssd_fast, "BLOCK_BYTES", 2 * 1 * 4 * 8 * 8 * 4)  # two chunks per block
    monkeypatch.setattr(torch_ssd_fast, "CACHE_BYTES", cache_bytes)
    torch_ssd_fast.release_buffers()
    inp = {k: (v.float() if v is not None else None) for k, v in make_case(1, 40, 4, 3, 5, 2).items()}
    kw = dict(chunk_size=8, dt_softplus=True, return_final_states=True)
    fresh = ssd_torch(**inp, **kw)
    poisoned = {k: (torch.full_like(v, float("nan")) if v is not None else None) for k, v in inp.items()}
    assert torch.isnan(ssd_torch(**poisoned, **kw)[0]).all()
    again = ssd_torch(**inp, **kw)
    for a, b in zip(fresh, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_is_a_clear_error():
    """The hand-written backward is once-differentiable: first-order grads work under create_graph, a
    second backward through them raises instead of returning wrong values."""
    inp = {k: (v.float() if v is not None else None) for k, v in make_case(1, 20, 2, 3, 4, 1, h0=False).items()}
    x = inp.pop("x").requires_grad_()
    y = ssd_torch(x, **inp, chunk_size=8, dt_softplus=True)
    g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("blocks", [None, 1])
def test_backward_twice_with_retain_graph(blocks, monkeypatch):
    """A one-block forward saves its block tensors: the backward must leave them untouched (same grads on a
    second backward with retain_graph); also with several blocks (recomputed)."""
    if blocks is not None:
        monkeypatch.setattr(torch_ssd_fast, "BLOCK_BYTES", blocks * 1 * 4 * 8 * 8 * 4)
    inp = {k: (v.float().requires_grad_() if v is not None else None)
           for k, v in make_case(1, 30, 4, 3, 5, 2).items()}
    y, h = ssd_torch(**inp, chunk_size=8, seq_idx=documents(1, 30, (11,)), dt_softplus=True,
                     return_final_states=True)
    loss = y.square().sum() + h.sum()
    first = torch.autograd.grad(loss, [v for v in inp.values() if v is not None], retain_graph=True)
    second = torch.autograd.grad(loss, [v for v in inp.values() if v is not None])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
