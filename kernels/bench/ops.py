"""The op benchmarks: selective scan (Mamba-1) and the chunked SSD (Mamba-2), every implementation that
runs here side by side, with bytes, bandwidth, memory and errors (see common.py for the row format)."""
from __future__ import annotations

import sys

import torch

from .. import mamba_chunk_scan_combined, selective_scan_fn
from .common import add_bandwidth, dtype_name, fwd_bwd_bytes, measure, reference_run, tensor_bytes

SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


# ------------------------------------------------------------------ selective scan

def scan_inputs(batch, dim, L, N, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    return dict(u=r(batch, dim, L).to(dtype), delta=(0.5 * r(batch, dim, L)).to(dtype),
                A=-(torch.rand(dim, N, generator=g, device=device) + 0.5), B=r(batch, N, L).to(dtype),
                C=r(batch, N, L).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype), delta_bias=0.5 * r(dim))


def mambapy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The same function through mambapy's parallel scan (materialises (batch, L, dim, N))."""
    from mambapy.pscan import pscan
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = torch.nn.functional.softplus(delta.to(work) + delta_bias[:, None]).transpose(1, 2)  # (b, L, d)
    x = u.to(work).transpose(1, 2)
    dA = torch.exp(dt.unsqueeze(-1) * A)
    BX = (dt * x).unsqueeze(-1) * B.to(work).transpose(1, 2).unsqueeze(2)
    hs = pscan(dA, BX)
    y = (hs @ C.to(work).transpose(1, 2).unsqueeze(-1)).squeeze(-1) + D * x
    return (y * torch.nn.functional.silu(z.to(work).transpose(1, 2))).transpose(1, 2).to(u.dtype)


def scan_impls(device, backends, peers=True):
    impls = {b: (lambda b=b, **kw: selective_scan_fn(**kw, delta_softplus=True, backend=b)) for b in backends}
    if not peers:
        return impls
    try:
        import mambapy.pscan  # noqa: F401
        impls["mambapy"] = mambapy_scan
    except ImportError:
        pass
    if device.type == "cuda":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as upstream
            impls["mamba_ssm cuda"] = lambda **kw: upstream(**kw, delta_softplus=True)
        except Exception:  # noqa: BLE001 - its import fails in many ways (undefined symbols, no build)
            pass
    return impls


def bench_scan(shape, dtype, device, backends, repeat, copy_gbs, max_peer_elems=3e8, max_ref_elems=1e9):
    batch, dim, L, N = shape
    inp = scan_inputs(batch, dim, L, N, dtype, device)
    fwd_b, fwdbwd_b = fwd_bwd_bytes(inp, tensor_bytes(inp["u"]), SCAN_GRADS)
    elems = batch * dim * L * N
    reference, ref_impl = None, None
    if elems <= max_ref_elems:
        ref_impl = "ref" if L <= 4096 and elems <= 5e7 else "torch"  # the sequential loop is slow at long L
        reference = reference_run(lambda **kw: selective_scan_fn(**kw, delta_softplus=True, backend=ref_impl),
                                  inp, SCAN_GRADS, device)
    base = dict(op="selective_scan", shape="x".join(map(str, shape)), dtype=dtype_name(dtype), ref_impl=ref_impl)
    rows = []
    for name, impl in scan_impls(device, backends).items():
        row = dict(base, impl=name)
        if name in ("ref", "mambapy") and elems > max_peer_elems:
            row["skipped"] = f"batch*dim*L*N > {max_peer_elems:.0e} (slow or huge)"
        elif name == "torch" and device.type == "cuda" and elems > max_ref_elems:
            row["skipped"] = f"batch*dim*L*N > {max_ref_elems:.0e}: the torch path is launch-bound on a GPU here"
        else:
            try:
                row.update(measure(impl, inp, SCAN_GRADS, device, repeat, reference))
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory for a materialising peer
                row["skipped"] = f"{type(e).__name__}: {str(e)[:80]}"
        rows.append(add_bandwidth(row, fwd_b, fwdbwd_b, copy_gbs))
    return rows


# ------------------------------------------------------------------ Mamba-2 SSD

