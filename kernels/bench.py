"""Microbenchmarks for the kernels: one entry point for every op.

    python -m kernels.bench                       # default shapes for this device (GPU or CPU)
    python -m kernels.bench --op scan --shapes 8x1536x2048x16 --dtype bf16 --json out.json
    python -m kernels.bench --backends torch,ref --repeat 3

Per shape and implementation: forward ms and forward+backward ms (median), peak memory above the inputs
(CUDA), achieved GB/s of the forward (each input read once, the output written once) and its share of
the device's copy bandwidth measured in the same run, and the speed ratio against the reference.
Peers run when installed: mambapy (pure-torch parallel scan) and mamba_ssm.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from . import mamba_chunk_scan_combined, selective_scan_fn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeat: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms. CUDA: triton's do_bench (events, cache flush) when available."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=max(100, 20 * repeat), return_mode="median"))
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def copy_bandwidth_gbs(device) -> float:
    """Device copy bandwidth: bytes read + bytes written per second for a large copy."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat=10)
    return 2 * src.numel() * src.element_size() / (ms / 1000) / 1e9


def add_ratios_to_ref(rows):
    """Speed ratios of every measured row against the "ref" row, when there is one."""
    ref = next((r for r in rows if r["impl"] == "ref" and "fwd_ms" in r), None)
    for r in rows:
        if ref and "fwd_ms" in r:
            r["fwd_speedup_vs_ref"] = ref["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup_vs_ref"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def peak_mem_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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
    dt = torch.nn.functional.softplus(delta.float() + delta_bias[:, None]).transpose(1, 2)  # (b, L, d)
    x = u.float().transpose(1, 2)
    dA = torch.exp(dt.unsqueeze(-1) * A)
    BX = (dt * x).unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)
    hs = pscan(dA, BX)
    y = (hs @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(-1) + D * x
    return (y * torch.nn.functional.silu(z.float().transpose(1, 2))).transpose(1, 2)


def scan_impls(device, backends):
    impls = {}
    for b in backends:
        impls[b] = lambda b=b, **kw: selective_scan_fn(**kw, delta_softplus=True, backend=b)
    try:
        import mambapy.pscan  # noqa: F401
        impls["mambapy"] = lambda **kw: mambapy_scan(**kw)
    except ImportError:
        pass
    if device.type == "cuda":
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as upstream
            impls["mamba_ssm"] = lambda **kw: upstream(**kw, delta_softplus=True)
        except Exception:  # noqa: BLE001 - its import fails in many ways (undefined symbols, no build)
            pass
    return impls


def bench_scan(shape, dtype, device, backends, repeat, bandwidth, max_ref_elems):
    batch, dim, L, N = shape
    inp = scan_inputs(batch, dim, L, N, dtype, device)
    elt = torch.tensor([], dtype=dtype).element_size()
    fwd_bytes = elt * (4 * batch * dim * L + 2 * batch * N * L) + 4 * (dim * N + 2 * dim)
    rows = []
    for name, impl in scan_impls(device, backends).items():
        if name in ("ref", "mambapy") and batch * dim * L * N > max_ref_elems:
            rows.append(dict(impl=name, skipped=f"> {max_ref_elems:.0e} state elements (slow or huge)"))
            continue
        leaves = {k: v.detach().clone().requires_grad_(k not in ("A",)) for k, v in inp.items()}
        fwd = lambda: impl(**{k: v.detach() for k, v in leaves.items()})  # noqa: E731

        def fwd_bwd():
            out = impl(**leaves)
            out.backward(torch.ones_like(out))
            for v in leaves.values():
                v.grad = None
        try:
            with torch.no_grad():
                f_ms = time_ms(fwd, device, repeat)
            fb_ms = time_ms(fwd_bwd, device, repeat)
            mem = peak_mem_mib(fwd_bwd, device)
        except (RuntimeError, MemoryError) as e:  # e.g. out of memory for a materialising peer
            rows.append(dict(impl=name, skipped=f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        gbs = fwd_bytes / (f_ms / 1000) / 1e9
        rows.append(dict(impl=name, fwd_ms=f_ms, fwd_bwd_ms=fb_ms, peak_mib=mem, fwd_gbs=gbs,
                         fwd_pct_copy_bw=100 * gbs / bandwidth))
    return add_ratios_to_ref(rows)


# ------------------------------------------------------------------ Mamba-2 SSD

def ssd_inputs(batch, L, H, P, N, G, dtype, device, docs, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    inp = dict(x=r(batch, L, H, P).to(dtype), dt=r(batch, L, H).to(dtype), A=-(torch.rand(H, generator=g, device=device) + 0.5),
               B=r(batch, L, G, N).to(dtype), C=r(batch, L, G, N).to(dtype), D=r(H), dt_bias=r(H))
    seq = None
    if docs:  # documents of L / docs tokens each
        seq = (torch.arange(L, device=device) * docs // L).to(torch.int32).expand(batch, L).contiguous()
    return inp, seq


def ssd_flops(batch, L, H, P, N, G, chunk):
    """Matmul FLOPs of the chunked algorithm: C.B^T per group, the masked (Q x Q) @ x, chunk states and
    the state read-out per head."""
    return batch * L * (2 * chunk * N * G + 2 * chunk * P * H + 4 * P * N * H)


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


def ssd_impls(device, backends, mamba_ssm_dir=None):
    impls = {b: (lambda b=b, seq=None, chunk=256, **kw: mamba_chunk_scan_combined(
        **kw, chunk_size=chunk, seq_idx=seq, dt_softplus=True, backend=b)) for b in backends}
    if device.type == "cuda":
        try:
            from fla.ops.simple_gla import chunk_simple_gla

            def fla(seq=None, chunk=256, x=None, dt=None, A=None, B=None, C=None, D=None, dt_bias=None):
                if seq is not None or B.shape[2] != x.shape[2]:
                    return None  # no packed documents; groups must equal heads
                d = torch.nn.functional.softplus(dt.float() + dt_bias)
                return chunk_simple_gla(q=C, k=B, v=x * d[..., None].to(x.dtype), g=A * d, scale=1.0)[0]
            impls["fla chunk_simple_gla"] = fla
        except ImportError:
            pass
        if mamba_ssm_dir:
            upstream = load_mamba_ssm_triton(mamba_ssm_dir)
            impls["mamba_ssm triton"] = lambda seq=None, chunk=256, **kw: upstream(
                **kw, chunk_size=chunk, seq_idx=seq, dt_softplus=True)
    return impls


def bench_ssd(shape, dtype, device, backends, repeat, docs, max_ref_len, mamba_ssm_dir=None):
    batch, L, H, P, N, G, chunk = shape
    inp, seq = ssd_inputs(batch, L, H, P, N, G, dtype, device, docs)
    flops = ssd_flops(batch, L, H, P, N, G, chunk)
    rows = []
    for name, impl in ssd_impls(device, backends, mamba_ssm_dir).items():
        if name == "ref" and L * batch > max_ref_len:
            rows.append(dict(impl=name, skipped=f"batch*L > {max_ref_len}"))
            continue
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        if name.startswith("fla") and G != H:
            leaves["B"] = leaves["B"].detach().repeat_interleave(H // G, 2).requires_grad_()
            leaves["C"] = leaves["C"].detach().repeat_interleave(H // G, 2).requires_grad_()
        if impl(seq=seq, chunk=chunk, **{k: v.detach() for k, v in leaves.items()}) is None:
            rows.append(dict(impl=name, skipped="unsupported options (seq_idx or groups != heads)"))
            continue

        def fwd_bwd():
            out = impl(seq=seq, chunk=chunk, **leaves)
            out.backward(torch.ones_like(out))
            for v in leaves.values():
                v.grad = None
        with torch.no_grad():
            f_ms = time_ms(lambda: impl(seq=seq, chunk=chunk, **leaves), device, repeat)
        fb_ms = time_ms(fwd_bwd, device, repeat)
        rows.append(dict(impl=name, fwd_ms=f_ms, fwd_bwd_ms=fb_ms, peak_mib=peak_mem_mib(fwd_bwd, device),
                         fwd_tflops=flops / (f_ms / 1000) / 1e12))
    return add_ratios_to_ref(rows)


SCAN_COLUMNS = [("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwd_bwd_ms", ".2f"), ("peak MiB", "peak_mib", ".0f"),
                ("fwd GB/s", "fwd_gbs", ".1f"), ("% copy BW", "fwd_pct_copy_bw", ".1f"),
                ("fwd x ref", "fwd_speedup_vs_ref", ".1f"), ("fwd+bwd x ref", "fwd_bwd_speedup_vs_ref", ".1f")]
SSD_COLUMNS = [("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwd_bwd_ms", ".2f"), ("peak MiB", "peak_mib", ".0f"),
               ("fwd TFLOP/s", "fwd_tflops", ".3f"), ("fwd x ref", "fwd_speedup_vs_ref", ".1f"),
               ("fwd+bwd x ref", "fwd_bwd_speedup_vs_ref", ".1f")]


def print_table(title, rows, columns):
    print(f"\n## {title}")
    print("| impl | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for r in rows:
        if "skipped" in r:
            print(f"| {r['impl']} | skipped: {r['skipped']} |" + "|" * (len(columns) - 1))
            continue
        cells = [format(r[k], spec) if r.get(k) is not None else "-" for _, k, spec in columns]
        print(f"| {r['impl']} | " + " | ".join(cells) + " |")


def parse_ssd_shape(s):
    parts = tuple(int(p) for p in s.lower().split("x"))
    if len(parts) != 7:
        raise argparse.ArgumentTypeError(f"SSD shape must be BATCHxLxHEADSxHEADDIMxNxGROUPSxCHUNK, got {s!r}")
    return parts


def parse_shape(s):
    parts = tuple(int(p) for p in s.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be BATCHxDIMxLxN, got {s!r}")
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=["scan", "ssd", "all"], default="all")
    ap.add_argument("--ssd_shapes", type=parse_ssd_shape, nargs="*", default=None,
                    help="BATCHxLxHEADSxHEADDIMxNxGROUPSxCHUNK for the SSD")
    ap.add_argument("--shapes", type=parse_shape, nargs="*", default=None, help="BATCHxDIMxLxN for the scan")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--backends", default=None, help="comma-separated (default: triton,torch,ref on CUDA; torch,ref on CPU)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--max_ref_elems", type=float, default=3e8, help="skip ref/mambapy above this batch*dim*L*N")
    ap.add_argument("--mamba_ssm_triton", default=None,
                    help="folder with a copy of mamba_ssm/ops/triton/*.py: benchmark its SSD side by side (GPU)")
    ap.add_argument("--json", default=None, help="write all rows here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    backends = (args.backends or ("triton,torch,ref" if cuda else "torch,ref")).split(",")
    repeat = args.repeat or (20 if cuda else 3)
    shapes = args.shapes or ([(8, 1536, 2048, 16), (4, 2048, 8192, 16)] if cuda else [(2, 256, 2048, 16), (8, 128, 512, 16)])
    name = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    bw = copy_bandwidth_gbs(device)
    print(f"device: {name} | torch {torch.__version__} | dtype {str(dtype).replace('torch.', '')} | "
          f"measured copy bandwidth {bw:.1f} GB/s", flush=True)
    results = dict(device=name, torch=torch.__version__, dtype=str(dtype), copy_bandwidth_gbs=bw, argv=sys.argv, ops={})
    if args.op in ("scan", "all"):
        for shape in shapes:
            rows = bench_scan(shape, dtype, device, backends, repeat, bw, args.max_ref_elems)
            results["ops"][f"selective_scan {shape}"] = rows
            print_table(f"selective_scan (batch, dim, L, N) = {shape}, delta_softplus, D, z, delta_bias", rows,
                        SCAN_COLUMNS)
    if args.op in ("ssd", "all"):
        ssd_shapes = args.ssd_shapes or ([(8, L, 24, 64, 128, 1, 256) for L in (2048, 4096, 8192)] if cuda
                                         else [(1, 2048, 8, 32, 32, 1, 64)])
        ssd_backends = backends
        for shape in ssd_shapes:
            for docs in (0, 4):
                rows = bench_ssd(shape, dtype, device, ssd_backends, repeat, docs, max_ref_len=4096,
                                 mamba_ssm_dir=args.mamba_ssm_triton)
                results["ops"][f"ssd {shape} docs={docs}"] = rows
                print_table(f"mamba_chunk_scan_combined (batch, L, heads, headdim, N, groups, chunk) = {shape}, "
                            f"{'seq_idx with ' + str(docs) + ' documents' if docs else 'no seq_idx'}", rows, SSD_COLUMNS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
