"""selective_state_update parity with mamba_ssm: state_batch_indices (cache lines; negative = padding row with
output 0 and no state touched), the positional order, and argument checks. References are float64 loops
written here, on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F

from kernels.state_update import selective_state_update


def step_ref(state, x, dt, A, B, C, D, z, dt_bias, softplus, indices=None):
    """float64 loop over rows and heads, on the 4-d (heads) layout. Returns (out, new state)."""
    state = state.double().clone()
    batch, nheads = x.shape[:2]
    rep = nheads // B.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for r in range(batch):
        line = r if indices is None else int(indices[r])
        if line < 0:
            continue
        for h in range(nheads):
            d = dt[r, h].double() + (0 if dt_bias is None else dt_bias[h].double())
            d = F.softplus(d) if softplus else d
            g = h // rep
            decay = torch.exp(d[:, None] * A[h].double())
            new = state[line, h] * decay + (d * x[r, h].double())[:, None] * B[r, g].double()
            state[line, h] = new
            y = new @ C[r, g].double()
            y = y + (0 if D is None else D[h].double() * x[r, h].double())
            out[r, h] = y * (1 if z is None else F.silu(z[r, h].double()))
    return out, state


def make_inputs(g, batch, nheads, ngroups, dim, N, options):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, dt = r(batch, nheads, dim), r(batch, nheads, dim) * 0.5
    A, B, C = -torch.rand(nheads, dim, N, generator=g), r(batch, ngroups, N), r(batch, ngroups, N)
    kw = dict(D=r(nheads, dim), z=r(batch, nheads, dim), dt_bias=r(nheads, dim), dt_softplus=True) if options else {}
    return (x, dt, A, B, C), kw


def drop_heads(args, kw):
    """The no-heads layout (one head, one group) of make_inputs(..., nheads=1, ngroups=1, ...)."""
    x, dt, A, B, C = args
    return (x[:, 0], dt[:, 0], A[0], B[:, 0], C[:, 0]), {k: (v if isinstance(v, bool) else v[:, 0] if v.dim() == 3
                                                              else v[0]) for k, v in kw.items()}


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("options", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_state_batch_indices_with_padding_rows(heads, options, index_dtype):
    g = torch.Generator().manual_seed(heads * 10 + options)
    nheads, ngroups = (4, 2) if heads else (1, 1)
    args, kw = make_inputs(g, 4, nheads, ngroups, 3, 5, options)
    cache = torch.randn(6, nheads, 3, 5, generator=g)  # 6 cache lines for 4 rows
    indices = torch.tensor([5, -1, 0, 2], dtype=index_dtype)
    want_out, want_cache = step_ref(cache, *args, kw.get("D"), kw.get("z"), kw.get("dt_bias"), options, indices)
    before = cache.clone()
    if heads:
        out = selective_state_update(cache, *args, **kw, state_batch_indices=indices)
    else:
        flat = cache[:, 0].clone()
        out = selective_state_update(flat, *drop_heads(args, kw)[0], **drop_heads(args, kw)[1],
                                     state_batch_indices=indices)[:, None]
        cache = flat[:, None]
    assert (out[1] == 0).all()
    # fp32 math on O(1) values against float64: a few fp32 roundings of sums of dstate = 5 products
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.double(), want_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[[1, 3, 4]], before[[1, 3, 4]], rtol=0, atol=0)  # unused lines untouched


def test_indices_equal_gathered_plain_call_and_all_padding():
    g = torch.Generator().manual_seed(3)
    args, kw = make_inputs(g, 3, 4, 4, 2, 8, True)
    cache = torch.randn(5, 4, 2, 8, generator=g)
    indices = torch.tensor([4, 1, 3])
    gathered = cache[indices].clone()
    want = selective_state_update(gathered, *args, **kw)
    out = selective_state_update(cache, *args, **kw, state_batch_indices=indices)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(cache[indices], gathered, rtol=0, atol=0)
    before = cache.clone()
    out = selective_state_update(cache, *args, **kw, state_batch_indices=torch.full((3,), -1))
    assert (out == 0).all() and torch.equal(cache, before)


def test_positional_order_is_mamba_ssm():
    """(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices), all positional."""
    g = torch.Generator().manual_seed(4)
    args, kw = make_inputs(g, 2, 2, 1, 3, 4, True)
    cache = torch.randn(3, 2, 3, 4, generator=g)
    indices = torch.tensor([2, 0], dtype=torch.int32)
    want_out, want_cache = step_ref(cache, *args, kw["D"], kw["z"], kw["dt_bias"], True, indices)
    out = selective_state_update(cache, *args, kw["D"], kw["z"], kw["dt_bias"], True, indices)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.double(), want_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("indices,message", [
    (torch.zeros(2), "state_batch_indices must have dtype in"),
    (torch.zeros(3, dtype=torch.int32), r"state_batch_indices must have shape \(2\)"),
    (torch.tensor([0, 3], dtype=torch.int32), r"state_batch_indices must be < the number of cache lines \(3\)"),
    (torch.tensor([2, 2], dtype=torch.int32), "state_batch_indices must not repeat"),
])
def test_bad_state_batch_indices_raise_before_writing(indices, message):
    g = torch.Generator().manual_seed(5)
    args, kw = make_inputs(g, 2, 2, 1, 3, 4, False)
    cache = torch.randn(3, 2, 3, 4, generator=g)
    before = cache.clone()
    with pytest.raises(ValueError, match=message):
        selective_state_update(cache, *args, state_batch_indices=indices)
    assert torch.equal(cache, before)


def test_without_indices_state_needs_one_line_per_row():
    g = torch.Generator().manual_seed(6)
    args, _ = make_inputs(g, 2, 2, 1, 3, 4, False)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 2, 3\)"):
        selective_state_update(torch.zeros(3, 2, 3, 4), *args)
    with pytest.raises(ValueError, match="B and C must have the same shape"):
        selective_state_update(torch.zeros(2, 2, 3, 4), *args[:4], torch.randn(2, 2, 4))
