"""Microbenchmarks for the kernels: one entry point for every op.

    python -m kernels.bench                          # preset gpu on CUDA, preset cpu (< 2 min on 2 cores) otherwise
    python -m kernels.bench --preset gpu --json out.json [--mamba_ssm_triton DIR]
    python -m kernels.bench --preset tiny            # seconds on a CPU: a dry run of the whole pipeline
    python -m kernels.bench --op scan --shapes 8x1536x2048x16 --dtype bf16
    python -m kernels.bench --traffic                # SSD memory traffic per kernel, ours vs mamba_ssm; runs nothing
    python -m kernels.bench --peers                  # CPU: our torch paths vs mambapy / transformers / loops

Per op, shape and implementation: forward and forward+backward ms (median), the bytes the op must move
(inputs read once, output written once; backward reads inputs and the output gradient, writes the
gradients), achieved GB/s and its share of the copy bandwidth measured in the same process, peak memory
(CUDA) and memory saved for backward, errors against a float64 reference. Rows: see kernels/bench/common.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import common
from .common import DTYPES, copy_bandwidth_gbs, print_table
from .ops import bench_scan, bench_ssd
from .traffic import print_ssd_traffic

# (scan shapes BATCHxDIMxLxN, SSD shapes BATCHxLxHEADSxHEADDIMxNxGROUPSxCHUNK, dtype, backends, repeat, docs)
PRESETS = {
    # the real shapes: the Mamba-1 scan at 8 x 1536 x 2048 x 16 and the MoT char model's 1 x 256 x 786432 x 16;
    # SSD at batch 8, L 2K/4K/8K, 24 heads x 64, dstate 128, chunk 256
    "gpu": dict(shapes=[(8, 1536, 2048, 16), (1, 256, 786432, 16)],
                ssd_shapes=[(8, L, 24, 64, 128, 1, 256) for L in (2048, 4096, 8192)],
                dtype="bf16", backends="triton,torch", repeat=20, docs=(0,)),
    # a CPU run that finishes in under 2 minutes on 2 cores
    "cpu": dict(shapes=[(1, 256, 1024, 16), (4, 128, 256, 16)], ssd_shapes=[(1, 2048, 8, 32, 32, 1, 64)],
                dtype="fp32", backends="torch,ref", repeat=3, docs=(0, 4)),
    # seconds on a CPU: the GPU check's dry run and the bench test
    "tiny": dict(shapes=[(1, 16, 40, 4)], ssd_shapes=[(1, 40, 2, 8, 8, 1, 16)], dtype="fp32",
                 backends="triton,torch,ref", repeat=1, docs=(0, 2)),
}


def parse_dims(count, what):
    def parse(s):
        parts = tuple(int(p) for p in s.lower().split("x"))
        if len(parts) != count:
            raise argparse.ArgumentTypeError(f"{what} must be {count} numbers joined by x, got {s!r}")
        return parts
    return parse


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default=None,
                    help="shape set (default: gpu on CUDA, cpu otherwise); --shapes/--ssd_shapes/--dtype/... override")
    ap.add_argument("--op", choices=["scan", "ssd", "all"], default="all")
    ap.add_argument("--shapes", type=parse_dims(4, "scan shape BATCHxDIMxLxN"), nargs="*", default=None)
    ap.add_argument("--ssd_shapes", type=parse_dims(7, "SSD shape BATCHxLxHEADSxHEADDIMxNxGROUPSxCHUNK"), nargs="*",
                    default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--backends", default=None, help="comma-separated subset of triton,torch,ref")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--mamba_ssm_triton", default=None,
                    help="folder with a copy of mamba_ssm/ops/triton/*.py: benchmark its SSD side by side (GPU)")
    ap.add_argument("--json", default=None, help="write the rows (a JSON list of dicts) here")
    ap.add_argument("--traffic", action="store_true",
                    help="print only the SSD per-kernel memory traffic (ours vs mamba_ssm) for the preset's SSD shapes")
    ap.add_argument("--peers", action="store_true", help="CPU peers comparison and scaling table (see peers.py)")
    ap.add_argument("--peer_lengths", type=int, nargs="*", default=None)
    ap.add_argument("--peer_ops", default="scan,ssd,mamba,mamba2",
                    help="--peers: which comparisons (comma-separated): ops scan, ssd; modules mamba, mamba2")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="CPU timing: wall time, or this process's CPU time (steadier on a shared machine; use with "
                         "OMP_NUM_THREADS=1)")
    return ap


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_peers(args, header):
    from .peers import module_peer_rows, print_scaling, scan_peer_rows, ssd_peer_rows
    lengths = args.peer_lengths or [64, 256, 1024, 4096, 16384]
    rounds = args.repeat or 3
    chosen = args.peer_ops.split(",")
    rows = []
    if "scan" in chosen:
        rows += scan_peer_rows(1, 256, 16, lengths, rounds, loop_max_len=4096)
    if "ssd" in chosen:
        rows += ssd_peer_rows(1, 8, 64, 64, 64, lengths, rounds, loop_max_len=4096)
    mod_lengths = [L for L in lengths if 256 <= L <= 4096] or lengths
    for kind in ("mamba", "mamba2"):
        if kind in chosen:
            rows += module_peer_rows(kind, (256, 768), mod_lengths, rounds)
    scaling = print_scaling(rows)
    return [dict(header, **r) for r in rows] + [dict(header, scaling=s) for s in scaling]


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    dtype = DTYPES[args.dtype or preset["dtype"]]
    ssd_shapes = args.ssd_shapes or preset["ssd_shapes"]
    if args.traffic:
        for shape in ssd_shapes:
            print_ssd_traffic(shape, dtype)
        return []
    command = " ".join(["python -m kernels.bench"] + (sys.argv[1:] if argv is None else list(argv)))
    common.clock = common.CLOCKS[args.clock]
    header = dict(device=device_name(device), torch=torch.__version__, command=command,
                  clock="cuda events" if device.type == "cuda" else args.clock)
    if args.peers:
        rows = run_peers(args, header)
    else:
        backends = (args.backends or preset["backends"]).split(",")
        if device.type != "cuda" and "triton" in backends and not args.backends:
            backends.remove("triton")
        repeat = args.repeat or preset["repeat"]
        copy_gbs = copy_bandwidth_gbs(device)
        print(f"device: {header['device']} | torch {torch.__version__} | dtype {str(dtype).replace('torch.', '')} | "
              f"copy bandwidth measured here {copy_gbs:.1f} GB/s (read + write)", flush=True)
        rows = []
        if args.op in ("scan", "all"):
            for shape in args.shapes or preset["shapes"]:
                r = bench_scan(shape, dtype, device, backends, repeat, copy_gbs)
                print_table(f"selective_scan (batch, dim, L, N) = {shape}, delta_softplus, D, z, delta_bias", r)
                rows += r
        if args.op in ("ssd", "all"):
            for shape in ssd_shapes:
                print_ssd_traffic(shape, dtype)
                for docs in preset["docs"]:
                    r = bench_ssd(shape, dtype, device, backends, repeat, copy_gbs, docs, args.mamba_ssm_triton)
                    documents = f"seq_idx with {docs} documents" if docs else "no seq_idx"
                    print_table(f"mamba_chunk_scan_combined (batch, L, heads, headdim, N, groups, chunk) = {shape}, "
                                f"D, z, dt_bias, softplus, {documents}", r)
                    rows += r
        rows = [dict(header, **r) for r in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return rows
