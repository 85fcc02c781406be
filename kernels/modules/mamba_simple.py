"""The Mamba block (mamba_ssm.modules.mamba_simple.Mamba): same parameter names, shapes and initialisation,
so mamba_ssm state dicts load; forward on (batch, L, d_model), optional seq_idx for packed documents, and
step-by-step decoding with a cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, check, check_tensor
from ..causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from ..selective_scan import selective_scan_fn
from ..selective_scan.reference import DISCRETIZATIONS
from ..state_update import selective_state_update

MAX_CONV_WIDTH = 8  # causal_conv1d_fn's limit


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_ints(**values) -> None:
    for name, v in values.items():
        check(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")


def check_block_args(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor) -> None:
    """Constructor arguments shared by Mamba and Mamba2."""
    check_positive_ints(d_model=d_model, d_state=d_state, d_conv=d_conv)
    check(d_conv <= MAX_CONV_WIDTH, f"d_conv must be in 1..{MAX_CONV_WIDTH} (the causal conv's width), got {d_conv}")
    check(isinstance(expand, (int, float)) and not isinstance(expand, bool) and int(expand * d_model) >= 1,
          f"expand must be a number with int(expand * d_model) >= 1, got expand={expand!r}, d_model={d_model}")
    check(0 < dt_min <= dt_max, f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    check(dt_init_floor >= 0, f"dt_init_floor must be >= 0, got {dt_init_floor}")


def check_sequence(name: str, x, d_model: int) -> None:
    """x must be (batch, L, d_model) with L >= 1."""
    check_tensor(name, x, (None, None, d_model), FLOAT_DTYPES)
    check(x.shape[1] >= 1, f"{name} must hold at least one step (batch, L, d_model), got {tuple(x.shape)}")


@dataclass
class InferenceParams:
    """Decoding cache holder, as mamba_ssm.utils.generation.InferenceParams: per layer_idx a
    (conv_state, ssm_state) pair; seqlen_offset > 0 means single-token steps."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)


class CachedStates:
    """The per-layer (conv_state, ssm_state) lookup shared by Mamba and Mamba2."""

    def _cached_or_step(self, inference_params, hidden_states):
        """(conv_state, ssm_state, out): states are None without a cache; out is the single-token step's
        output once past the prompt (seqlen_offset > 0), else None and the caller runs the full forward."""
        if inference_params is None:
            return None, None, None
        conv_state, ssm_state = self._get_states_from_cache(inference_params, hidden_states.shape[0])
        if inference_params.seqlen_offset > 0:
            return conv_state, ssm_state, self.step(hidden_states, conv_state, ssm_state)[0]
        return conv_state, ssm_state, None

    def _get_states_from_cache(self, inference_params, batch_size):
        if self.layer_idx is None:
            raise ValueError(f"decoding with inference_params needs {type(self).__name__}(layer_idx=...)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        return cache[self.layer_idx]


def init_dt_bias(d_inner, dt_min, dt_max, dt_init_floor, device=None):
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max] (floored), so softplus(bias) = dt."""
    dt = torch.exp(torch.rand(d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(CachedStates, nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, backend=None, discretization="zoh"):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        check(dt_init in ("constant", "random"), f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        check(discretization in DISCRETIZATIONS,
              f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
        check_block_args(d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor)
        check(dt_rank == "auto" or (is_int(dt_rank) and dt_rank >= 1),
              f"dt_rank must be 'auto' or an integer >= 1, got {dt_rank!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path  # accepted for compatibility; the ops are always the fast ones here
        self.layer_idx = layer_idx
        self.backend = backend
        self.discretization = discretization  # "zoh" is Mamba's; the others are torch/ref-backend options (seed 004)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, bias=conv_bias, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # S4D-real initialisation: A = -(1..N)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states, inference_params=None, seq_idx=None):
        """hidden_states: (batch, L, d_model); seq_idx: (batch, L) int, no state crosses a change."""
        check_sequence("hidden_states", hidden_states, self.d_model)
        check(inference_params is None or self.discretization == "zoh",
              f"step decoding (inference_params) supports discretization='zoh' only, got {self.discretization!r}")
        conv_state, ssm_state, out = self._cached_or_step(inference_params, hidden_states)
        if out is not None:
            return out
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        A = -torch.exp(self.A_log.float())
        if conv_state is not None:  # prefill: keep the last d_conv inputs
            conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)) if x.shape[-1] < self.d_conv else x[..., -self.d_conv:])
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added (fp32) inside the scan
        B = B.transpose(1, 2).contiguous()
        C = C.transpose(1, 2).contiguous()
        y = selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, return_last_state=ssm_state is not None, seq_idx=seq_idx,
                              discretization=self.discretization, backend=self.backend)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states, conv_state, ssm_state):
        """One token: hidden_states (batch, 1, d_model); states updated in place."""
        if hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token at a time: hidden_states (batch, 1, d_model), got {tuple(hidden_states.shape)}")
        xz = self.in_proj(hidden_states.squeeze(1))
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias, dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=dtype or self.conv1d.weight.dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=dtype or self.dt_proj.weight.dtype)
        return conv_state, ssm_state

