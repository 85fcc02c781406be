"""The Mamba-2 block (mamba_ssm.modules.mamba2.Mamba2): same parameter names, shapes and initialisation;
in_proj output [z, x, B, C, dt]; depthwise conv over [x, B, C]; SSD; gated RMSNorm; forward(u, seq_idx)
and step-by-step decoding.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..ssd import mamba_chunk_scan_combined
from ..ssd.reference import process_dt
from ..state_update import selective_state_update
from .._utils import check
from .mamba_simple import CachedStates, check_block_args, check_positive_ints, check_sequence, init_dt_bias, is_int


class RMSNormGated(nn.Module):
    """rmsnorm(x * silu(z)) * weight (norm_before_gate=False), or rmsnorm(x) * weight * silu(z); the
    norm is taken per group of group_size channels (mamba_ssm.ops.triton.layernorm_gated.RMSNorm)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        check_positive_ints(hidden_size=hidden_size)
        check(group_size is None or (is_int(group_size) and group_size >= 1 and hidden_size % group_size == 0),
              f"group_size must be None or a positive divisor of hidden_size={hidden_size}, got {group_size!r}")
        check(eps >= 0, f"eps must be >= 0, got {eps}")
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = hidden_size if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        hidden = self.weight.shape[0]
        check(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == hidden,
              f"x must be a tensor whose last dimension is hidden_size={hidden}, got "
              f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check(z is None or (isinstance(z, torch.Tensor) and z.shape == x.shape),
              f"z must be None or shaped like x {tuple(x.shape)}, got "
              f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        xg = x.unflatten(-1, (-1, self.group_size))
        x = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.float())
        return x.to(dtype)


class Mamba2(CachedStates, nn.Module):
    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False, conv_bias=True,
                 chunk_size=256, use_mem_eff_path=True, layer_idx=None, device=None, dtype=None, backend=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        check_block_args(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor)
        check_positive_ints(headdim=headdim, ngroups=ngroups, chunk_size=chunk_size)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        check(is_int(self.d_ssm) and 1 <= self.d_ssm <= self.d_inner,
              f"d_ssm must be None or an integer in 1..d_inner={self.d_inner}, got {d_ssm!r}")
        check(self.d_ssm % headdim == 0, f"headdim ({headdim}) must divide d_ssm ({self.d_ssm})")
        self.headdim, self.ngroups = headdim, ngroups
        self.nheads = self.d_ssm // headdim
        check(self.nheads % ngroups == 0, f"ngroups ({ngroups}) must divide nheads ({self.nheads})")
        check(len(A_init_range) == 2 and 0 < A_init_range[0] <= A_init_range[1],
              f"A_init_range must be (low, high) with 0 < low <= high, got {A_init_range!r}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit, self.chunk_size, self.layer_idx, self.backend = dt_limit, chunk_size, layer_idx, backend
        self.use_mem_eff_path = use_mem_eff_path  # accepted for compatibility
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, bias=conv_bias, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor, device))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _split(self, zxbcdt):
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _finish(self, y, z, z0, x0):
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:  # the optional MLP half of in_proj (d_ssm < d_inner)
            y = torch.cat([F.silu(z0) * x0, y], -1)
        return self.out_proj(y)

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        """u: (batch, L, d_model); seq_idx: (batch, L) int for packed documents."""
        if cu_seqlens is not None:
            raise NotImplementedError("cu_seqlens is not supported: pass seq_idx (batch, L) instead")
        check_sequence("u", u, self.d_model)
        L = u.shape[1]
        conv_state, ssm_state, out = self._cached_or_step(inference_params, u)
        if out is not None:
            return out
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        A = -torch.exp(self.A_log.float())
        xBC_t = xBC.transpose(1, 2)
        if conv_state is not None:
            conv_state.copy_(F.pad(xBC_t, (self.d_conv - L, 0)) if L < self.d_conv else xBC_t[..., -self.d_conv:])
        xBC = causal_conv1d_fn(xBC_t, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                               activation="silu").transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        res = mamba_chunk_scan_combined(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, A, B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)), self.chunk_size, D=D,
            z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)), dt_bias=self.dt_bias,
            dt_softplus=True, seq_idx=seq_idx, dt_limit=self.dt_limit, return_final_states=ssm_state is not None,
            backend=self.backend)
        if ssm_state is not None:
            res, final = res
            ssm_state.copy_(final)
        return self._finish(res.flatten(-2), z, z0, x0)

    def step(self, hidden_states, conv_state, ssm_state):
        if hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token at a time: (batch, 1, d_model), got {tuple(hidden_states.shape)}")
        z0, x0, z, xBC, dt = self._split(self.in_proj(hidden_states.squeeze(1)))
        xBC = causal_conv1d_update(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        dt = process_dt(dt, self.dt_bias, True, self.dt_limit)  # (batch, nheads), as in the full forward
        hp = (self.nheads, self.headdim)
        D = self.D.view(hp) if self.D_has_hdim else self.D[:, None].expand(hp)
        y = selective_state_update(
            ssm_state, x.unflatten(-1, hp), dt[..., None].expand(-1, *hp), A[:, None, None].expand(*hp, self.d_state),
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)), D=D,
            z=None if self.rmsnorm else z.unflatten(-1, hp))
        return self._finish(y.flatten(-2), z, z0, x0).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device,
                                 dtype=dtype or self.conv1d.weight.dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=dtype or self.in_proj.weight.dtype)
        return conv_state, ssm_state
