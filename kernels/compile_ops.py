"""torch.compile support: the Mamba-1 selective scan and the Mamba-2 SSD as torch.library custom ops.

Inside a compiled region `selective_scan_fn` and `mamba_chunk_scan_combined` hand over to
`selective_scan_compiled` / `ssd_compiled` here, which call one opaque op each. Dynamo puts the op in the
graph as a single node (no graph break, whatever the backend does inside: Triton launches, autograd
Functions, Python loops), AOTAutograd and Inductor see only its fake implementation (shapes, dtypes,
strides) and its autograd formula.

Design choices:
- Each op's real implementation calls the public eager function with the caller's `backend` (the scan and
  the SSD with the torch or triton backend: that backend's forward as plain functions, see below). The
  backend is resolved while tracing (`selective_scan_compiled`, `ssd_compiled`) and handed to the op by name:
  the fake implementation's residual shapes and the autograd formula depend on it, so the op must run the
  backend they were traced for. Dynamo guards on the global backend that resolution reads
  (set_backend / use_backend): switching it recompiles. No recursion:
  torch.compiler.is_compiling() is False when a compiled graph runs the op (every compiled test in
  tests/test_compile_ops.py would otherwise recurse without end).
- Backward, scan with the torch or triton backend: the forward op runs the backend's plain forward function
  itself and returns its residuals as two extra outputs (torch_scan.scan_forward: the output before the z
  gate and every piece's start state; triton_scan.selective_scan_fwd: the per-chunk boundary states), saved
  for a second op that runs the matching backward function on them (torch_scan.scan_backward,
  triton_scan.selective_scan_bwd): no forward recompute, the same functions as the eager
  autograd.Functions (results bit-identical). The residual outputs exist for every backend (empty (0,)
  tensors where unused), so the schema is fixed; their shapes follow from the inputs' shapes alone
  (torch_scan.piece_steps, triton_scan.chunk_size), which the fake implementation states, symbolic
  lengths included.
- Backward, SSD with the torch backend: the forward op runs ssd_torch's steps itself, its core through
  torch_ssd_fast.core_forward (the plain function under the eager SSDCore autograd.Function), and returns
  the core's per-chunk incoming states (torch_ssd_fast.join_states) and (with z) its output before D and z
  as residuals. The backward op runs the core's hand-written backward (torch_ssd_fast.core_backward, on
  split_states' per-block states) and autograd over the cheap elementwise ops around the core (dt's
  processing, D, z): no forward recompute (each block's decays and C B^T are recomputed, as in the eager
  backward of a multi-block sequence). Bit-identical to eager.
- Backward, SSD with the triton backend: the forward op runs triton_ssd.ssd_triton_fwd (the launcher of the
  eager autograd.Function, on the inputs ssd_triton_inputs prepares as ssd_triton does) and returns its
  residuals: the output before the z gate (with z), every chunk's incoming state, the processed dt and its
  per-chunk cumsum, in the kernels' own layouts and dtypes (padded length chunks * chunk_size). The backward
  op (ssd_bwd_triton) runs triton_ssd.ssd_triton_bwd on them: no forward kernel in the backward, results
  bit-identical to eager (the fp32 gradients of A, D, dt_bias and the initial states cast to the inputs'
  dtypes as eager autograd casts them).
- Backward, every other case (scan and SSD with ref): a second custom op recomputes the forward under
  autograd with the same eager function and calls torch.autograd.grad. This costs one extra forward per
  backward, but stays exact for every option (seq_idx, initial states...) without depending on the
  backend's saved tensors. Gradients flow exactly where the eager function's do (whatever a backend does
  with the last / final state's gradient, it does in eager and compiled alike).
- Inductor's and AOTAutograd's on-disk caches key on the traced graph, not on this file: after a change
  here a warm cache (TORCHINDUCTOR_CACHE_DIR) can hand back graphs built with the old registrations (seen:
  the old recomputing backward after the residual outputs were added). Clear it, or set
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, when timing a change.
- Outputs are new dense (row-major) tensors of fixed dtypes (out like u / x; states and residuals float32,
  float64 for float64 inputs; the Triton SSD's y_core and h_in in x's dtype), so the fake implementations
  state exact strides and Inductor's stride checks hold.
- The fake implementations run the eager argument checks, so bad input raises the eager ValueError while
  compiling, before anything runs (with concrete shapes; under dynamic shapes the op's own call checks).
"""
# no `from __future__ import annotations`: torch.library reads the op signatures' annotations as types
import os
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from ._utils import get_backend, resolve_backend, triton_available
from .selective_scan.interface import _time_contiguous, selective_scan_fn, validate_selective_scan
from .selective_scan.torch_scan import piece_steps, scan_backward, scan_forward
from .ssd.reference import process_dt
from .ssd.torch_ssd import ssd_epilogue
from .ssd import torch_ssd_fast
from .ssd.interface import (mamba_chunk_scan_combined, validate_ssd, validate_varlen, varlen_states,
                            with_varlen_states)

