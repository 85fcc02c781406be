"""Timing, memory, bandwidth and error helpers shared by every benchmark, and the row format.

A row is a flat dict (the --json output is a list of them):
op, shape, dtype, impl, fwd_ms, fwdbwd_ms, fwd_bytes, fwdbwd_bytes, fwd_gbs, fwdbwd_gbs, copy_gbs,
fwd_copy_share, fwdbwd_copy_share, peak_mib (CUDA: allocator peak above the inputs during fwd+bwd; CPU:
None), saved_mib (tensors autograd keeps for backward), fwd_err, grad_err (norm-relative, against a float64
reference run of ref_impl), ref_impl, and `skipped` (why) instead of the measurements when an impl did
not run.
"""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# CPU timings: wall time, or this process's CPU time ("cpu": steadier when other processes share the
# machine; meaningful with one torch thread). CUDA always uses events.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector run once, then paused for the block (timeit does the same).
    Otherwise a collection set off by one candidate's objects lands in whichever call comes next:
    interleaved with the minimal loops (thousands of autograd nodes per call), our SSD forward+backward at
    L 256 took a median 9.4 ms per call with the collector on, 4.7 ms with it off (2-core VM, CPU time).
    Collecting before every call instead steadies the numbers but runs each call on cold caches."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def time_ms(fn, device, repeat: int, warmup: int = 1) -> float:
    """Median time of fn() in ms (`clock` on CPU). CUDA: triton's do_bench (events, cache flush)."""
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
    with gc_paused():
        for _ in range(repeat):
            t = clock()
            fn()
            sync(device)
            times.append(1000 * (clock() - t))
    return statistics.median(times)


def copy_bandwidth_gbs(device, numel: int | None = None) -> float:
    """Device copy bandwidth: bytes read + bytes written per second for a large fp32 copy."""
    n = numel or ((1 << 28) if device.type == "cuda" else (1 << 24))
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeat=10)
    return 2 * src.numel() * src.element_size() / (ms / 1000) / 1e9


def peak_mem_mib(fn, device):
    """CUDA allocator peak above what was allocated before fn (None on CPU: no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def saved_for_backward_mib(fn) -> float:
    """MiB of distinct tensor storage autograd saves for backward while fn() builds its graph (custom
    autograd Functions included). Works on every device; the memory that grows with L during training."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.data_ptr(), t.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20


def rel_err(a, b) -> float:
    """Norm-relative error of a against the reference b, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fwd_bwd_bytes(inputs: dict, out_bytes: int, grad_keys) -> tuple[int, int]:
    """Bytes an op must move at least: forward reads every input once and writes the output; backward
    reads the inputs and the output gradient once and writes one gradient per differentiable input."""
    in_bytes = tensor_bytes(*inputs.values())
    grad_bytes = tensor_bytes(*(inputs[k] for k in grad_keys if inputs.get(k) is not None))
    fwd = in_bytes + out_bytes
    return fwd, fwd + in_bytes + out_bytes + grad_bytes


def measure(impl, inputs: dict, grad_keys, device, repeat: int, reference=None):
    """Time impl(**inputs) forward (no grad) and forward+backward (gradient of sum(out * w) for a fixed
    random w); errors against `reference` = (out, {key: grad}) from a float64 run, when given."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_keys) if v is not None and v.is_floating_point()
                  else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = impl(**leaves)
    weight = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(1), device=device,
                         dtype=out.dtype)

    def fwd_bwd():
        o = impl(**leaves)
        o.backward(weight)
        return o

    def clear():
        for k in grad_keys:
            if leaves.get(k) is not None:
                leaves[k].grad = None

    row = {}
    with torch.no_grad():
        row["fwd_ms"] = time_ms(lambda: impl(**leaves), device, repeat)
    row["fwdbwd_ms"] = time_ms(lambda: (fwd_bwd(), clear()), device, repeat)
    row["peak_mib"] = peak_mem_mib(lambda: (fwd_bwd(), clear()), device)
    row["saved_mib"] = saved_for_backward_mib(lambda: impl(**leaves))
    if reference is not None:
        ref_out, ref_grads = reference
        clear()
        o = fwd_bwd()
        row["fwd_err"] = rel_err(o, ref_out)
        row["grad_err"] = max(rel_err(leaves[k].grad, g) for k, g in ref_grads.items())
        clear()
    return row


def reference_run(impl, inputs: dict, grad_keys, device):
    """(out, {key: grad}) of impl in float64, with the weight measure() uses (same seed)."""
    leaves = {k: (v.detach().double().requires_grad_(k in grad_keys) if v is not None and v.is_floating_point()
                  else v) for k, v in inputs.items()}
    out = impl(**leaves)
    weight = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(1), device=device,
                         dtype=inputs[next(iter(inputs))].dtype).double()
    out.backward(weight)
    return out.detach(), {k: leaves[k].grad for k in grad_keys if leaves.get(k) is not None}


def add_bandwidth(row, fwd_bytes, fwdbwd_bytes, copy_gbs):
    row.update(fwd_bytes=fwd_bytes, fwdbwd_bytes=fwdbwd_bytes, copy_gbs=copy_gbs)
    if "fwd_ms" in row:
        row["fwd_gbs"] = fwd_bytes / (row["fwd_ms"] / 1000) / 1e9
        row["fwdbwd_gbs"] = fwdbwd_bytes / (row["fwdbwd_ms"] / 1000) / 1e9
        row["fwd_copy_share"] = row["fwd_gbs"] / copy_gbs
        row["fwdbwd_copy_share"] = row["fwdbwd_gbs"] / copy_gbs
    return row


COLUMNS = [("impl", "impl", "s"), ("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
           ("fwd GB/s", "fwd_gbs", ".1f"), ("fwd % copy", "fwd_copy_share", ".1%"),
           ("fwd+bwd GB/s", "fwdbwd_gbs", ".1f"), ("fwd+bwd % copy", "fwdbwd_copy_share", ".1%"),
           ("peak MiB", "peak_mib", ".0f"), ("saved MiB", "saved_mib", ".1f"), ("fwd err", "fwd_err", ".1e"),
           ("grad err", "grad_err", ".1e")]


def print_table(title, rows, columns=COLUMNS):
    print(f"\n## {title}")
    print("| " + " | ".join(c[0] for c in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        if "skipped" in r:
            print(f"| {r['impl']} | skipped: {r['skipped']} |" + " |" * (len(columns) - 2))
            continue
        cells = [format(r[k], spec) if r.get(k) is not None else "-" for _, k, spec in columns]
        print("| " + " | ".join(cells) + " |")
    print(flush=True)
