"""mamba_inner_fn: conv -> x_proj -> dt_proj -> selective scan -> out_proj, mamba_ssm's argument list.

Composed from the separate ops (autograd joins them); mamba_ssm fuses the whole block in one autograd
function to save activations (checkpoint_lvl), which is accepted here and ignored.
"""
from __future__ import annotations

import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, check, check_tensor
from ..causal_conv1d import causal_conv1d_fn
from .interface import selective_scan_fn


def _rms(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _validate(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C,
              B_proj_bias, C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight):
    """The projections' shapes against xz and A, so a mismatch is named instead of sliced silently."""
    check_tensor("xz", xz, (None, None, None), FLOAT_DTYPES)
    check(xz.shape[1] >= 2 and xz.shape[1] % 2 == 0, f"xz must be (batch, 2 * d_inner, L) = [x; z], got {tuple(xz.shape)}")
    d_inner, dev = xz.shape[1] // 2, xz.device
    check_tensor("conv1d_weight", conv1d_weight, None, FLOAT_DTYPES, dev)
    check(tuple(conv1d_weight.shape[:1]) == (d_inner,) and (conv1d_weight.dim() == 2 or
                                                            (conv1d_weight.dim() == 3 and conv1d_weight.shape[1] == 1)),
          f"conv1d_weight must be (d_inner, 1, width) or (d_inner, width) with d_inner={d_inner}, "
          f"got {tuple(conv1d_weight.shape)}")
    check_tensor("A", A, (d_inner, None), None, dev)
    d_state = A.shape[1]
    check_tensor("delta_proj_weight", delta_proj_weight, (d_inner, None), FLOAT_DTYPES, dev)
    delta_rank = delta_proj_weight.shape[1]
    check(delta_rank >= 1, f"delta_proj_weight must be (d_inner, dt_rank) with dt_rank >= 1, got {tuple(delta_proj_weight.shape)}")
    check_tensor("x_proj_weight", x_proj_weight, (None, d_inner), FLOAT_DTYPES, dev)
    rows, want = x_proj_weight.shape[0], delta_rank + d_state * ((B is None) + (C is None))
    # B and C input-dependent: exactly [dt; B; C]; otherwise mamba_ssm reads dt first and C last, so more rows pass
    check(rows == want if B is None and C is None else rows >= want,
          f"x_proj_weight must have dt_rank + d_state per input-dependent B/C = {want} rows (dt_rank {delta_rank} "
          f"from delta_proj_weight, d_state {d_state} from A {tuple(A.shape)}), got {tuple(x_proj_weight.shape)}")
    check_tensor("out_proj_weight", out_proj_weight, (None, d_inner), FLOAT_DTYPES, dev)
    check_tensor("out_proj_bias", out_proj_bias, (out_proj_weight.shape[0],), FLOAT_DTYPES, dev, optional=True)
    for name, t, size in (("B_proj_bias", B_proj_bias, d_state), ("C_proj_bias", C_proj_bias, d_state),
                          ("b_rms_weight", b_rms_weight, d_state), ("c_rms_weight", c_rms_weight, d_state),
                          ("dt_rms_weight", dt_rms_weight, delta_rank)):
        check_tensor(name, t, (size,), FLOAT_DTYPES, dev, optional=True)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, seq_idx=None, backend=None):
    """xz: (batch, 2 * d_inner, L) = [x; z]; conv1d_weight (d_inner, 1, width) or (d_inner, width);
    returns (batch, L, d_model). B/C None means input-dependent (taken from x_proj's output)."""
    _validate(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C,
              B_proj_bias, C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight)
    delta_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    w = conv1d_weight.reshape(conv1d_weight.shape[0], -1)
    conv_out = causal_conv1d_fn(x, w, conv1d_bias, seq_idx=seq_idx, activation="silu")
    x_dbl = F.linear(conv_out.transpose(1, 2), x_proj_weight)  # (batch, L, rank + 2N)
    dt = x_dbl[..., :delta_rank]
    if dt_rms_weight is not None:
        dt = _rms(dt, dt_rms_weight, b_c_dt_rms_eps)
    delta = F.linear(dt, delta_proj_weight).transpose(1, 2)  # (batch, d_inner, L)
    if B is None:
        B = x_dbl[..., delta_rank:delta_rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias
        if b_rms_weight is not None:
            B = _rms(B, b_rms_weight, b_c_dt_rms_eps)
        B = B.transpose(1, 2).contiguous()  # (batch, N, L)
    if C is None:
        C = x_dbl[..., -d_state:]
        if C_proj_bias is not None:
            C = C + C_proj_bias
        if c_rms_weight is not None:
            C = _rms(C, c_rms_weight, b_c_dt_rms_eps)
        C = C.transpose(1, 2).contiguous()
    y = selective_scan_fn(conv_out, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          seq_idx=seq_idx, backend=backend)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
