"""selective_scan_fn: mamba_ssm's Mamba-1 scan, with Triton / chunked-torch / reference backends."""
from __future__ import annotations

import torch

from .._utils import FLOAT_DTYPES, check, check_tensor, resolve_backend
from .reference import DISCRETIZATIONS, selective_scan_ref
from .torch_scan import selective_scan_torch

MAX_DSTATE = 256


def validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, seq_idx, discretization, backend):
    check_tensor("u", u, (None, None, None), FLOAT_DTYPES)
    batch, dim, L = u.shape
    dev = u.device
    check(L >= 1, f"u must have at least one time step, got shape {tuple(u.shape)}")
    check_tensor("delta", delta, (batch, dim, L), FLOAT_DTYPES, dev)
    check_tensor("A", A, None, None, dev)
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (real A only, as in every released Mamba model); "
                                  "pass A as a real float32 tensor of shape (dim, dstate)")
    check_tensor("A", A, (dim, None), (torch.float32, torch.float64))
    N = A.shape[1]
    check(1 <= N <= MAX_DSTATE, f"A must have 1..{MAX_DSTATE} state dims (dim, dstate), got dstate={N}")
    groups = []
    for name, M in (("B", B), ("C", C)):
        check_tensor(name, M, None, FLOAT_DTYPES, dev)
        if M.dim() == 2:
            check_tensor(name, M, (dim, N))
        elif M.dim() == 3:
            check_tensor(name, M, (batch, N, L))
        elif M.dim() == 4:
            check_tensor(name, M, (batch, None, N, L))
            G = M.shape[1]
            check(G >= 1 and dim % G == 0, f"{name} has {G} groups, which must divide dim={dim}")
            groups.append(G)
        else:
            check(False, f"{name} must have shape (dim, dstate)=({dim}, {N}), (batch, dstate, L)=({batch}, {N}, {L}) "
                         f"or (batch, groups, dstate, L), got {tuple(M.shape)}")
    check(len(set(groups)) <= 1, f"B and C must have the same number of groups, got {groups}")
    check_tensor("D", D, (dim,), (torch.float32, torch.float64), dev, optional=True)
    check_tensor("z", z, (batch, dim, L), FLOAT_DTYPES, dev, optional=True)
    check_tensor("delta_bias", delta_bias, (dim,), (torch.float32, torch.float64), dev, optional=True)
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, (batch, L), (torch.int32, torch.int64), dev)
    check(discretization in DISCRETIZATIONS, f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    if backend == "triton":
        check(discretization == "zoh", f"discretization={discretization!r} is available in the torch and ref backends only")
        check(u.dtype != torch.float64, "the triton backend takes float16/bfloat16/float32 u; use backend='torch' "
                                        "or 'ref' for float64")


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus, return_last_state):
        from .triton_scan import selective_scan_fwd
        out, boundaries = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx, softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, boundaries)
        ctx.softplus = softplus
        # the last state is the final boundary; a copy, so that changing it cannot corrupt the saved tensor
        last = boundaries[:, :, -1].clone() if return_last_state else None
        if last is not None:
            ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):  # the last state's gradient is not propagated (as upstream)
        from .triton_scan import selective_scan_bwd
        u, delta, A, B, C, D, z, delta_bias, seq_idx, boundaries = ctx.saved_tensors
        grads = selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, ctx.softplus, boundaries)
        return (*grads, None, None, None)


def _time_contiguous(x):
    """x itself when its time (last) axis has stride 1, else a contiguous copy: the kernels take any strides,
    but load along time, and a strided time axis would make every load uncoalesced."""
    return x if (x is None or x.dim() < 3 or x.stride(-1) == 1) else x.contiguous()


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, seq_idx=None, discretization="zoh", backend=None):
    """Mamba-1 selective scan, mamba_ssm's signature plus `seq_idx`, `discretization` and `backend`.

    u, delta: (batch, dim, L); A: (dim, N) real; B, C: (dim, N), (batch, N, L) or (batch, G, N, L)
    (channel d uses group d // (dim / G)); D, delta_bias: (dim,); z: (batch, dim, L).
    delta <- softplus(delta + delta_bias) (identity above 20);
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  out = y * silu(z).
    seq_idx (batch, L) int: the state resets where it changes (packed documents).
    discretization: "zoh" (Mamba), "zoh_exact" or "bilinear" (torch/ref backends).
    Returns out (u's dtype), and the fp32 last state (batch, dim, N) if return_last_state.
    """
    if torch.compiler.is_compiling():  # one opaque graph node under torch.compile (kernels/compile_ops.py)
        try:
            from ..compile_ops import selective_scan_compiled
        except ImportError:
            selective_scan_compiled = None
        if selective_scan_compiled is not None:
            return selective_scan_compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                           seq_idx=seq_idx, backend=backend, discretization=discretization)
    name = resolve_backend(backend, u)
    validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, seq_idx, discretization, name)
    args = (u, delta, A, B, C, D, z, delta_bias)
    if name == "ref":
        return selective_scan_ref(*args, delta_softplus, return_last_state, seq_idx, discretization)
    if name == "torch":
        return selective_scan_torch(*args, delta_softplus, return_last_state, seq_idx, discretization)
    out, last = _SelectiveScanTriton.apply(*map(_time_contiguous, args), seq_idx, bool(delta_softplus),
                                           bool(return_last_state))
    return (out, last) if return_last_state else out
