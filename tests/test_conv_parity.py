"""causal-conv1d parity: fp32 compute rounded once, seq_idx < 0 padding, causal_conv1d_update's cache_seqlens
(circular buffer) and conv_state_indices (cache lines, negative = padding row), causal_conv1d_varlen_states.
Every check is against a float64 loop written here, on fresh random inputs."""
import pytest
import torch
import torch.nn.functional as F

from kernels import compat
from kernels.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

# unit roundoff: round-to-nearest changes a value v by at most u * |v|
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


def conv_ref(x, w, b, seq_idx=None, history=None, silu=True):
    """float64 loop: out[:, :, t] = b + sum_k w[:, k] * input[t - (W-1) + k], where input before t = 0 is
    `history` (zeros if None), a tap into another document reads 0, and positions with seq_idx < 0 output 0."""
    batch, dim, L = x.shape
    W = w.shape[1]
    past = torch.zeros(batch, dim, W - 1, dtype=torch.float64) if history is None else history.double()
    out = []
    for t in range(L):
        acc = b.double()[None].expand(batch, dim) if b is not None else torch.zeros(batch, dim, dtype=torch.float64)
        for k in range(W):
            s = t - (W - 1) + k
            v = x[:, :, s].double() if s >= 0 else past[:, :, W - 1 + s]
            if seq_idx is not None and s >= 0:
                v = v * (seq_idx[:, s] == seq_idx[:, t]).double()[:, None]
            elif seq_idx is not None:
                v = v * 0
            acc = acc + w[:, k].double() * v
        acc = F.silu(acc) if silu else acc
        if seq_idx is not None:
            acc = acc * (seq_idx[:, t] >= 0).double()[:, None]
        out.append(acc)
    return torch.stack(out, -1)


def assert_rounded_once(actual, exact, dtype, slack, name):
    """|actual - exact| <= u(dtype) |exact| + slack: one rounding to dtype of a value computed with an error of at
    most `slack` (the fp32 arithmetic). Two roundings (bf16 sums, then bf16 SiLU) exceed it."""
    err = (actual.double() - exact).abs()
    bound = UNIT_ROUNDOFF[dtype] * exact.abs() + slack
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: error exceeds one {dtype} rounding by {worst:.3g} (max error {err.max().item():.3g})"


