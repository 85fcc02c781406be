"""Seed 004's precision study: how far the scans drift from a float64 sequential loop as the sequence grows.

    python -m seqtasks.pscan_precision                        # lengths 2^6..2^16, float32 and bfloat16
    python -m seqtasks.pscan_precision --max_log2 12 --out /tmp/p

For h_t = a_t h_{t-1} + b_t with Mamba-like decays a = exp(-softplus(z - shift)), z ~ N(0, 1) (shift 4: a
near 0.98, long memory) and inputs b ~ N(0, 1), it runs in each dtype: the sequential loop, the log-space
scan (seed 004's P-scan) and the linear-space doubling scan (kernels.selective_scan.pscan.parallel_scan),
and reports max |h - h_ref| / max |h_ref| against the float64 loop over the same (rounded) inputs.
Writes precision.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.selective_scan.pscan import log_space_scan, parallel_scan, sequential_scan

from .run import REPO, new_run_dir, write_atomic
from .sweep import machine

METHODS = {"sequential": sequential_scan, "log_space": log_space_scan, "parallel": parallel_scan}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure(length: int, decay_shift: float, channels: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(-F.softplus(torch.randn(2, length, channels, generator=g, dtype=torch.float64) - decay_shift))
    b = torch.randn(2, length, channels, generator=g, dtype=torch.float64)
    out = {}
    for dname, dtype in DTYPES.items():
        a_d, b_d = a.to(dtype), b.to(dtype)
        # the reference scans the same rounded inputs, so only the scan's own arithmetic is measured
        ref = sequential_scan(a_d.double(), b_d.double())
        scale = ref.abs().max().item()
        for mname, fn in METHODS.items():
            out[f"{mname}/{dname}"] = (fn(a_d, b_d).double() - ref).abs().max().item() / scale
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min_log2", type=int, default=6)
    ap.add_argument("--max_log2", type=int, default=16)
    ap.add_argument("--decay_shift", type=float, default=4.0, help="a = exp(-softplus(N(0,1) - shift))")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "records" / "seqtasks"))
    args = ap.parse_args(argv)
    if not 1 <= args.min_log2 <= args.max_log2 <= 24:
        raise SystemExit(f"need 1 <= --min_log2 <= --max_log2 <= 24, got {args.min_log2}, {args.max_log2}")
    lengths = [2 ** k for k in range(args.min_log2, args.max_log2 + 1)]
    rows = []
    for L in lengths:
        rows.append(dict(length=L, **measure(L, args.decay_shift, args.channels, seed=L)))
        print(rows[-1], flush=True)
    out = new_run_dir(Path(args.out), "pscan_precision")
    keys = [k for k in rows[0] if k != "length"]
    md = ["| length | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    md += ["| " + " | ".join([str(r["length"])] + [f"{r[k]:.2e}" for k in keys]) + " |" for r in rows]
    note = (f"max |h - h_ref| / max |h_ref| against a float64 sequential loop over the same rounded inputs; "
            f"a = exp(-softplus(N(0,1) - "
            f"{args.decay_shift:g})), b ~ N(0,1), 2 x {args.channels} channels")
    write_atomic(out / "precision.md", note + "\n\n" + "\n".join(md) + "\n")
    write_atomic(out / "precision.json", json.dumps(dict(
        command="python -m seqtasks.pscan_precision " + " ".join(argv or []), note=note, machine=machine(),
        finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), rows=rows), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in keys:
        ax.plot(lengths, [max(r[k], 1e-12) for r in rows], marker=".", ls="-" if "float32" in k else "--", label=k)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="relative max error vs float64 loop")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("scan precision (seed 004): sequential, log-space, linear-space parallel", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "precision.png", dpi=110)
    plt.close(fig)
    print("\n".join(md))
    print(f"wrote {out}/precision.md, precision.json, precision.png")


if __name__ == "__main__":
    main()