# a namespace of our own: mamba_ssm registers ops too, and both packages may be imported in one process
NAMESPACE = "nanogpt_mamba"


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _fresh(t: Tensor, dtype: torch.dtype, inputs) -> Tensor:
    """t as a dense tensor of `dtype` that shares no memory with the op's inputs (a custom op's outputs may
    not alias its inputs; autograd passes a gradient through an addition unchanged). Copies only when needed."""
    t = t.to(dtype)
    storage = t.untyped_storage().data_ptr()
    aliased = any(isinstance(i, Tensor) and i.untyped_storage().data_ptr() == storage for i in inputs)
    if t.stride() == _dense_strides(t.shape) and not aliased:
        return t
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


@contextmanager
def _autograd_dispatch():
    """Re-enable autograd recording inside a custom op's implementation. The dispatcher runs every custom
    op below autograd (torch._library.autograd excludes the Autograd keys in thread-local state), where
    enable_grad alone records nothing for ordinary ops: the eager backends' own backward passes, which
    recompute under autograd, would fail. Only the Autograd keys leave the exclude set; the rest stays."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _recompute_grads(forward, inputs, output_grads):
    """Gradients of forward(*inputs) for every floating-point input that is not None, in order.
    forward returns a tuple of outputs; output_grads holds one gradient (or None) per output."""
    with _autograd_dispatch():
        leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
        outputs = forward(*leaves)
        used = [(o, g.to(o.dtype)) for o, g in zip(outputs, output_grads) if g is not None and o.requires_grad]
        wanted = [t for t in leaves if t is not None and t.is_floating_point()]
        grads = (torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], allow_unused=True)
                 if used else [None] * len(wanted))
    all_inputs = list(inputs) + list(output_grads)
    return [_fresh(torch.zeros_like(t) if g is None else g, t.dtype, all_inputs) for t, g in zip(wanted, grads)]


@torch.compiler.assume_constant_result  # dynamo calls it instead of tracing it (an `import` that may fail)
def _triton_installed() -> bool:
    return triton_available()


def _traced_backend(backend: Optional[str], x: Tensor) -> str:
    """The backend's name as resolve_backend picks it, computed while dynamo traces (it guards on the global
    backend it reads). Names are not checked here: the fake implementations run resolve_backend on them."""
    name = backend or get_backend() or os.environ.get("KERNELS_BACKEND") or None
    if name is None:
        return "triton" if (x.is_cuda and _triton_installed()) else "torch"
    return name


def _static(*tensors) -> bool:
    """Whether every shape is concrete. The eager argument checks hash sizes, which symbolic sizes
    (dynamic-shape compiles) refuse; there the checks run when the op runs (the eager function's own)."""
    return not any(isinstance(s, torch.SymInt) for t in tensors if t is not None for s in t.shape)


def _fake_grads(inputs) -> list[Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs
            if t is not None and t.is_floating_point()]


def _unpack_grads(inputs, grads):
    """One entry per op input: the next gradient for a floating-point tensor, None for the rest."""
    it = iter(grads)
    return tuple(next(it) if isinstance(t, Tensor) and t.is_floating_point() else None for t in inputs)


# ---------------------------------------------------------------- Mamba-1 selective scan

def _scan_eager(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, discretization, backend):
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, seq_idx=seq_idx,
                             discretization=discretization, backend=backend)


