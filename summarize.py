"""Summarise training records: one row per run name, and plots of val loss.

    python summarize.py                                  # every record under records/
    python summarize.py --baseline baseline --runs baseline,cross --plot runs.png
    python summarize.py --target 3.28 --device "NVIDIA H100 80GB HBM3"

Columns: runs, mean and std of the final val loss, one-sample t-test p-value that the mean is below
--target (needs >= 2 runs), median ms/step (median over runs of each run's median step), its ratio to
the --baseline group, peak memory, tokens/s. Only compare ms/step between records of the same device.

Only completed runs with a finite final val loss are ranked and averaged. A record's "status" is
"completed", "interrupted", "diverged" or "failed" (records written before the key existed are
completed runs); the others are listed under the table ("diverged at step N"), never as results.
A record that cannot be read or lacks what it needs is skipped with a warning.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
STATUSES = ("completed", "interrupted", "diverged", "failed")


def warn(msg: str) -> None:
    print(f"summarize.py: {msg}", file=sys.stderr)


def finite_number(v) -> float | None:
    """v as a float if it is a finite real number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def number_or_nan(rec: dict, key: str) -> float:
    v = finite_number(rec.get(key))
    return float("nan") if v is None else v


def loss_stats(losses, target: float) -> dict:
    """Statistics of final val losses of repeated runs: n, mean, std (sample, nan below 2 runs) and the
    one-sided one-sample t-test p-value that the mean is below `target` (nan below 2 runs).
    Every loss must be a finite number (a diverged run is not a result): ValueError otherwise."""
    values = []
    for i, v in enumerate(losses):
        f = finite_number(v)
        if f is None:
            raise ValueError(f"losses[{i}] must be a finite number, got {v!r}")
        values.append(f)
    if not values:
        raise ValueError("losses must hold at least one value")
    if finite_number(target) is None:
        raise ValueError(f"target must be a finite number, got {target!r}")
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    if n < 2:
        p = float("nan")
    elif std == 0:  # the t statistic is +-inf: certain either way
        p = 0.0 if mean < target else 1.0
    else:
        from scipy import stats
        p = float(stats.ttest_1samp(values, target, alternative="less").pvalue)
    return dict(n=n, mean=mean, std=std, p_value=p)


def record_status(rec: dict) -> str:
    """The record's status; records without the key predate it and are completed runs."""
    return rec.get("status", "completed")


def stopped_at_step(rec: dict) -> int | None:
    """The step a diverged or interrupted run stopped at, if the record says."""
    for key in ("diverged_at_step", "interrupted_at_step"):
        v = rec.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    steps = rec.get("step_ms")
    return len(steps) if isinstance(steps, list) else None


def is_ranked(rec: dict) -> bool:
    """Completed with a finite final val loss: the only records that count as results."""
    return record_status(rec) == "completed" and finite_number(rec.get("final_val_loss")) is not None


def describe_unranked(rec: dict) -> str:
    status, step = record_status(rec), stopped_at_step(rec)
    if status == "completed":
        return f"completed, but its final val loss is {rec.get('final_val_loss')!r}, not a finite number"
    error = rec.get("error")
    return (status + (f" at step {step}" if step is not None else "")
            + (f": {error[:200]}" if isinstance(error, str) and error else ""))


