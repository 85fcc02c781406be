"""Opt-in torch.compile helpers for the CPU (inductor's C++ backend).

`compiled_selective_scan` is the Mamba-1 zoh selective scan written as plain differentiable tensor code
(decays, inputs, a chunked linear scan, the read-out) and handed whole to torch.compile, so that inductor
fuses it into a few C++ loops and derives the backward itself. It is not what `selective_scan_fn` does under
torch.compile: there the scan is one opaque custom op (kernels/compile_ops.py) whose backward recomputes the
forward, so compiling a model around it fuses only the ops outside the scan.

When it pays (2-core x86 VM, torch 2.13 CPU, one thread, process CPU time; records in the README / devlog):
against the eager torch backend after its piece rewrite, the compiled scan ran the forward in 0.5-0.6x at
(1, 256, 64, 16) and (4, 128, 64, 16) and 0.66x at (4, 128, 256, 16), forward+backward in 0.6-1.0x at L 64;
from (1, 256, 256, 16) on both are slower (forward 1.0-1.35x, forward+backward 1.4-1.7x), which is why it
is not the default and suits short-sequence inference. It saves (batch, dim, L, N) tensors for the backward like
mambapy, and every new shape compiles again (3-24 s on that machine, 0.1-2.5 s from a warm inductor cache).
Past torch._dynamo.config.cache_size_limit shapes (8 by default) dynamo runs the functional code eagerly,
which is several times slower than the eager torch backend (raise the limit for many shapes; dynamic=True
does not help: the sub-chunk size sqrt(L) specialises on L anyway, 15-20 s per length, and its code ran
1.1-2x slower than eager at L 64..256). No packed documents (seq_idx) and zoh only: use selective_scan_fn
for those.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan.interface import validate_selective_scan
from .selective_scan.torch_scan import chunked_linear_scan

_COMPILED = {}


def _scan(u, delta, A, B, C, D, z, delta_bias, softplus: bool):
    """Differentiable zoh scan on fp32/fp64 inputs. B, C: (dim, N), (batch, N, L) or (batch, G, N, L)."""
    batch, dim, L = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if softplus:
        dt = F.softplus(dt)

    def per_step(M):  # -> broadcastable (batch|1, dim|1, L|1, N)
        if M.dim() == 2:
            return M[None, :, None, :]
        if M.dim() == 3:
            return M.transpose(1, 2)[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1).transpose(2, 3)
    a = torch.exp(dt[..., None] * A[:, None, :])  # (batch, dim, L, N)
    x = (dt * u)[..., None] * per_step(B)
    h = chunked_linear_scan(a, x, x.new_zeros(batch, dim, A.shape[1]))
    y = (h * per_step(C)).sum(-1)
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def compiled_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            dynamic: bool | None = False):
    """selective_scan_fn's zoh scan (no seq_idx, no last state) through torch.compile; out in u's dtype.
    dynamic: passed to torch.compile (False: one compile per shape, the fastest code)."""
    validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, None, "zoh", "torch")
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(work)  # noqa: E731
    key = (bool(dynamic),)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_scan, dynamic=dynamic)
    out = _COMPILED[key](cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z), cast(delta_bias),
                         bool(delta_softplus))
    return out.to(u.dtype)