def ssd_inputs(batch, L, H, P, N, G, dtype, device, docs, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    inp = dict(x=r(batch, L, H, P).to(dtype), dt=r(batch, L, H).to(dtype),
               A=-(torch.rand(H, generator=g, device=device) + 0.5), B=r(batch, L, G, N).to(dtype),
               C=r(batch, L, G, N).to(dtype), D=r(H), z=r(batch, L, H, P).to(dtype), dt_bias=r(H))
    inp["seq_idx"] = None
    if docs:  # documents of L / docs tokens each
        inp["seq_idx"] = (torch.arange(L, device=device) * docs // L).to(torch.int32).expand(batch, L).contiguous()
    return inp


def load_mamba_ssm_triton(folder: str):
    """mamba_ssm's Triton SSD from a folder holding a copy of mamba_ssm/ops/triton/*.py (never committed).
    Its modules import each other as mamba_ssm.ops.triton.*, and the real package __init__ imports the
    compiled CUDA scan, so stub packages point those names at the folder instead."""
    import importlib
    import types
    for name, path in (("mamba_ssm", None), ("mamba_ssm.ops", None), ("mamba_ssm.ops.triton", folder)):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [path] if path else []
            sys.modules[name] = mod
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def ssd_impls(device, backends, chunk, mamba_ssm_dir=None):
    impls = {b: (lambda b=b, **kw: mamba_chunk_scan_combined(**kw, chunk_size=chunk, dt_softplus=True, backend=b))
             for b in backends}
    if device.type == "cuda":
        try:
            from fla.ops.simple_gla import chunk_simple_gla

            def fla(x, dt, A, B, C, D, z, dt_bias, seq_idx):
                """Same recurrence without D and z (fla has neither); groups broadcast to heads."""
                if seq_idx is not None:
                    return None
                d = torch.nn.functional.softplus(dt.float() + dt_bias)
                R = x.shape[2] // B.shape[2]
                return chunk_simple_gla(q=C.repeat_interleave(R, 2), k=B.repeat_interleave(R, 2),
                                        v=x * d[..., None].to(x.dtype), g=A * d, scale=1.0)[0]
            impls["fla chunk_simple_gla (no D, z)"] = fla
        except ImportError:
            pass
        if mamba_ssm_dir:
            upstream = load_mamba_ssm_triton(mamba_ssm_dir)
            impls["mamba_ssm triton"] = lambda **kw: upstream(**kw, chunk_size=chunk, dt_softplus=True)
    return impls


def bench_ssd(shape, dtype, device, backends, repeat, copy_gbs, docs=0, mamba_ssm_dir=None, max_ref_len=4096,
              max_reference_elems=4e9):
    batch, L, H, P, N, G, chunk = shape
    inp = ssd_inputs(batch, L, H, P, N, G, dtype, device, docs)
    fwd_b, fwdbwd_b = fwd_bwd_bytes(inp, tensor_bytes(inp["x"]), SSD_GRADS)
    reference, ref_impl = None, None
    if batch * L * H * chunk * 8 <= max_reference_elems:  # the torch path's (Q, Q) float64 decays
        ref_impl = "ref" if batch * L <= max_ref_len else "torch"
        reference = reference_run(lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=chunk, dt_softplus=True,
                                                                          backend=ref_impl), inp, SSD_GRADS, device)
    base = dict(op="ssd" + (f" docs={docs}" if docs else ""), shape="x".join(map(str, shape)), dtype=dtype_name(dtype),
                ref_impl=ref_impl)
    rows = []
    for name, impl in ssd_impls(device, backends, chunk, mamba_ssm_dir).items():
        row = dict(base, impl=name)
        if name == "ref" and batch * L > max_ref_len:
            row["skipped"] = f"batch*L > {max_ref_len}"
        elif impl(**{k: (v.detach() if v is not None else None) for k, v in inp.items()}) is None:
            row["skipped"] = "unsupported options (seq_idx)"
        else:
            try:
                row.update(measure(impl, inp, SSD_GRADS, device, repeat,
                                   None if name.startswith("fla") else reference))
            except (RuntimeError, MemoryError) as e:
                row["skipped"] = f"{type(e).__name__}: {str(e)[:80]}"
        rows.append(add_bandwidth(row, fwd_b, fwdbwd_b, copy_gbs))
    return rows