def _scan_residual_backend(u: Tensor, backend: Optional[str]) -> Optional[str]:
    """"torch" or "triton" where the scan op runs that backend's plain forward / backward functions itself
    (saving their residuals), None (ref) where it calls the eager function and the backward recomputes.
    Decided from the device and backend alone, so the real and fake implementations and the autograd
    formula agree."""
    name = resolve_backend(backend, u)
    return name if name in ("torch", "triton") else None


def _work(tensors, u: Tensor) -> list:
    """The torch backend's casts (selective_scan_torch's): every tensor in fp32, float64 for float64 u."""
    return [None if t is None else t.to(_state_dtype(u)) for t in tensors]


@torch.library.custom_op(f"{NAMESPACE}::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], seq_idx: Optional[Tensor],
                       delta_softplus: bool, discretization: str,
                       backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (batch, dim, L) in u's dtype, last state (batch, dim, N), y_pre, starts): selective_scan_fn's
    results, then the backend's residuals for the backward. torch (torch_scan.scan_forward's): y_pre
    (batch, dim, L) with zoh and z, else empty (0,); starts (pieces, batch, dim, N). triton
    (triton_scan.selective_scan_fwd's): y_pre empty; starts = the boundary states (batch, dim, chunks + 1, N).
    ref: both empty (0,), its backward recomputes. Residuals in the state dtype."""
    inputs = (u, delta, A, B, C, D, z, delta_bias, seq_idx)
    sdt = _state_dtype(u)
    kind = _scan_residual_backend(u, backend)
    with torch.no_grad():  # the autograd formula below owns differentiation
        if kind is None:
            out, last = _scan_eager(*inputs, delta_softplus, discretization, backend)
            y_pre = starts = None
        elif kind == "torch":
            validate_selective_scan(*inputs, discretization, kind)
            out, last, y_pre, starts = scan_forward(*_work(inputs[:8], u), seq_idx, delta_softplus,
                                                    discretization)
        else:  # as interface._SelectiveScanTriton.forward
            from .selective_scan.triton_scan import selective_scan_fwd as triton_forward
            validate_selective_scan(*inputs, discretization, kind)
            out, starts = triton_forward(*map(_time_contiguous, inputs[:8]), seq_idx, delta_softplus)
            last, y_pre = starts[:, :, -1], None
    empty = lambda t: u.new_empty((0,), dtype=sdt) if t is None else _fresh(t, sdt, inputs)  # noqa: E731
    return _fresh(out, u.dtype, inputs), _fresh(last, sdt, inputs), empty(y_pre), empty(starts)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, discretization, backend):
    if _static(u, delta, A, B, C, D, z, delta_bias, seq_idx):
        validate_selective_scan(u, delta, A, B, C, D, z, delta_bias, seq_idx, discretization,
                                resolve_backend(backend, u))
    batch, dim, L = u.shape
    N = A.shape[1]
    sdt = _state_dtype(u)
    y_pre, starts = u.new_empty((0,), dtype=sdt), u.new_empty((0,), dtype=sdt)
    kind = _scan_residual_backend(u, backend)
    if kind == "torch":
        if z is not None and discretization == "zoh":
            y_pre = u.new_empty((batch, dim, L), dtype=sdt)
        S = piece_steps(batch, dim, N, L, u.is_cuda)
        starts = u.new_empty(((L + S - 1) // S, batch, dim, N), dtype=sdt)
    elif kind == "triton":
        from .selective_scan.triton_scan import chunk_size
        T = chunk_size(N)
        starts = u.new_empty((batch, dim, (L + T - 1) // T + 1, N), dtype=sdt)
    return u.new_empty((batch, dim, L)), u.new_empty((batch, dim, N), dtype=sdt), y_pre, starts


@torch.library.custom_op(f"{NAMESPACE}::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       seq_idx: Optional[Tensor], delta_softplus: bool, discretization: str,
                       backend: Optional[str]) -> list[Tensor]:
    """Gradients for u, delta, A, B, C and each of D, z, delta_bias that is given, in that order, by
    recomputing the forward under autograd (the backends that save no residuals here)."""
    return _recompute_grads(lambda *t: _scan_eager(*t, delta_softplus, discretization, backend),
                            (u, delta, A, B, C, D, z, delta_bias, seq_idx), (dout, dlast))


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, discretization, backend):
    return _fake_grads((u, delta, A, B, C, D, z, delta_bias))


@torch.library.custom_op(f"{NAMESPACE}::selective_scan_bwd_saved", mutates_args=())
def selective_scan_bwd_saved(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                             seq_idx: Optional[Tensor], y_pre: Tensor, starts: Tensor, delta_softplus: bool,
                             discretization: str, backend: str) -> list[Tensor]:
    """The backend's ("torch" or "triton", resolved) backward from selective_scan_fwd's residuals: no forward
    recompute (torch_scan.scan_backward: zoh; the other discretizations recompute piece by piece, as in
    eager; triton_scan.selective_scan_bwd). Gradients as selective_scan_bwd's, each in its input's dtype
    (the last state's gradient is not propagated, as in eager for both backends)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    zoh = discretization == "zoh"
    if backend == "triton":
        from .selective_scan.triton_scan import selective_scan_bwd as triton_backward
        with torch.no_grad():
            grads = triton_backward(dout, *map(_time_contiguous, inputs), seq_idx, delta_softplus, starts)
    elif backend == "torch":
        with (torch.no_grad() if zoh else _autograd_dispatch()):
            grads = scan_backward(*_work((dout, *inputs), u), seq_idx, y_pre if zoh and z is not None else None,
                                  starts, delta_softplus, discretization)
    else:
        raise ValueError(f"backend must be 'torch' or 'triton' (the backends that save residuals), got {backend!r}")
    everything = (dout, *inputs, seq_idx, y_pre, starts)
    return [_fresh(g, t.dtype, everything) for t, g in zip(inputs, grads) if t is not None]


@selective_scan_bwd_saved.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, seq_idx, y_pre, starts, delta_softplus, discretization, backend):
    return _fake_grads((u, delta, A, B, C, D, z, delta_bias))


def _scan_setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus, ctx.discretization, ctx.backend = inputs
    _, _, y_pre, starts = output
    ctx.mark_non_differentiable(y_pre, starts)  # the last state stays differentiable: the ref backend uses it
    ctx.residuals = _scan_residual_backend(tensors[0], ctx.backend)
    ctx.save_for_backward(*tensors, *((y_pre, starts) if ctx.residuals else ()))


def _scan_backward(ctx, dout, dlast, dy_pre, dstarts):
    tensors = ctx.saved_tensors
    if ctx.residuals:
        *tensors, y_pre, starts = tensors
        grads = selective_scan_bwd_saved(dout, *tensors, y_pre, starts, ctx.delta_softplus, ctx.discretization,
                                         ctx.residuals)
    else:
        grads = selective_scan_bwd(dout, dlast, *tensors, ctx.delta_softplus, ctx.discretization, ctx.backend)
    return _unpack_grads(tensors, grads) + (None, None, None)


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan_compiled(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, seq_idx=None, discretization="zoh", backend=None):
    """selective_scan_fn (same signature, results and gradients) as one graph node under torch.compile."""
    backend = _traced_backend(backend, u)
    out, last, _, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx, bool(delta_softplus),
                                         discretization, backend)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------- Mamba-2 SSD

