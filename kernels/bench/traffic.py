"""The SSD chain's memory traffic per kernel, ours next to mamba_ssm's, counted from shapes and dtypes by
kernels.ssd.traffic (nothing runs, no GPU needed)."""
from __future__ import annotations

import torch

from .common import dtype_name


def ssd_traffic_rows(shape, dtype, has_z=True, has_D=True):
    """Rows (impl, pass, kernel, read_bytes, write_bytes), with a "total" row per impl and pass; None when
    kernels.ssd.traffic is not there."""
    try:
        from ..ssd.traffic import ssd_traffic
    except ImportError:
        return None
    batch, L, H, P, N, G, chunk = shape
    rows = []
    for impl in ("ours", "mamba_ssm"):
        counts = ssd_traffic(batch, L, H, P, N, G, chunk, dtype, has_z=has_z, has_D=has_D, impl=impl)
        for pass_name in ("forward", "backward"):
            kernels = counts[pass_name]
            for name, read, write in kernels:
                rows.append(dict(impl=impl, pass_=pass_name, kernel=name, read_bytes=read, write_bytes=write))
            rows.append(dict(impl=impl, pass_=pass_name, kernel="total", read_bytes=sum(k[1] for k in kernels),
                             write_bytes=sum(k[2] for k in kernels)))
    return rows


def print_ssd_traffic(shape, dtype: torch.dtype, has_z=True, has_D=True):
    rows = ssd_traffic_rows(shape, dtype, has_z, has_D)
    print(f"\n## SSD memory traffic per kernel, (batch, L, heads, headdim, N, groups, chunk) = {shape}, "
          f"{dtype_name(dtype)}, z={'on' if has_z else 'off'}, D={'on' if has_D else 'off'} (MB = 1e6 bytes)")
    if rows is None:
        print("kernels.ssd.traffic is not available yet: no traffic table")
        return None
    print("| impl | pass | kernel | read MB | write MB | total MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        bold = "**" if r["kernel"] == "total" else ""
        print(f"| {r['impl']} | {r['pass_']} | {bold}{r['kernel']}{bold} | {r['read_bytes'] / 1e6:.1f} | "
              f"{r['write_bytes'] / 1e6:.1f} | {(r['read_bytes'] + r['write_bytes']) / 1e6:.1f} |")
    totals = {(r["impl"], r["pass_"]): r["read_bytes"] + r["write_bytes"] for r in rows if r["kernel"] == "total"}
    for p in ("forward", "backward"):
        print(f"{p}: ours / mamba_ssm = {totals[('ours', p)] / totals[('mamba_ssm', p)]:.2f}")
    return rows
