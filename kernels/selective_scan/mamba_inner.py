"""mamba_inner_fn: conv -> x_proj -> dt_proj -> selective scan -> out_proj, mamba_ssm's argument list.

Composed from the separate ops (autograd joins them); mamba_ssm fuses the whole block in one autograd
function to save activations (checkpoint_lvl), which is accepted here and ignored.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d_fn
from .interface import selective_scan_fn


def _rms(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, seq_idx=None, backend=None):
    """xz: (batch, 2 * d_inner, L) = [x; z]; conv1d_weight (d_inner, 1, width) or (d_inner, width);
    returns (batch, L, d_model). B/C None means input-dependent (taken from x_proj's output)."""
    L = xz.shape[-1]
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