def _ssd_eager(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit,
               backend):
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                     initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                                     dt_limit=tuple(dt_limit), return_final_states=True, backend=backend)


def _ssd_residual_backend(x: Tensor, backend: Optional[str]) -> Optional[str]:
    """"torch" where the SSD op runs the torch backend's core (torch_ssd_fast.core_forward) itself and keeps its
    per-chunk incoming states, "triton" where it runs triton_ssd.ssd_triton_fwd and keeps its residuals, None
    (ref) where it calls the eager function and the backward recomputes. From the device and backend alone, so
    the real and fake implementations and the autograd formula agree."""
    name = resolve_backend(backend, x)
    return name if name in ("torch", "triton") else None


@torch.library.custom_op(f"{NAMESPACE}::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            dt_bias: Optional[Tensor], initial_states: Optional[Tensor], seq_idx: Optional[Tensor], chunk_size: int,
            dt_softplus: bool, dt_limit: list[float],
            backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y (batch, L, heads, headdim) in x's dtype, final states (batch, heads, headdim, dstate), y_core, h_in,
    dtp, cs): the results, then the backend's residuals for the backward, empty (0,) where absent or unused.
    torch: y_core = the core's output before D and z (batch, L, heads, headdim) when z is given, h_in = every
    chunk's incoming state (batch, heads, chunks, headdim, dstate), in the state dtype; dtp, cs empty.
    triton (triton_ssd.ssd_triton_fwd's): y_core = the output before the z gate (batch, L, heads, headdim)
    when z is given and h_in = every chunk's incoming state (batch * heads, chunks, headdim, dstate), both in
    x's dtype; dtp, cs = processed dt and its per-chunk cumsum (batch * heads, chunks * chunk_size) fp32.
    ref: all empty (its backward recomputes)."""
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    sdt = _state_dtype(x)
    y_core = h_in = dtp = cs = None
    kind = _ssd_residual_backend(x, backend)
    with torch.no_grad():
        if kind is None:
            y, final = _ssd_eager(*inputs, chunk_size, dt_softplus, dt_limit, backend)
        elif kind == "triton":  # as triton_ssd.ssd_triton, the autograd Function's forward as a plain function
            from .ssd import triton_ssd
            validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
            triton_ssd.ssd_triton_check(x, chunk_size)
            A32, D32, bias32, h0, seq = triton_ssd.ssd_triton_inputs(A, D, dt_bias, initial_states, seq_idx)
            y, final, dtp, cs, h_in, y_core = triton_ssd.ssd_triton_fwd(
                x, dt, A32, B, C, D32, z, bias32, h0, seq, chunk_size, dt_softplus, tuple(dt_limit),
                triton_ssd.DOT_PRECISION)
        else:  # ssd_torch's steps, the core as plain functions
            validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
            xw = x.to(sdt)
            dtw = process_dt(dt, dt_bias, dt_softplus, dt_limit)
            h0 = initial_states.to(sdt) if initial_states is not None else None
            y_core, final, h_ins, _ = torch_ssd_fast.core_forward(
                xw, dtw, A.to(sdt), B.to(sdt), C.to(sdt), h0, seq_idx, min(chunk_size, x.shape[1]), True, True,
                keep_block=False)
            h_in = torch_ssd_fast.join_states(h_ins, x.shape[2])
            y = ssd_epilogue(y_core, xw, D, z, x.dtype)
            y_core = y_core if z is not None else None
    empty = lambda t: x.new_empty((0,), dtype=sdt) if t is None else _fresh(t, t.dtype, inputs)  # noqa: E731
    return (_fresh(y, x.dtype, inputs), _fresh(final, sdt, inputs), empty(y_core), empty(h_in), empty(dtp),
            empty(cs))


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit, backend):
    if _static(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
        resolve_backend(backend, x)  # for its errors (e.g. triton without CUDA) at compile time
        validate_ssd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    batch, L, H, P = x.shape
    N = B.shape[3]
    sdt = _state_dtype(x)
    y_core, h_in, dtp, cs = (x.new_empty((0,), dtype=sdt) for _ in range(4))
    kind = _ssd_residual_backend(x, backend)
    if kind == "torch":
        if z is not None:
            y_core = x.new_empty((batch, L, H, P), dtype=sdt)
        Q = min(chunk_size, L)
        h_in = x.new_empty((batch, H, (L + Q - 1) // Q, P, N), dtype=sdt)
    elif kind == "triton":  # as ssd_triton_fwd allocates them
        from .ssd.triton_ssd import ssd_triton_check
        if _static(x):
            ssd_triton_check(x, chunk_size)
        NC = (L + chunk_size - 1) // chunk_size
        if z is not None:
            y_core = x.new_empty((batch, L, H, P))
        h_in = x.new_empty((batch * H, NC, P, N))
        dtp, cs = (x.new_empty((batch * H, NC * chunk_size), dtype=torch.float32) for _ in range(2))
    return x.new_empty((batch, L, H, P)), x.new_empty((batch, H, P, N), dtype=sdt), y_core, h_in, dtp, cs


@torch.library.custom_op(f"{NAMESPACE}::ssd_bwd", mutates_args=())
def ssd_bwd(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
            seq_idx: Optional[Tensor], chunk_size: int, dt_softplus: bool, dt_limit: list[float],
            backend: Optional[str]) -> list[Tensor]:
    """Gradients for x, dt, A, B, C and each of D, z, dt_bias, initial_states that is given, in that order, by
    recomputing the forward under autograd (the backends that save no residuals here)."""
    return _recompute_grads(lambda *t: _ssd_eager(*t, chunk_size, dt_softplus, dt_limit, backend),
                            (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx), (dy, dfinal))


@ssd_bwd.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit,
      backend):
    return _fake_grads((x, dt, A, B, C, D, z, dt_bias, initial_states))


@torch.library.custom_op(f"{NAMESPACE}::ssd_bwd_saved", mutates_args=())
def ssd_bwd_saved(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                  initial_states: Optional[Tensor], seq_idx: Optional[Tensor], y_core: Tensor, h_in: Tensor,
                  chunk_size: int, dt_softplus: bool, dt_limit: list[float]) -> list[Tensor]:
    """The torch backend's backward from ssd_fwd's residuals: the core's hand-written backward
    (torch_ssd_fast.core_backward) from the saved incoming states, autograd over the cheap elementwise ops around
    it (dt's processing, D, z); no forward recompute. Gradients as ssd_bwd's, in the inputs' dtypes."""
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    sdt = _state_dtype(x)
    b, L, H, P = x.shape
    N = B.shape[3]
    Q = min(chunk_size, L)
    nc = (L + Q - 1) // Q
    if tuple(h_in.shape) != (b, H, nc, P, N):
        raise ValueError(f"h_in must have shape {(b, H, nc, P, N)} (one state per chunk), got {tuple(h_in.shape)}")
    with _autograd_dispatch():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        x_, dt_, A_, B_, C_, D_, z_, bias_, h0_ = leaves
        xw, Aw, Bw, Cw = x_.to(sdt), A_.to(sdt), B_.to(sdt), C_.to(sdt)
        dtp = process_dt(dt_, bias_, dt_softplus, dt_limit)
        h0 = h0_.to(sdt) if h0_ is not None else None
        # the epilogue's gradient w.r.t. the core's output: y_core's value matters only through z
        core_out = (y_core if z is not None else xw.new_zeros(()).expand(b, L, H, P)).detach().requires_grad_()
        y = ssd_epilogue(core_out, xw, D_, z_, x.dtype)
        (dy_core,) = torch.autograd.grad(y, core_out, dy.to(y.dtype), retain_graph=True)
        xd, Bd = xw.detach(), Bw.detach()
        dxc, ddt, dA, dB, dC, dh0 = torch_ssd_fast.core_backward(
            dy_core, None if dfinal is None else dfinal.to(sdt), xd, dtp.detach(), Aw.detach(), Bd, Cw.detach(),
            seq_idx, torch_ssd_fast.split_states(h_in, xd, Bd, Q), (), Q, h0 is not None)
        outs = [(y, dy.to(y.dtype)), (xw, dxc), (dtp, ddt), (Aw, dA), (Bw, dB), (Cw, dC), (h0, dh0)]
        outs = [(o, g) for o, g in outs if o is not None and g is not None]
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], allow_unused=True)
    everything = (dy, dfinal, *inputs, seq_idx, y_core, h_in)
    return [_fresh(torch.zeros_like(t) if g is None else g, t.dtype, everything)
            for t, g in zip([t for t in inputs if t is not None], grads)]


