"""selective_state_update, mamba_inner_fn and the Mamba module."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import TRITON_DEVICE
from kernels import (InferenceParams, Mamba, mamba_inner_fn, selective_scan_fn, selective_state_update,
                     selective_state_update_ref)


@pytest.mark.parametrize("heads,groups", [(0, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("options", [True, False])
def test_state_update_against_reference(heads, groups, options):
    g = torch.Generator().manual_seed(heads + groups)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    b, dim, N = 3, 5, 4
    hs = (heads,) if heads else ()
    state = r(b, *hs, dim, N)
    x, dt = r(b, *hs, dim), r(b, *hs, dim)
    A = -torch.rand(*hs, dim, N, generator=g)
    B = r(b, groups, N) if heads else r(b, N)
    C = r(b, groups, N) if heads else r(b, N)
    kw = dict(D=r(*hs, dim), z=r(b, *hs, dim), dt_bias=r(*hs, dim), dt_softplus=True) if options else {}
    s1, s2 = state.clone(), state.clone()
    y1 = selective_state_update(s1, x, dt, A, B, C, **kw)
    y2 = selective_state_update_ref(s2, x, dt, A, B, C, **kw)
    torch.testing.assert_close(y1, y2, rtol=3e-4, atol=1e-3)  # upstream's fp32 tolerance
    torch.testing.assert_close(s1, s2, rtol=3e-4, atol=1e-3)
    assert not torch.allclose(s1, state)


def test_state_update_steps_equal_the_scan():
    """Repeated decoding steps reproduce selective_scan_fn's outputs and last state."""
    g = torch.Generator().manual_seed(0)
    b, dim, L, N = 2, 6, 9, 4
    u, delta = torch.randn(b, dim, L, generator=g), torch.randn(b, dim, L, generator=g)
    A, B, C = -torch.rand(dim, N, generator=g), torch.randn(b, N, L, generator=g), torch.randn(b, N, L, generator=g)
    D, z, bias = torch.randn(dim, generator=g), torch.randn(b, dim, L, generator=g), torch.randn(dim, generator=g)
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    state = torch.zeros(b, dim, N)
    ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
          for t in range(L)]
    torch.testing.assert_close(torch.stack(ys, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_state_update_bad_inputs():
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\)"):
        selective_state_update(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(3, 4),
                               torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="B has 3 groups, which must divide nheads=4"):
        selective_state_update(torch.zeros(2, 4, 3, 5), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(4, 3, 5),
                               torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))


# ------------------------------------------------------------------ Mamba module

MAMBA_SSM_KEYS = {  # mamba_ssm.modules.mamba_simple.Mamba(d_model=32) state dict: names and shapes
    "A_log": (64, 16), "D": (64,), "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
    "x_proj.weight": (34, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,), "out_proj.weight": (32, 64),
}


def test_state_dict_matches_mamba_ssm_and_loads():
    m = Mamba(32)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_KEYS
    foreign = {k: torch.randn(s) for k, s in MAMBA_SSM_KEYS.items()}
    m.load_state_dict(foreign, strict=True)
    assert torch.equal(m.x_proj.weight, foreign["x_proj.weight"])


def test_initialisation_like_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8, dt_min=0.001, dt_max=0.1)
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1, 9.0).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)  # the bias is the inverse softplus of dt in [dt_min, dt_max]
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    std = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= std and m.dt_rank == math.ceil(64 / 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_decoding_equals_forward(backend):
    torch.manual_seed(1)
    dev = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    m = Mamba(16, d_state=4, layer_idx=0, backend=backend).to(dev)
    x = torch.randn(2, 11, 16, device=dev)
    with torch.no_grad():
        full = m(x)
        ip = InferenceParams(max_seqlen=11, max_batch_size=2)
        prefill = m(x[:, :5], inference_params=ip)  # prefill 5 tokens, then step
        ip.seqlen_offset = 5
        steps = []
        for t in range(5, 11):
            steps.append(m(x[:, t:t + 1], inference_params=ip))
            ip.seqlen_offset += 1
    torch.testing.assert_close(torch.cat([prefill] + steps, 1), full, rtol=1e-4, atol=1e-5)


def test_module_seq_idx_isolates_documents_and_trains():
    torch.manual_seed(2)
    m = Mamba(16, d_state=4)
    x = torch.randn(1, 20, 16, requires_grad=True)
    seq = torch.zeros(1, 20, dtype=torch.int32)
    seq[:, 8:] = 1
    out = m(x, seq_idx=seq)
    torch.testing.assert_close(out[:, 8:], m(x[:, 8:]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :8], m(x[:, :8]), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_mamba_inner_fn_matches_module():
    torch.manual_seed(3)
    m = Mamba(16, d_state=4)
    x = torch.randn(2, 9, 16)
    xz = m.in_proj(x).transpose(1, 2)
    out = mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight,
                         m.out_proj.bias, -torch.exp(m.A_log.float()), None, None, m.D.float(),
                         delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)


def test_global_backend_switch_reaches_the_module():
    torch.manual_seed(4)
    m = Mamba(8, d_state=2)
    x = torch.randn(1, 6, 8)
    with kernels.use_backend("ref"):
        ref = m(x)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)
