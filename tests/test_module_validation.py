"""Bad arguments to the Mamba modules, causal conv1d, the decoding step and mamba_inner_fn: a ValueError
naming the argument, before any computation; and packed-document isolation that holds for NaN."""
import pytest
import torch

from kernels import (Mamba, Mamba2, RMSNormGated, causal_conv1d_fn, causal_conv1d_update, mamba_inner_fn,
                     selective_state_update)


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=0), "d_model must be an integer >= 1, got 0"),
    (dict(d_model=-4), "d_model must be an integer >= 1, got -4"),
    (dict(d_model=8.0), "d_model must be an integer >= 1, got 8.0"),
    (dict(d_state=0), "d_state must be an integer >= 1, got 0"),
    (dict(d_conv=0), "d_conv must be an integer >= 1"),
    (dict(d_conv=9), r"d_conv must be in 1..8"),
    (dict(expand=0), "expand must be a number with int"),
    (dict(dt_rank=0), "dt_rank must be 'auto' or an integer >= 1, got 0"),
    (dict(dt_min=0.0), "dt_min and dt_max must satisfy 0 < dt_min <= dt_max"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min and dt_max must satisfy"),
    (dict(dt_init="xavier"), "dt_init must be 'constant' or 'random'"),
])
def test_mamba_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mamba(**{"d_model": 8, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=0), "d_model must be an integer >= 1, got 0"),
    (dict(d_state=0), "d_state must be an integer >= 1, got 0"),
    (dict(headdim=0), "headdim must be an integer >= 1, got 0"),
    (dict(headdim=5), r"headdim \(5\) must divide d_ssm \(16\)"),
    (dict(ngroups=0), "ngroups must be an integer >= 1, got 0"),
    (dict(ngroups=3), r"ngroups \(3\) must divide nheads \(4\)"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
    (dict(d_ssm=0), "d_ssm must be None or an integer in 1..d_inner=16, got 0"),
    (dict(d_ssm=32), "d_ssm must be None or an integer in 1..d_inner=16, got 32"),
    (dict(A_init_range=(0, 4)), "A_init_range must be"),
    (dict(d_conv=0), "d_conv must be an integer >= 1"),
])
def test_mamba2_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mamba2(**{"d_model": 8, "d_state": 4, "headdim": 4, **kwargs})


@pytest.mark.parametrize("module", ["mamba", "mamba2"])
@pytest.mark.parametrize("shape,message", [
    ((2, 8), r"must have shape \(\*, \*, 8\), got \(2, 8\)"),           # rank 2
    ((2, 5, 7), r"must have shape \(\*, \*, 8\), got \(2, 5, 7\)"),     # wrong last dimension
    ((2, 0, 8), r"must hold at least one step \(batch, L, d_model\), got \(2, 0, 8\)"),  # length 0
])
def test_module_forward_rejects_bad_input(module, shape, message):
    layer = Mamba(8, d_state=4) if module == "mamba" else Mamba2(8, d_state=4, headdim=4, chunk_size=8)
    name = "hidden_states" if module == "mamba" else "u"
    with pytest.raises(ValueError, match=f"{name} {message}"):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match=f"{name} must have dtype"):
        layer(torch.zeros(2, 5, 8, dtype=torch.long))


def test_rms_norm_gated_rejects():
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1, got 0"):
        RMSNormGated(0)
    for group in (0, 3):
        with pytest.raises(ValueError, match=f"group_size must be None or a positive divisor of hidden_size=8, got {group}"):
            RMSNormGated(8, group_size=group)
    norm = RMSNormGated(8, group_size=4)
    with pytest.raises(ValueError, match=r"x must be a tensor whose last dimension is hidden_size=8, got \(2, 7\)"):
        norm(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"z must be None or shaped like x \(2, 8\), got \(2, 4\)"):
        norm(torch.randn(2, 8), torch.randn(2, 4))