@ssd_bwd_saved.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, y_core, h_in, chunk_size, dt_softplus,
      dt_limit):
    return _fake_grads((x, dt, A, B, C, D, z, dt_bias, initial_states))


@torch.library.custom_op(f"{NAMESPACE}::ssd_bwd_triton", mutates_args=())
def ssd_bwd_triton(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                   initial_states: Optional[Tensor], seq_idx: Optional[Tensor], y_core: Tensor, h_in: Tensor,
                   dtp: Tensor, cs: Tensor, chunk_size: int, dt_softplus: bool, dt_limit: list[float]) -> list[Tensor]:
    """The triton backend's backward kernels (triton_ssd.ssd_triton_bwd) from ssd_fwd's residuals: no forward
    kernel runs. Gradients as ssd_bwd's, each in its input's dtype (the kernels' fp32 gradients of A, D,
    dt_bias and the initial states cast as eager autograd casts them)."""
    from .ssd import triton_ssd
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    A32, D32, bias32, h0, seq = triton_ssd.ssd_triton_inputs(A, D, dt_bias, initial_states, seq_idx)
    with torch.no_grad():
        grads = triton_ssd.ssd_triton_bwd(dy.to(x.dtype), dfinal, x, dt, A32, B, C, D32, z, bias32, seq, dtp, cs,
                                          h_in, y_core if z is not None else None, chunk_size, dt_softplus,
                                          tuple(dt_limit), triton_ssd.DOT_PRECISION, h0 is not None)
    everything = (dy, dfinal, *inputs, seq_idx, y_core, h_in, dtp, cs)
    return [_fresh(g, t.dtype, everything) for t, g in zip(inputs, grads) if t is not None]


