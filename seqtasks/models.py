"""Byte-level models for the synthetic tasks: (batch, L) bytes -> (batch, L, 256) logits.

- ConvText: the seeds' residual Conv1d stack (kernel size and dilation per layer, GELU), with optional
  parameter-free linear self-attention in chosen layers (features elu+1 or DPFP), whose q/k/v are
  "self-invented" by the convolution (QK, KV, QV or QKV) and otherwise the layer input.
- LSTM, Transformer (bidirectional encoder), Mamba and Mamba2 (this repo's kernels).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


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
    def __init__(self, ch, ks, dilation, act="gelu", attn=None, feature="elu"):
        super().__init__()
        if attn is not None and attn not in ("QK", "KV", "QV", "QKV"):
            raise ValueError(f"attention variant must be QK, KV, QV or QKV, got {attn!r}")
        self.attn, self.feature = attn, feature
        out = ch * (len(attn) if attn else 1)
        self.conv = nn.Conv1d(ch, out, ks, padding=dilation * (ks - 1) // 2, dilation=dilation)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[act]

    def forward(self, x):  # (B, C, L)
        y = self.conv(x)
        if self.attn is not None:
            parts = dict(zip(self.attn, y.chunk(len(self.attn), dim=1)))
            q, k, v = (parts.get(n, x).transpose(1, 2) for n in "QKV")
            y = linear_attention(q, k, v, self.feature).transpose(1, 2)
        return x + self.act(y)


class ConvText(nn.Module):
    def __init__(self, ch=64, layers=6, ks=9, dilation=None, act="gelu", attn_layers=(), attn="QK", feature="elu"):
        super().__init__()
        dilation = list(dilation or [1] * layers)
        if len(dilation) != layers:
            raise ValueError(f"dilation needs one entry per layer ({layers}), got {dilation}")
        self.embed = nn.Embedding(256, ch)
        self.layers = nn.ModuleList(ConvLayer(ch, ks, d, act, attn if i in set(attn_layers) else None, feature)
                                    for i, d in enumerate(dilation))
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


class MambaText(nn.Module):
    """Pre-norm residual stack of Mamba (version 1) or Mamba2 blocks from kernels/."""

    def __init__(self, ch=64, layers=2, version=1, d_state=16, expand=2, headdim=16, chunk_size=64, backend=None):
        super().__init__()
        self.embed = nn.Embedding(256, ch)
        if version == 1:
            make = lambda: kernels.Mamba(ch, d_state=d_state, expand=expand, backend=backend)  # noqa: E731
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


MODELS = {"conv": ConvText, "lstm": LSTMText, "transformer": TransformerText,
          "mamba": lambda **k: MambaText(version=1, **k), "mamba2": lambda **k: MambaText(version=2, **k)}
POSITIVE_INT_ARGS = ("ch", "layers", "ks", "heads", "d_state", "headdim", "chunk_size", "max_len")


def build_model(kind: str, **kw) -> nn.Module:
    if kind not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {kind!r}")
    for key in POSITIVE_INT_ARGS:
        v = kw.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"model_args {key} must be an integer >= 1, got {v!r}")
    return MODELS[kind](**kw)