def padded_seq_idx(batch, L, g):
    """Random documents with a padded (-1) stretch at the end of row 0 and at the start of the last row."""
    seq = torch.randint(0, 3, (batch, L), generator=g).sort(-1).values.int()
    seq[0, L - L // 3:] = -1
    seq[-1, :L // 4] = -1
    return seq


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,L,packed", [(4, 33, False), (4, 33, True), (2, 1, False), (3, 7, True)])
@pytest.mark.parametrize("weight_dtype", ["fp32", "same"])
def test_fn_computes_in_fp32_and_rounds_once(dtype, width, L, packed, weight_dtype):
    g = torch.Generator().manual_seed(width * 1000 + L + packed)
    wdtype = torch.float32 if weight_dtype == "fp32" else dtype
    x = torch.randn(2, 8, L, generator=g).to(dtype).requires_grad_()
    w = torch.randn(8, width, generator=g).to(wdtype).requires_grad_()
    b = torch.randn(8, generator=g).to(wdtype).requires_grad_()
    seq = padded_seq_idx(2, L, g) if packed else None
    dout = torch.randn(2, 8, L, generator=g).to(dtype)
    out = causal_conv1d_fn(x, w, b, seq_idx=seq, activation="silu")
    out.backward(dout)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = conv_ref(x64, w64, b64, seq_idx=seq)
    ref.backward(dout.double())
    assert out.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == wdtype and b.grad.dtype == wdtype
    # slack: fp32 sums of <= 4 products of |values| < ~20 err by < 1e-5; the weight/bias gradients sum
    # 2 * L <= 66 such products (error < 1e-4)
    assert_rounded_once(out, ref.detach(), dtype, 1e-5, "out")
    assert_rounded_once(x.grad, x64.grad, dtype, 1e-5, "dx")
    assert_rounded_once(w.grad, w64.grad, wdtype, 1e-4, "dweight")
    assert_rounded_once(b.grad, b64.grad, wdtype, 1e-4, "dbias")


def test_fn_padding_outputs_zero_and_reads_nothing():
    """seq_idx < 0: output exactly 0 (no bias, no SiLU), and no gradient reaches the padded inputs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 20, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    seq = padded_seq_idx(3, 20, g).long()  # int64 is accepted too (a superset of causal-conv1d's int32)
    out = causal_conv1d_fn(x, w, b, seq_idx=seq, activation="silu")
    pad = (seq < 0)[:, None, :].expand_as(out)
    assert (out[pad] == 0).all() and (out[~pad] != 0).all()
    torch.testing.assert_close(out, conv_ref(x, w, b, seq_idx=seq), rtol=1e-12, atol=1e-12)
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64))
    assert (x.grad[pad] == 0).all()
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_fn(*a, seq_idx=seq, activation="silu"), (x, w, b))


def test_fn_final_states_keep_x_dtype_with_fp32_weights():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 2, generator=g).bfloat16()
    init = torch.randn(2, 4, 3, generator=g).bfloat16()
    out, final = causal_conv1d_fn(x, torch.randn(4, 4, generator=g), initial_states=init, return_final_states=True)
    assert final.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    torch.testing.assert_close(final, torch.cat([init, x], -1)[..., -3:], rtol=0, atol=0)


def update_ref(x, conv_state, w, b, cache_seqlens=None, indices=None):
    """float64 loop over rows and steps. Returns (out, new conv_state); conv_state itself is not modified."""
    state = conv_state.clone()
    batch, dim, seqlen = x.shape
    W, S = w.shape[1], state.shape[-1]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for r in range(batch):
        line = r if indices is None else int(indices[r])
        if line < 0:
            continue  # padding row: output 0, no state read or written
        if cache_seqlens is None:
            past = [state[line, :, S - (W - 1) + i].double() for i in range(W - 1)]
            stream = torch.cat([state[line], x[r].to(state.dtype)], -1)
            state[line] = stream[:, seqlen:]
        else:
            p = int(cache_seqlens[r])
            past = [state[line, :, (p - (W - 1) + i) % S].double() for i in range(W - 1)]
            for t in range(seqlen):
                state[line, :, (p + t) % S] = x[r, :, t].to(state.dtype)
        inputs = past + [x[r, :, t].double() for t in range(seqlen)]
        for t in range(seqlen):
            acc = b.double() + sum(w[:, k].double() * inputs[t + k] for k in range(W))
            out[r, :, t] = F.silu(acc)
    return out, state


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 9])
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("circular", [False, True])
def test_update_matches_loop(width, seqlen, extra, circular):
    """Circular buffer (cache_seqlens, also past state_len and with seqlen > state_len) and shifting buffer."""
    g = torch.Generator().manual_seed(width * 100 + seqlen * 10 + extra)
    state_len = width - 1 + extra
    x = torch.randn(3, 6, seqlen, generator=g)
    w, b = torch.randn(6, width, generator=g), torch.randn(6, generator=g)
    state = torch.randn(3, 6, state_len, generator=g)
    seqlens = torch.tensor([0, 2, 11], dtype=torch.int32) if circular else None
    want_out, want_state = update_ref(x, state, w, b, seqlens)
    out = causal_conv1d_update(x, state, w, b, "silu", seqlens)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-6, atol=1e-6)  # fp32 sums of 4 products
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)  # copies only


def test_circular_decoding_equals_full_convolution():
    """Decoding a sequence in chunks of 1..3 tokens through a circular buffer, advancing cache_seqlens, gives the
    convolution of the whole sequence (and a state holding the last state_len inputs, rotated)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 14, generator=g, dtype=torch.float64)
    w, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    state = torch.zeros(2, 5, 6, dtype=torch.float64)
    seqlens = torch.tensor([0, 0], dtype=torch.int32)
    outs, t = [], 0
    for n in (1, 3, 2, 1, 3, 3, 1):
        outs.append(causal_conv1d_update(x[..., t:t + n], state, w, b, "silu", seqlens))
        seqlens += n
        t += n
    torch.testing.assert_close(torch.cat(outs, -1), conv_ref(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.roll(-(14 % 6), -1), x[..., -6:], rtol=0, atol=0)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_update_conv_state_indices_with_padding_rows(circular, index_dtype):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 6, 2, generator=g)
    w, b = torch.randn(6, 3, generator=g), torch.randn(6, generator=g)
    cache = torch.randn(5, 6, 4, generator=g)  # 5 cache lines for 4 rows
    indices = torch.tensor([3, -1, 0, -1], dtype=index_dtype)
    seqlens = torch.tensor([5, 1, 2, 0], dtype=torch.int32) if circular else None
    want_out, want_cache = update_ref(x, cache, w, b, seqlens, indices)
    before = cache.clone()
    out = causal_conv1d_update(x, cache, w, b, "silu", seqlens, indices)
    assert (out[[1, 3]] == 0).all()
    torch.testing.assert_close(out.double(), want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, want_cache, rtol=0, atol=0)
    torch.testing.assert_close(cache[[1, 2, 4]], before[[1, 2, 4]], rtol=0, atol=0)  # unused lines untouched
    # a (batch, dim) x with the positional order of causal-conv1d
    want_out1 = update_ref(x[..., :1], before, w, b, seqlens, indices)[0][..., 0]
    out1 = causal_conv1d_update(x[..., 0], before, w, b, "silu", seqlens, indices)
    torch.testing.assert_close(out1.double(), want_out1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_computes_in_fp32_and_rounds_once(dtype):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 16, 3, generator=g).to(dtype)
    state = torch.randn(3, 16, 4, generator=g).to(dtype)
    w, b = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    seqlens = torch.tensor([1, 4, 6], dtype=torch.int32)
    want_out, want_state = update_ref(x, state, w, b, seqlens)
    out = causal_conv1d_update(x, state, w, b, "silu", seqlens)
    assert out.dtype == dtype
    assert_rounded_once(out, want_out, dtype, 1e-5, "out")  # fp32 sums of 4 products
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)


