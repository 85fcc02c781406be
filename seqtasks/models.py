"""Byte-level models for the synthetic tasks: (batch, L) bytes -> (batch, L, 256) logits.

- ConvText: the seeds' residual Conv1d stack (kernel size and dilation per layer, GELU), with optional
  parameter-free linear self-attention in chosen layers (features elu+1 or DPFP), whose q/k/v are
  "self-invented" by the convolution (QK, KV, QV or QKV) and otherwise the layer input; or, with
  attn_heads > 0, torch's nn.MultiheadAttention with that many heads (seed 001's "attn 0,0,X" rows).
- LSTM, Transformer (bidirectional encoder), EncDecTransformer (encoder over the masked string, decoder
  whose queries are the positions, cross-attending to it), Mamba and Mamba2 (this repo's kernels), and
  ScanMamba: a pure-torch Mamba block on the parallel scan with a choice of discretisation (seed 004).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.selective_scan.pscan import parallel_scan
from kernels.selective_scan.reference import DISCRETIZATIONS, discretize


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "dpfp":  # deterministic parameter-free projection, nu = 1 (Schlag, Irie & Schmidhuber 2021)
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
        return r * torch.roll(r, shifts=1, dims=-1)
    raise ValueError(f"attention feature map must be 'elu' or 'dpfp', got {kind!r}")


def linear_attention(q, k, v, kind="elu"):
    """(B, L, C) each: q @ (k^T @ v), normalised by L * C; no parameters, any length."""
    q, k = feature_map(q, kind), feature_map(k, kind)
    return q @ (k.transpose(1, 2) @ v) / (v.shape[-1] * v.shape[-2])


class ConvLayer(nn.Module):
    def __init__(self, ch, ks, dilation, act="gelu", attn=None, feature="elu", attn_heads=0):
        super().__init__()
        if attn is not None and attn not in ("QK", "KV", "QV", "QKV"):
            raise ValueError(f"attention variant must be QK, KV, QV or QKV, got {attn!r}")
        self.attn, self.feature = attn, feature
        out = ch * (len(attn) if attn else 1)
        self.conv = nn.Conv1d(ch, out, ks, padding=dilation * (ks - 1) // 2, dilation=dilation)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[act]
        # attention over positions with the channels as embedding, so any sequence length works (seed 001)
        self.mha = nn.MultiheadAttention(ch, attn_heads, batch_first=True) if attn and attn_heads else None

    def forward(self, x):  # (B, C, L)
        y = self.conv(x)
        if self.attn is not None:
            parts = dict(zip(self.attn, y.chunk(len(self.attn), dim=1)))
            q, k, v = (parts.get(n, x).transpose(1, 2) for n in "QKV")
            y = (self.mha(q, k, v, need_weights=False)[0] if self.mha is not None
                 else linear_attention(q, k, v, self.feature)).transpose(1, 2)
        return x + self.act(y)


class ConvText(nn.Module):
    def __init__(self, ch=64, layers=6, ks=9, dilation=None, act="gelu", attn_layers=(), attn="QK", feature="elu",
                 attn_heads=0):
        super().__init__()
        dilation = list(dilation or [1] * layers)
        if len(dilation) != layers:
            raise ValueError(f"dilation needs one entry per layer ({layers}), got {dilation}")
        if isinstance(attn_heads, bool) or not isinstance(attn_heads, int) or attn_heads < 0 or (
                attn_heads and ch % attn_heads):
            raise ValueError(f"attn_heads must be 0 (linear attention) or a divisor of ch={ch}, got {attn_heads!r}")
        self.embed = nn.Embedding(256, ch)
        self.layers = nn.ModuleList(ConvLayer(ch, ks, d, act, attn if i in set(attn_layers) else None, feature,
                                              attn_heads) for i, d in enumerate(dilation))
        self.head = nn.Linear(ch, 256, bias=False)

    def forward(self, x):
        h = self.embed(x).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.transpose(1, 2))


class LSTMText(nn.Module):
    def __init__(self, ch=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(256, ch)
        self.lstm = nn.LSTM(ch, ch, layers, batch_first=True)
        self.head = nn.Linear(ch, 256, bias=False)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


class TransformerText(nn.Module):
    def __init__(self, ch=64, layers=4, heads=8, max_len=256):
        super().__init__()
        if ch % heads:
            raise ValueError(f"heads ({heads}) must divide ch ({ch})")
        self.embed = nn.Embedding(256, ch)
        self.pos = nn.Parameter(torch.randn(max_len, ch) * 0.02)
        layer = nn.TransformerEncoderLayer(ch, heads, 4 * ch, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(ch, 256, bias=False)

    def forward(self, x):
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} bytes is longer than max_len={self.pos.shape[0]}")
        return self.head(self.encoder(self.embed(x) + self.pos[:x.shape[1]]))


class EncDecTransformer(nn.Module):
    """Encoder over the masked string; a decoder whose inputs are the masked string again (answer bytes
    are 0, so its queries carry only positions there) with self-attention and cross-attention to the
    encoder's memory. Non-autoregressive: all answer bytes at once, as every model here (seed 004's
    baseline decodes one byte at a time with teacher forcing; the masked-task runner has no such loop)."""

    def __init__(self, ch=64, layers=2, heads=8, max_len=256):
        super().__init__()
        if ch % heads:
            raise ValueError(f"heads ({heads}) must divide ch ({ch})")
        self.embed = nn.Embedding(256, ch)
        self.pos = nn.Parameter(torch.randn(max_len, ch) * 0.02)  # trained, as seed 004's best setting
        with warnings.catch_warnings():  # nested tensors are off with norm_first: torch says so, harmlessly
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(ch, heads, layers, layers, 4 * ch, dropout=0.0, batch_first=True,
                                              norm_first=True)
        self.head = nn.Linear(ch, 256, bias=False)

    def forward(self, x):
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} bytes is longer than max_len={self.pos.shape[0]}")
        h = self.embed(x) + self.pos[:x.shape[1]]
        return self.head(self.transformer(h, h))


class ScanMambaBlock(nn.Module):
    """Mamba (version 1) in plain torch: in_proj, causal depthwise conv, input-dependent dt, B, C, the
    selective scan by kernels.selective_scan.pscan.parallel_scan, D skip, SiLU gate, out_proj."""

    def __init__(self, ch, d_state=16, expand=2, d_conv=4, discretization="zoh"):
        super().__init__()
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization must be one of {', '.join(DISCRETIZATIONS)}, got {discretization!r}")
        d_inner, self.dt_rank, self.d_state = expand * ch, max(1, -(-ch // 16)), d_state
        self.discretization = discretization
        self.in_proj = nn.Linear(ch, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        with torch.no_grad():  # dt in [1e-3, 1e-1] at start, log-uniform, as in Mamba
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, ch, bias=False)

    def forward(self, x):  # (B, L, ch)
        L = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :L].transpose(1, 2))  # (B, L, d_inner)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))[..., None]  # (B, L, d_inner, 1)
        decay, coef = discretize(dt, -torch.exp(self.A_log), self.discretization)  # (B, L, d_inner, N)
        inputs = coef * Bm[:, :, None, :] * u[..., None]
        # time is already dim -2 once (d_inner, N) are flattened: no transposed copies
        h = parallel_scan(decay.flatten(2), inputs.flatten(2)).unflatten(2, decay.shape[2:])
        y = (h @ Cm[..., None]).squeeze(-1) + self.D * u
        return self.out_proj(y * F.silu(z))


class MambaText(nn.Module):
    """Pre-norm residual stack of Mamba (version 1) or Mamba2 blocks from kernels/."""

    def __init__(self, ch=64, layers=2, version=1, d_state=16, expand=2, headdim=16, chunk_size=64, backend=None,
                 discretization="zoh"):
        super().__init__()
        self.embed = nn.Embedding(256, ch)
        if version == "scan":
            make = lambda: ScanMambaBlock(ch, d_state, expand, discretization=discretization)  # noqa: E731
        elif version == 1:
            make = lambda: kernels.Mamba(ch, d_state=d_state, expand=expand, backend=backend,  # noqa: E731
                                         discretization=discretization)
        elif discretization != "zoh":
            raise ValueError(f"discretization {discretization!r} needs model 'mamba' or 'scan_mamba'; Mamba2's SSD "
                             f"is defined with its own (approximate ZOH) discretization only")
        else:
            make = lambda: kernels.Mamba2(ch, d_state=d_state, expand=expand, headdim=headdim,  # noqa: E731
                                          chunk_size=chunk_size, backend=backend)
        self.blocks = nn.ModuleList(make() for _ in range(layers))
        self.norms = nn.ModuleList(nn.RMSNorm(ch) for _ in range(layers + 1))
        self.head = nn.Linear(ch, 256, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.norms[-1](h))


MODELS = {"conv": ConvText, "lstm": LSTMText, "transformer": TransformerText, "encdec": EncDecTransformer,
          "mamba": lambda **k: MambaText(version=1, **k), "mamba2": lambda **k: MambaText(version=2, **k),
          "scan_mamba": lambda **k: MambaText(version="scan", **k)}
POSITIVE_INT_ARGS = ("ch", "layers", "ks", "heads", "d_state", "headdim", "chunk_size", "max_len", "expand")


def build_model(kind: str, **kw) -> nn.Module:
    if kind not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {kind!r}")
    for key in POSITIVE_INT_ARGS:
        v = kw.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"model_args {key} must be an integer >= 1, got {v!r}")
    return MODELS[kind](**kw)
