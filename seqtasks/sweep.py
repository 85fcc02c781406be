"""Reproduce one of the seeds' tables: every row of a config file, trained with N seeds, as a table of
mean and standard deviation next to the seed's own numbers, plus one plot of the mean error curves.

    python -m seqtasks.sweep seqtasks/configs/seed000_layers.yaml --seeds 3          # CPU budget (minutes)
    python -m seqtasks.sweep seqtasks/configs/seed000_layers.yaml --seeds 5 --full   # the seed's step budget
    python -m seqtasks.sweep CONFIG --rows l6,l12 --steps 500                          # some rows, fewer steps

A config file (YAML) holds: title; source (which seed and table); seed_budget (the seed's training, as
text); metrics (the columns the seed reports: val_loss, mask_error, sample_error, accuracy); base (the
seqtasks.run.Config fields shared by all rows, steps = the CPU budget, full_steps = the seed's); rows (a
list: name, Config fields that differ (task_args/model_args/val_task_args merged into base's), and seed:
the seed's numbers for the metrics, copied as facts); reduced (Config fields for the CPU budget, e.g. a
higher lr for fewer steps; not applied with --full). Writes <out>/<time>_<config>/: table.md, table.json
(every run with its curve, the machine, time and command) and curves.png. table.json is rewritten after
every evaluation, so an interrupted sweep (Ctrl-C, SIGTERM) keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .run import REPO, Config, new_run_dir, prepare_run, raise_keyboard_interrupt, train, write_atomic

METRICS = {  # key -> (column title, value from a result)
    "val_loss": ("validation loss", lambda r: r["val_loss"]),
    "mask_error": ("validation_mask_error%", lambda r: r["mask_error"]),
    "sample_error": ("validation_sample_error%", lambda r: r["sample_error"]),
    "accuracy": ("word accuracy%", lambda r: None if r["sample_error"] is None else 100 - r["sample_error"]),
}
MERGED = ("task_args", "val_task_args", "model_args")
TABLE_KEYS = {"title", "source", "seed_budget", "metrics", "base", "reduced", "rows", "notes"}


def load_sweep(path: str) -> dict:
    """The config file, checked: known keys, known metrics, every row a valid Config (ValueError if not)."""
    import yaml
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read sweep config {path}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise ValueError(f"{path}: needs a mapping with a non-empty list 'rows'")
    unknown = set(spec) - TABLE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(TABLE_KEYS)}")
    spec.setdefault("metrics", ["val_loss", "mask_error", "sample_error"])
    bad = [m for m in spec["metrics"] if m not in METRICS]
    if bad:
        raise ValueError(f"{path}: metrics {bad} unknown; known: {', '.join(METRICS)}")
    names = [r.get("name") if isinstance(r, dict) else None for r in spec["rows"]]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"{path}: every row needs a distinct name, got {names}")
    for row in spec["rows"]:
        row_config(spec, row)  # raises on unknown fields
        row_config(spec, row, full=True)
        unknown_seed = set(row.get("seed") or {}) - {f"{m}{sfx}" for m in spec["metrics"] for sfx in ("", "_std")}
        if unknown_seed:
            raise ValueError(f"{path}: row {row['name']!r}: seed numbers {sorted(unknown_seed)} are not in metrics")
    return spec


def row_config(spec: dict, row: dict, full: bool = False) -> Config:
    """base, then (unless full) the reduced-budget fields, then the row's own fields."""
    base = {**(spec.get("base") or {}), **({} if full else spec.get("reduced") or {})}
    fields = {k: v for k, v in row.items() if k not in ("seed", "label")}
    for key in MERGED:
        if key in fields:
            fields[key] = {**base.get(key, {}), **fields[key]}
    merged = {**base, **fields}
    unknown = set(merged) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"row {row.get('name')!r}: unknown fields {sorted(unknown)}; known: "
                         f"{sorted(Config.__dataclass_fields__)} (and seed, label)")
    return Config(**merged)


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(spec: dict, runs: dict[str, list[dict]]) -> list[dict]:
    """One entry per row: the seed's numbers and our mean/std over the completed runs."""
    out = []
    for row in spec["rows"]:
        done = [r for r in runs.get(row["name"], []) if r["status"] == "completed"]
        ours = {m: dict(zip(("mean", "std"), mean_std([METRICS[m][1](r) for r in done]))) for m in spec["metrics"]}
        out.append(dict(name=row["name"], label=row.get("label", ""), seed=row.get("seed") or {}, ours=ours,
                        runs=len(done), params=done[0]["params"] if done else None,
                        minutes_per_run=mean_std([r["train_minutes"] for r in done])[0]))
    return out


def fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec)


def budget_line(spec: dict, configs: list[Config], seeds: int) -> str:
    c = configs[0]
    steps = sorted({x.steps for x in configs})
    full = sorted({x.full_steps for x in configs if x.full_steps})
    ours = f"{'/'.join(map(str, steps))} steps x batch {c.batch_size}, lr {c.lr:g}, {seeds} seed(s) per row"
    if full and max(steps) < min(full):
        return (f"**REDUCED BUDGET**: {ours}; the seed trained {'/'.join(f'{s:,}' for s in full)} steps "
                f"({spec.get('seed_budget', 'see source')}). Numbers are not comparable in level, only in ordering.")
    return f"Seed's budget: {ours} (the seed: {spec.get('seed_budget', 'see source')})."