def varlen_ref(x, cu_seqlens, state_len):
    """Per sequence: its last min(len, state_len) inputs, right-aligned; zeros before them."""
    states = torch.zeros(len(cu_seqlens) - 1, x.shape[1], state_len, dtype=torch.float64)
    for i in range(len(cu_seqlens) - 1):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        for j in range(min(end - start, state_len)):
            states[i, :, state_len - 1 - j] = x[end - 1 - j].double()
    return states


@pytest.mark.parametrize("state_len", [1, 3, 4])
def test_varlen_states_match_loop(state_len):
    g = torch.Generator().manual_seed(state_len)
    x = torch.randn(13, 7, generator=g)
    cu = torch.tensor([0, 2, 2, 3, 10, 13], dtype=torch.int32)  # lengths 2, 0, 1, 7, 3
    states = causal_conv1d_varlen_states(x, cu, state_len)
    assert states.shape == (5, 7, state_len) and states.stride(1) == 1  # channel-last, as causal-conv1d
    torch.testing.assert_close(states.double(), varlen_ref(x, cu, state_len), rtol=0, atol=0)


def test_varlen_states_start_decoding_where_packed_prefill_ends():
    """The states of a packed prefill, fed to causal_conv1d_update, continue each sequence exactly."""
    g = torch.Generator().manual_seed(14)
    lengths = [5, 1, 8]
    x = torch.randn(sum(lengths) + 1, 4, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 14])
    states = causal_conv1d_varlen_states(x, cu, 3).contiguous()
    nxt = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = causal_conv1d_update(nxt, states, w, b, "silu")
    for i in range(3):
        seq = torch.cat([x[cu[i]:cu[i + 1]], nxt[i:i + 1]]).T[None]
        torch.testing.assert_close(out[i], conv_ref(seq, w, b)[0, :, -1], rtol=1e-12, atol=1e-12)


def test_varlen_module_alias():
    """compat serves causal_conv1d.causal_conv1d_varlen (mamba_ssm's Mamba2 imports it from there)."""
    roots = compat.install_mamba_ssm_aliases()
    try:
        if "causal_conv1d" not in roots:
            pytest.skip("a real causal_conv1d is installed: the alias is (rightly) not used")
        from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states as aliased
        assert aliased is causal_conv1d_varlen_states
    finally:
        compat.uninstall_mamba_ssm_aliases()


BAD_UPDATE = [
    (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), r"cache_seqlens must have shape \(2\)"),
    (dict(cache_seqlens=torch.zeros(2)), "cache_seqlens must have dtype in"),
    (dict(cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)), "cache_seqlens must be >= 0"),
    (dict(conv_state_indices=torch.zeros(2)), "conv_state_indices must have dtype in"),
    (dict(conv_state_indices=torch.tensor([[0, 1]], dtype=torch.int32)), r"conv_state_indices must have shape \(2\)"),
    (dict(conv_state_indices=torch.tensor([0, 2], dtype=torch.int32)),
     r"conv_state_indices must be < the number of cache lines \(2\)"),
    (dict(conv_state_indices=torch.tensor([1, 1], dtype=torch.int32)), "conv_state_indices must not repeat"),
    (dict(conv_state=torch.zeros(3, 4, 3)), r"conv_state must have shape \(2, 4, \*\) \(x's batch\)"),
    (dict(conv_state=torch.zeros(3, 5, 3)), r"conv_state must have shape \(\*, 4, \*\)"),
]


@pytest.mark.parametrize("kwargs,message", BAD_UPDATE)
def test_update_rejects_bad_arguments_before_writing(kwargs, message):
    args = dict(x=torch.randn(2, 4), conv_state=torch.randn(2, 4, 3), weight=torch.randn(4, 3))
    args.update(kwargs)
    before = args["conv_state"].clone()
    with pytest.raises(ValueError, match=message):
        causal_conv1d_update(**args)
    assert torch.equal(args["conv_state"], before)


@pytest.mark.parametrize("cu,state_len,message", [
    (torch.tensor([0, 3, 2]), 2, "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 3, 6]), 2, r"cu_seqlens must lie in \[0, total_tokens=5\]"),
    (torch.tensor([0.0, 3.0]), 2, "cu_seqlens must have dtype in"),
    (torch.tensor([0, 3]), 0, "state_len must be an int >= 1"),
    (torch.tensor([0, 3]), 2.0, "state_len must be an int >= 1"),
])
def test_varlen_states_reject_bad_arguments(cu, state_len, message):
    with pytest.raises(ValueError, match=message):
        causal_conv1d_varlen_states(torch.randn(5, 4), cu, state_len)
