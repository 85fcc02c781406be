"""causal_conv1d_fn / _update against F.conv1d and a per-tap loop; packed documents; errors."""
import pytest
import torch
import torch.nn.functional as F

from kernels import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update


def loop_conv(x, w, b, init=None, seq_idx=None, silu=False):
    """out[t] = sum_k w[k] x[t - (W-1) + k], reading zeros (or init) before 0, never an earlier document."""
    batch, dim, L = x.shape
    W = w.shape[1]
    out = torch.zeros(batch, dim, L, dtype=torch.float64)
    for t in range(L):
        for k in range(W):
            s = t - (W - 1) + k
            if s >= 0:
                if seq_idx is not None and not torch.equal(seq_idx[:, s], seq_idx[:, t]):
                    v = torch.where((seq_idx[:, s] == seq_idx[:, t])[:, None], x[:, :, s].double(), 0)
                else:
                    v = x[:, :, s].double()
            elif init is not None:
                v = init[:, :, W - 1 + s].double()
            else:
                continue
            out[:, :, t] += w[:, k].double() * v
    if b is not None:
        out += b.double()[:, None]
    return F.silu(out) if silu else out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 5, 33])
@pytest.mark.parametrize("bias,act", [(True, "silu"), (False, None)])
def test_against_loop_and_conv1d(width, L, bias, act):
    g = torch.Generator().manual_seed(width * 100 + L)
    x = torch.randn(2, 6, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, width, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    out = causal_conv1d_fn(x, w, b, activation=act)
    torch.testing.assert_close(out, loop_conv(x.detach(), w.detach(), b, silu=act == "silu"))
    torch.testing.assert_close(out, causal_conv1d_ref(x, w, b, activation=act))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_fn(*a, activation=act), (x, w, b))


@pytest.mark.parametrize("width", [2, 4])
def test_initial_and_final_states_chain(width):
    """Running two halves with the first half's final states as initial states equals one run."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 5, 20, generator=g)
    w, b = torch.randn(5, width, generator=g), torch.randn(5, generator=g)
    full, final = causal_conv1d_fn(x, w, b, return_final_states=True, activation="silu")
    first, mid = causal_conv1d_fn(x[..., :9], w, b, return_final_states=True, activation="silu")
    out_states = torch.empty(2, 5, width - 1)
    second, final2 = causal_conv1d_fn(x[..., 9:], w, b, initial_states=mid, return_final_states=True,
                                      final_states_out=out_states, activation="silu")
    torch.testing.assert_close(torch.cat([first, second], -1), full)
    torch.testing.assert_close(final2, final)
    assert final2 is out_states
    torch.testing.assert_close(final, x[..., -(width - 1):])
    torch.testing.assert_close(second, loop_conv(x[..., 9:], w, b, init=mid, silu=True).float())


@pytest.mark.parametrize("width", [2, 3, 4])
def test_seq_idx_resets_at_document_boundaries(width):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64)
    w, b = torch.randn(3, width, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    seq = torch.zeros(2, 16, dtype=torch.int32)
    seq[0, 5:] = 1
    seq[0, 6:] = 2
    seq[1, 11:] = 1
    out = causal_conv1d_fn(x, w, b, seq_idx=seq, activation="silu")
    torch.testing.assert_close(out, loop_conv(x, w, b, seq_idx=seq, silu=True))
    # each document alone gives the same outputs
    for s, e in ((0, 5), (5, 6), (6, 16)):
        torch.testing.assert_close(out[:1, :, s:e], causal_conv1d_fn(x[:1, :, s:e], w, b, activation="silu"))


def test_update_matches_full_convolution():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 12, generator=g)
    w, b = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    full = causal_conv1d_fn(x, w, b, activation="silu")
    state = torch.zeros(2, 4, 4)  # state_len = width, as Mamba's step uses
    steps = [causal_conv1d_update(x[:, :, t], state, w, b, "silu") for t in range(12)]
    torch.testing.assert_close(torch.stack(steps, -1), full)
    torch.testing.assert_close(state, x[..., -4:])
    state3 = torch.zeros(2, 4, 3)  # state_len = width - 1, several tokens at once
    outs = [causal_conv1d_update(x[:, :, s:s + 3], state3, w, b, "silu") for s in range(0, 12, 3)]
    torch.testing.assert_close(torch.cat(outs, -1), full)


@pytest.mark.parametrize("kwargs,message", [
    (dict(x=torch.randn(2, 4)), r"x must have shape \(\*, \*, \*\)"),
    (dict(weight=torch.randn(5, 3)), r"weight must have shape \(4, \*\), got \(5, 3\)"),
    (dict(bias=torch.randn(3)), r"bias must have shape \(4\)"),
    (dict(initial_states=torch.randn(2, 4, 3)), r"initial_states must have shape \(2, 4, 2\)"),
    (dict(seq_idx=torch.zeros(2, 10, dtype=torch.int32), initial_states=torch.randn(2, 4, 2)), "cannot be combined"),
    (dict(activation="relu"), "activation must be one of"),
])
def test_bad_inputs(kwargs, message):
    args = dict(x=torch.randn(2, 4, 10), weight=torch.randn(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        causal_conv1d_fn(**args)
    with pytest.raises(ValueError, match="conv_state must hold at least width - 1 = 3"):
        causal_conv1d_update(torch.randn(2, 4), torch.zeros(2, 4, 2), torch.randn(4, 4))