@ssd_bwd_triton.register_fake
def _(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, y_core, h_in, dtp, cs, chunk_size,
      dt_softplus, dt_limit):
    return _fake_grads((x, dt, A, B, C, D, z, dt_bias, initial_states))


def _ssd_setup_context(ctx, inputs, output):
    *tensors, ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit, ctx.backend = inputs
    _, _, *residuals = output
    ctx.mark_non_differentiable(*residuals)
    ctx.residuals = _ssd_residual_backend(tensors[0], ctx.backend)
    kept = {"torch": residuals[:2], "triton": residuals, None: ()}[ctx.residuals]
    ctx.save_for_backward(*tensors, *kept)


def _ssd_backward(ctx, dy, dfinal, *_):
    tensors = ctx.saved_tensors
    if ctx.residuals == "torch":
        *tensors, y_core, h_in = tensors
        grads = ssd_bwd_saved(dy, dfinal, *tensors, y_core, h_in, ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit)
    elif ctx.residuals == "triton":
        *tensors, y_core, h_in, dtp, cs = tensors
        grads = ssd_bwd_triton(dy, dfinal, *tensors, y_core, h_in, dtp, cs, ctx.chunk_size, ctx.dt_softplus,
                               ctx.dt_limit)
    else:
        grads = ssd_bwd(dy, dfinal, *tensors, ctx.chunk_size, ctx.dt_softplus, ctx.dt_limit, ctx.backend)
    return _unpack_grads(tensors, grads) + (None, None, None, None)


ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup_context)


def ssd_compiled(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                 return_varlen_states=False, state_dtype=None, *, backend=None):
    """mamba_chunk_scan_combined (same signature, results and gradients) as one graph node under torch.compile.
    The varlen states are plain torch ops outside the node; reading cu_seqlens on the host breaks the graph
    there (only when return_varlen_states is set)."""
    bounds = validate_varlen(x, cu_seqlens, return_varlen_states, state_dtype)
    backend = _traced_backend(backend, x)
    y, final, *_ = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size,
                             bool(dt_softplus), [float(v) for v in dt_limit], backend)
    res = (y, final) if return_final_states else y
    if not return_varlen_states:
        return res
    varlen = varlen_states(x, dt, A, B, bounds, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit)
    return with_varlen_states(res, varlen, C, state_dtype)
