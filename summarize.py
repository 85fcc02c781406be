"""Summarise training records: one row per run name, and plots of val loss.

    python summarize.py                                  # every record under records/
    python summarize.py --baseline baseline --runs baseline,cross --plot runs.png
    python summarize.py --target 3.28 --device "NVIDIA H100 80GB HBM3"

Columns: runs, mean and std of the final val loss, one-sample t-test p-value that the mean is below
--target (needs >= 2 runs), median ms/step (median over runs of each run's median step), its ratio to
the --baseline group, peak memory, tokens/s. Only compare ms/step between records of the same device.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent


def load_records(records_dir: str | Path) -> list[dict]:
    out = []
    for path in sorted(Path(records_dir).glob("**/summary.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping unreadable record {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(rec, dict) or "final_val_loss" not in rec or "run_name" not in rec:
            print(f"skipping {path}: not a training summary", file=sys.stderr)
            continue
        rec["_path"] = str(path.parent)
        out.append(rec)
    return out


def t_test_below(values: list[float], target: float) -> float:
    """One-sided one-sample t-test p-value for mean(values) < target (nan with fewer than 2 runs)."""
    if len(values) < 2:
        return float("nan")
    from scipy import stats
    if statistics.pstdev(values) == 0:
        return 0.0 if statistics.mean(values) < target else 1.0
    return float(stats.ttest_1samp(values, target, alternative="less").pvalue)


def summarize(records: list[dict], baseline: str | None = None, target: float = 3.28) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["run_name"], []).append(r)
    rows = []
    for name, recs in groups.items():
        losses = [r["final_val_loss"] for r in recs]
        ms = [r.get("median_step_ms", float("nan")) for r in recs]
        rows.append(dict(
            run_name=name, n=len(recs), mean_loss=statistics.mean(losses),
            std_loss=statistics.stdev(losses) if len(losses) > 1 else float("nan"),
            p_value=t_test_below(losses, target), median_step_ms=statistics.median(ms),
            peak_mib=max(r.get("peak_memory_allocated_mib", 0) for r in recs),
            tokens_per_s=statistics.median(r.get("tokens_per_s", float("nan")) for r in recs),
            devices=sorted({r.get("device", "?") for r in recs}),
        ))
    base = next((row for row in rows if row["run_name"] == baseline), None)
    if baseline is not None and base is None:
        raise SystemExit(f"--baseline {baseline!r} matches no run name; names: {', '.join(groups)}")
    for row in rows:
        row["ms_ratio"] = row["median_step_ms"] / base["median_step_ms"] if base else float("nan")
    return rows


def fmt(v, spec):
    return "-" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def markdown_table(rows: list[dict], target: float) -> str:
    lines = [f"| run | n | mean val loss | std | p (mean < {target}) | median ms/step | x baseline | peak MiB | tokens/s | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run_name']} | {r['n']} | {fmt(r['mean_loss'], '.4f')} | {fmt(r['std_loss'], '.4f')} | "
                     f"{fmt(r['p_value'], '.3g')} | {fmt(r['median_step_ms'], '.2f')} | {fmt(r['ms_ratio'], '.3f')} | "
                     f"{r['peak_mib']} | {fmt(r['tokens_per_s'], ',.0f')} | {', '.join(r['devices'])} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({r["run_name"] for r in records})
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled = set()
    for r in records:
        steps = [v["step"] for v in r["val"]]
        loss = [v["val_loss"] for v in r["val"]]
        secs = [v["train_time_ms"] / 1000 for v in r["val"]]
        label = r["run_name"] if r["run_name"] not in labelled else None
        labelled.add(r["run_name"])
        ax1.plot(steps, loss, marker=".", color=colors[r["run_name"]], label=label, alpha=0.8)
        ax2.plot(secs, loss, marker=".", color=colors[r["run_name"]], label=label, alpha=0.8)
    for ax, xl in ((ax1, "step"), (ax2, "training time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
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
    records = load_records(args.records_dir)
    if args.runs:
        keep = set(args.runs.split(","))
        records = [r for r in records if r["run_name"] in keep]
    if args.device:
        records = [r for r in records if args.device in r.get("device", "")]
    if not records:
        raise SystemExit(f"no training records found in {args.records_dir} (with the filters given); "
                         f"train one with ./run.sh")
    rows = summarize(records, args.baseline, args.target)
    print(markdown_table(rows, args.target))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(records, args.plot)
    return rows


if __name__ == "__main__":
    main()