def markdown(spec: dict, summary: list[dict], header: str) -> str:
    lines = [f"### {spec.get('title', 'sweep')}", "", f"Source: {spec.get('source', '-')}", "", header, ""]
    if spec.get("notes"):
        lines += [spec["notes"].strip(), ""]
    cols = ["row", "settings"]
    for m in spec["metrics"]:
        cols += [f"seed: {METRICS[m][0]}", f"ours: {METRICS[m][0]} mean ± std"]
    cols += ["runs", "model params", "minutes/run"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        cells = [s["name"], s["label"]]
        for m in spec["metrics"]:
            o = s["ours"][m]
            seed = fmt(s["seed"].get(m)) + (f" ± {fmt(s['seed'][m + '_std'])}" if m + "_std" in s["seed"] else "")
            cells += [seed, "-" if o["mean"] is None else f"{fmt(o['mean'])} ± {fmt(o['std'])}"]
        cells += [str(s["runs"]), fmt(s["params"], ",") if s["params"] else "-", fmt(s["minutes_per_run"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(spec: dict, runs: dict[str, list[dict]], path: Path) -> None:
    """Mean validation error curves per row (band: min..max over seeds), mask and sample error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in runs.items():
        curves = [r["curve"] for r in rs if r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c["step"] for c in curves[0][:n]]
        for ax, key in zip(axes, ("mask_error", "sample_error")):
            vals = [[max(c[i][key], 1e-3) for c in curves] for i in range(n)]
            line, = ax.plot(steps, [statistics.fmean(v) for v in vals], label=f"{name} ({len(curves)} runs)")
            if len(curves) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                alpha=0.15)
    for ax, key in zip(axes, ("mask error", "sample error")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key} %, mean (band: min..max)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(spec.get("title", ""), fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def machine() -> dict:
    return dict(host=platform.node(), platform=platform.platform(), processor=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="sweep config (YAML), e.g. seqtasks/configs/seed000_layers.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="runs per row (seeds 0..N-1; the seeds used 1 or 5)")
    ap.add_argument("--full", action="store_true", help="the seed's step budget (full_steps; GPU hours)")
    ap.add_argument("--steps", type=int, help="override every row's step count")
    ap.add_argument("--rows", help="comma list of row names to run (default: all)")
    ap.add_argument("--out", default=str(REPO / "runs" / "seqtasks" / "sweeps"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    try:
        spec = load_sweep(args.config)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.rows:
        wanted = args.rows.split(",")
        missing = set(wanted) - {r["name"] for r in spec["rows"]}
        if missing:
            raise SystemExit(f"--rows {sorted(missing)} not in {args.config}: {[r['name'] for r in spec['rows']]}")
        spec["rows"] = [r for r in spec["rows"] if r["name"] in wanted]
    configs = []
    for row in spec["rows"]:
        c = row_config(spec, row, args.full)
        if args.steps:
            c = Config(**{**asdict(c), "steps": args.steps, "eval_every": min(c.eval_every, args.steps)})
        if args.full:
            full = c.full_steps or c.steps
            c = Config(**{**asdict(c), "steps": full, "eval_every": max(c.eval_every, full // 50)})
        configs.append(c)
    try:  # every row's task and model are built once before anything runs or a folder is made
        for c in configs:
            prepare_run(c)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = new_run_dir(Path(args.out), Path(args.config).stem + ("_full" if args.full else ""))
    header = budget_line(spec, configs, args.seeds)
    runs: dict[str, list[dict]] = {}
    record = dict(config_file=args.config, command="python -m seqtasks.sweep " + " ".join(sys.argv[1:] if argv is None
                  else argv), started_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), machine=machine(),
                  header=header, spec=spec)

    def save(current=None, name=None):
        shown = {k: v + ([current] if current is not None and k == name else []) for k, v in runs.items()}
        record.update(summary=summarize(spec, shown), runs=shown,
                      finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        write_atomic(out / "table.json", json.dumps(record, indent=1))

    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    interrupted = False
    try:
        for row, cfg in zip(spec["rows"], configs):
            runs[row["name"]] = []
            for seed in range(args.seeds):
                c = Config(**{**asdict(cfg), "seed": seed, "name": f"{row['name']}-s{seed}"})
                result = train(c, progress=args.progress, on_eval=lambda r, n=row["name"]: save(r, n))
                runs[row["name"]].append(result)
                save()
                print(f"{c.name}: {result['status']}, mask error {fmt(result['mask_error'])}%, sample error "
                      f"{fmt(result['sample_error'])}%, {result['train_minutes']:.2f} min", flush=True)
                if result["status"] == "interrupted":
                    interrupted = True
                    break
            if interrupted:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
    save()
    table = markdown(spec, record["summary"], header + (" INTERRUPTED: partial." if interrupted else ""))
    write_atomic(out / "table.md", table)
    plot(spec, runs, out / "curves.png")
    print(table)
    print(f"wrote {out}/table.md, table.json, curves.png")
    record["out"] = str(out)
    return record


if __name__ == "__main__":
    main()