def test_conv_rejects_empty_inputs():
    with pytest.raises(ValueError, match=r"x must be \(batch, dim, L\) with dim >= 1 and L >= 1, got \(2, 4, 0\)"):
        causal_conv1d_fn(torch.randn(2, 4, 0), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"dim >= 1 and L >= 1, got \(2, 0, 5\)"):
        causal_conv1d_fn(torch.randn(2, 0, 5), torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"weight must have width 1..8 \(dim, width\), got width=0"):
        causal_conv1d_fn(torch.randn(2, 4, 5), torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"x must hold at least one channel and one step, got \(2, 4, 0\)"):
        causal_conv1d_update(torch.randn(2, 4, 0), torch.zeros(2, 4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="weight must have width 1..8"):
        causal_conv1d_update(torch.randn(2, 4), torch.zeros(2, 4, 9), torch.randn(4, 9))


def test_state_update_rejects_zero_groups_and_sizes():
    state = torch.zeros(2, 4, 3, 5)
    x = torch.randn(2, 4, 3)
    A = -torch.rand(4, 3, 5)
    with pytest.raises(ValueError, match="B has 0 groups, which must divide nheads=4"):
        selective_state_update(state, x, x, A, torch.randn(2, 0, 5), torch.randn(2, 0, 5))
    with pytest.raises(ValueError, match=r"state must have nonzero nheads, dim and dstate, got \(2, 4, 3, 0\)"):
        selective_state_update(torch.zeros(2, 4, 3, 0), x, x, A[..., :0], torch.randn(2, 1, 0), torch.randn(2, 1, 0))


def inner_args(d_inner=6, rank=2, N=4, d_model=5, width=4, L=7):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(xz=r(2, 2 * d_inner, L), conv1d_weight=r(d_inner, 1, width), conv1d_bias=r(d_inner),
                x_proj_weight=r(rank + 2 * N, d_inner), delta_proj_weight=r(d_inner, rank),
                out_proj_weight=r(d_model, d_inner), out_proj_bias=r(d_model), A=-torch.rand(d_inner, N, generator=g),
                D=r(d_inner), delta_bias=r(d_inner))


@pytest.mark.parametrize("change,message", [
    # A says d_state 4 but x_proj was built for d_state 3: B and C would be sliced from the wrong columns
    (dict(x_proj_weight=torch.randn(2 + 6, 6)), r"x_proj_weight must have dt_rank \+ d_state per input-dependent "
                                                r"B/C = 10 rows \(dt_rank 2 from delta_proj_weight, d_state 4 from A"),
    (dict(A=-torch.rand(6, 3)), "x_proj_weight must have .* = 8 rows .* d_state 3 from A"),
    (dict(x_proj_weight=torch.randn(10, 5)), r"x_proj_weight must have shape \(\*, 6\)"),
    (dict(xz=torch.randn(2, 11, 7)), r"xz must be \(batch, 2 \* d_inner, L\)"),
    (dict(xz=torch.randn(2, 12)), r"xz must have shape \(\*, \*, \*\)"),
    (dict(conv1d_weight=torch.randn(6, 2, 4)), "conv1d_weight must be .* with d_inner=6"),
    (dict(A=-torch.rand(5, 4)), r"A must have shape \(6, \*\)"),
    (dict(delta_proj_weight=torch.randn(6, 0)), "dt_rank >= 1"),
    (dict(out_proj_weight=torch.randn(5, 4)), r"out_proj_weight must have shape \(\*, 6\)"),
    (dict(out_proj_bias=torch.randn(4)), r"out_proj_bias must have shape \(5\)"),
    (dict(dt_rms_weight=torch.randn(3)), r"dt_rms_weight must have shape \(2\)"),
    (dict(xz=torch.randn(2, 12, 0)), "L >= 1"),
])
def test_mamba_inner_fn_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        mamba_inner_fn(**{**inner_args(), **change})


def test_mamba_inner_fn_accepts_given_B_with_a_full_x_proj():
    """mamba_ssm reads dt first and C last, so a constant B with an x_proj of dt_rank + 2N rows is valid."""
    args = inner_args()
    out = mamba_inner_fn(**args, B=torch.randn(6, 4))
    assert out.shape == (2, 7, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_conv_seq_idx_isolates_non_finite_documents(width, poison):
    """A NaN/Inf at the end of document 0 must not reach document 1 (a multiply-by-0 reset gives NaN)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 3, 12, generator=g)
    w, b = torch.randn(3, width, generator=g), torch.randn(3, generator=g)
    seq = torch.zeros(2, 12, dtype=torch.int32)
    seq[:, 5:] = 1
    x[:, 1, 4] = poison  # last step of document 0, read by document 1's first taps without the reset
    x.requires_grad_(True)
    alone = x[..., 5:].detach().clone().requires_grad_(True)
    out = causal_conv1d_fn(x, w, b, seq_idx=seq, activation="silu")
    out_alone = causal_conv1d_fn(alone, w, b, activation="silu")
    torch.testing.assert_close(out[..., 5:], out_alone)
    assert not torch.isfinite(out[:, 1, 4]).any()  # the poison is really there, inside document 0
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    out_alone.backward(grad[..., 5:])
    torch.testing.assert_close(x.grad[..., 5:], alone.grad)  # and no gradient crosses back either


def test_mamba_module_isolates_a_nan_document():
    """End to end through conv and scan (torch path; the Triton scan's resets are tested with the scan,
    19 s here under the interpreter): a NaN token in document 0 leaves document 1's outputs as if it ran
    alone (both resets are selects)."""
    torch.manual_seed(0)
    layer = Mamba(8, d_state=4, backend="torch")
    x = torch.randn(2, 11, 8)
    seq = torch.zeros(2, 11, dtype=torch.int32)
    seq[:, 6:] = 1
    x[:, 5] = float("nan")
    with torch.no_grad():
        out, alone = layer(x, seq_idx=seq), layer(x[:, 6:])
    assert not torch.isfinite(out[:, 5]).any()
    torch.testing.assert_close(out[:, 6:], alone)