def load_records(records_dir: str | Path) -> list[dict]:
    """Every summary.json under records_dir that is a training record (ranked or not); anything that
    cannot be read or is not one is skipped with a warning."""
    out = []
    for path in sorted(Path(records_dir).glob("**/summary.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            warn(f"skipping unreadable record {path}: {e}")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("run_name"), str) or not rec["run_name"]:
            warn(f"skipping {path}: not a training summary (no run_name)")
            continue
        if rec.get("status", "completed") not in STATUSES:
            warn(f"skipping {path}: unknown status {rec.get('status')!r} (expected one of {', '.join(STATUSES)})")
            continue
        if "status" not in rec and "final_val_loss" not in rec:
            warn(f"skipping {path}: neither a status nor a final_val_loss")
            continue
        rec["_path"] = str(path.parent)
        out.append(rec)
    return out


def median_or_nan(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def summarize(records: list[dict], baseline: str | None = None, target: float = 3.28) -> list[dict]:
    """One row per run name over the ranked records (completed, finite final val loss)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if is_ranked(r):
            groups.setdefault(r["run_name"], []).append(r)
    rows = []
    for name, recs in groups.items():
        stats = loss_stats([r["final_val_loss"] for r in recs], target)
        peaks = [p for p in (number_or_nan(r, "peak_memory_allocated_mib") for r in recs) if not math.isnan(p)]
        rows.append(dict(
            run_name=name, n=stats["n"], mean_loss=stats["mean"], std_loss=stats["std"], p_value=stats["p_value"],
            median_step_ms=median_or_nan(number_or_nan(r, "median_step_ms") for r in recs),
            peak_mib=max(peaks, default=float("nan")),
            tokens_per_s=median_or_nan(number_or_nan(r, "tokens_per_s") for r in recs),
            devices=sorted({str(r.get("device", "?")) for r in recs}),
        ))
    base = next((row for row in rows if row["run_name"] == baseline), None)
    if baseline is not None and base is None:
        raise SystemExit(f"--baseline {baseline!r} matches no completed run; ranked names: {', '.join(groups) or 'none'}")
    for row in rows:
        row["ms_ratio"] = row["median_step_ms"] / base["median_step_ms"] if base and base["median_step_ms"] else float("nan")
    return rows


def fmt(v, spec):
    return "-" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def markdown_table(rows: list[dict], target: float) -> str:
    lines = [f"| run | n | mean val loss | std | p (mean < {target}) | median ms/step | x baseline | peak MiB | tokens/s | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run_name']} | {r['n']} | {fmt(r['mean_loss'], '.4f')} | {fmt(r['std_loss'], '.4f')} | "
                     f"{fmt(r['p_value'], '.3g')} | {fmt(r['median_step_ms'], '.2f')} | {fmt(r['ms_ratio'], '.3f')} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {fmt(r['tokens_per_s'], ',.0f')} | {', '.join(r['devices'])} |")
    return "\n".join(lines)


def unranked_lines(records: list[dict]) -> list[str]:
    return [f"- {r['run_name']}: {describe_unranked(r)} ({r['_path']})" for r in records if not is_ranked(r)]


def val_curve(rec: dict) -> list[tuple[float, float, float]]:
    """(step, seconds, val loss) points with finite values; malformed entries are dropped."""
    points = []
    for v in rec.get("val") if isinstance(rec.get("val"), list) else []:
        if isinstance(v, dict):
            p = [finite_number(v.get(k)) for k in ("step", "train_time_ms", "val_loss")]
            if None not in p:
                points.append((p[0], p[1] / 1000, p[2]))
    return points


def plot(records: list[dict], path: str) -> None:
    """Val loss against step and against training time; runs that did not complete are dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({r["run_name"] for r in records})
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled = set()
    for r in records:
        points = val_curve(r)
        if not points:
            continue
        steps, secs, loss = zip(*points)
        label = r["run_name"] if r["run_name"] not in labelled else None
        labelled.add(r["run_name"])
        style = dict(marker=".", color=colors[r["run_name"]], label=label, alpha=0.8,
                     linestyle="-" if record_status(r) == "completed" else "--")
        ax1.plot(steps, loss, **style)
        ax2.plot(secs, loss, **style)
    for ax, xl in ((ax1, "step"), (ax2, "training time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records_dir", default=str(REPO_DIR / "records"))
    ap.add_argument("--runs", default=None, help="comma-separated run names to include (default: all)")
    ap.add_argument("--device", default=None, help="only records whose device contains this text")
    ap.add_argument("--baseline", default=None, help="run name whose ms/step is the 1.0 of the ratio column")
    ap.add_argument("--target", type=float, default=3.28)
    ap.add_argument("--plot", default=None, help="write val loss vs step and vs time to this PNG")
    ap.add_argument("--json", default=None, help="write the table rows to this JSON file")
    args = ap.parse_args(argv)
    if finite_number(args.target) is None:
        ap.error(f"--target must be a finite number, got {args.target}")
    records = load_records(args.records_dir)
    if args.runs:
        keep = set(args.runs.split(","))
        records = [r for r in records if r["run_name"] in keep]
    if args.device:
        records = [r for r in records if args.device in str(r.get("device", ""))]
    if not records:
        raise SystemExit(f"no training records found in {args.records_dir} (with the filters given); "
                         f"train one with ./run.sh")
    rows = summarize(records, args.baseline, args.target)
    print(markdown_table(rows, args.target))
    others = unranked_lines(records)
    if others:
        print(f"\nNot ranked ({len(others)} runs that did not complete with a finite loss):")
        print("\n".join(others))
    if args.json:
        nan_free = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps(nan_free, indent=1))
    if args.plot:
        plot(records, args.plot)
    return rows


if __name__ == "__main__":
    main()
