"""Run synthetic-task experiments: train, evaluate on a fixed held-out set, write a table and plots.

    python -m seqtasks.run --preset selcopy-mamba selcopy-conv6       # compare presets (CPU minutes)
    python -m seqtasks.run --preset selcopy-conv12 --full             # the seed's full step count (GPU)
    python -m seqtasks.run --config my.yaml                           # keys as in Config below
    python -m seqtasks.run --task selcopy --model mamba --steps 2000 --model_args '{"ch": 32}'
    python -m seqtasks.run --list                                     # presets

Writes runs/seqtasks/<time>_<names>/: results.json, results.md (the seeds' column layout) and
curves.png (validation mask error and sample error against steps). Every config is checked (values,
task, whether the task's sample space holds the validation set, model) before the folder is created;
results.json is rewritten atomically after every evaluation, so an interrupted run (Ctrl-C, SIGTERM)
keeps its curve; each result's "status" says completed, interrupted or diverged.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import MODELS, build_model
from .tasks import TASKS, Dataset, Task, encode

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    name: str = "run"
    task: str = "selcopy"
    task_args: dict = field(default_factory=dict)
    model: str = "conv"
    model_args: dict = field(default_factory=dict)
    steps: int = 2000
    full_steps: int = 0  # the seed's step count, used with --full
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 100
    eval_every: int = 250
    num_val: int = 1000
    seed: int = 0
    val_task_args: dict = field(default_factory=dict)  # overrides task_args for the validation set only


SELCOPY = dict(num_items=10, area=40)
# seeds 000/001's "1 million steps" are 1M training samples (their trainer's max_inputs; train time x
# throughput = 1M in every table): 15,625 steps of their batch 64
SEED_STEPS = 1_000_000 // 64
PRESETS = {
    # seed 000: 10 letters in a 40-wide space; conv receptive field ~ layers * (ks // 2) each way
    "selcopy-conv6": Config("selcopy-conv6", "selcopy", SELCOPY, "conv", dict(ch=64, layers=6, ks=9), steps=3000,
                            full_steps=SEED_STEPS, lr=2e-3, batch_size=32),
    "selcopy-conv12": Config("selcopy-conv12", "selcopy", SELCOPY, "conv", dict(ch=64, layers=12, ks=9), steps=3000,
                             full_steps=SEED_STEPS, lr=2e-3),
    # lr 1e-2 / batch 32 measured on a 2-core CPU: 800 steps reached 45% mask error vs 64% at lr 3e-3
    "selcopy-mamba": Config("selcopy-mamba", "selcopy", SELCOPY, "mamba", dict(ch=64, layers=2, d_state=16),
                            steps=3000, full_steps=SEED_STEPS, lr=1e-2, batch_size=32),
    "selcopy-mamba2": Config("selcopy-mamba2", "selcopy", SELCOPY, "mamba2", dict(ch=64, layers=2, d_state=16, headdim=16),
                             steps=3000, full_steps=SEED_STEPS, lr=3e-3),
    "selcopy-lstm": Config("selcopy-lstm", "selcopy", SELCOPY, "lstm", dict(ch=128, layers=2), steps=3000,
                           full_steps=SEED_STEPS, lr=3e-3),
    "selcopy-transformer": Config("selcopy-transformer", "selcopy", SELCOPY, "transformer",
                                  dict(ch=64, layers=4, heads=8), steps=3000, full_steps=SEED_STEPS, lr=1e-3),
    # seed 001: 5 items, 3 swaps, 12 layers with dilations; full run 1M samples
    "vselcopy-conv12": Config("vselcopy-conv12", "vselcopy", dict(num_items=5, num_ops=3, ops="swap"), "conv",
                              dict(ch=64, layers=12, ks=9, dilation=[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 1]),
                              steps=3000, full_steps=SEED_STEPS, lr=2e-3),
    "vselcopy-conv12-attn": Config("vselcopy-conv12-attn", "vselcopy", dict(num_items=5, num_ops=3, ops="swap"), "conv",
                                   dict(ch=64, layers=12, ks=9, dilation=[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 1],
                                        attn_layers=[11], attn="KV"), steps=3000, full_steps=SEED_STEPS, lr=2e-3),
    "vselcopy-mamba": Config("vselcopy-mamba", "vselcopy", dict(num_items=5, num_ops=3, ops="swap"), "mamba",
                             dict(ch=64, layers=2, d_state=16), steps=3000, full_steps=SEED_STEPS, lr=1e-2, batch_size=32),
    # seed 004: Pig Latin, word-level accuracy
    "piglatin-transformer": Config("piglatin-transformer", "piglatin", {}, "transformer", dict(ch=64, layers=4, heads=8),
                                   steps=3000, full_steps=40_000, lr=1e-3),
    "piglatin-mamba": Config("piglatin-mamba", "piglatin", {}, "mamba", dict(ch=64, layers=2, d_state=16), steps=3000,
                             full_steps=40_000, lr=1e-2, batch_size=32),
}


def lr_at(step, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


@torch.no_grad()
def evaluate(model, data, batch_size=500):
    model.eval()
    loss_sum = tokens = wrong_chars = mask_chars = wrong_samples = 0
    for i in range(0, len(data.val), batch_size):
        inputs, targets, mask = encode(data.val[i:i + batch_size])
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        wrong = (logits.argmax(-1) != targets) & mask
        wrong_chars += wrong.sum().item()
        mask_chars += mask.sum().item()
        wrong_samples += wrong.any(-1).sum().item()
    model.train()
    n = len(data.val)
    return dict(val_loss=loss_sum / tokens, mask_error=100 * wrong_chars / mask_chars, sample_error=100 * wrong_samples / n)


def validate_config(cfg: Config) -> None:
    """ValueError naming the config and the field, for every value train() would trip over."""
    def check(cond, msg):
        if not cond:
            raise ValueError(f"config {cfg.name!r}: {msg}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    check(isinstance(cfg.name, str) and cfg.name.strip() != "", f"name must be a non-empty string, got {cfg.name!r}")
    check(cfg.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    check(cfg.model in MODELS, f"model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    for key in ("task_args", "val_task_args", "model_args"):
        check(isinstance(getattr(cfg, key), dict), f"{key} must be a dict, got {getattr(cfg, key)!r}")
    for key in ("steps", "batch_size", "eval_every", "num_val"):
        v = getattr(cfg, key)
        check(is_int(v) and v >= 1, f"{key} must be an integer >= 1, got {v!r}")
    for key in ("full_steps", "warmup"):
        v = getattr(cfg, key)
        check(is_int(v) and v >= 0, f"{key} must be an integer >= 0, got {v!r}")
    check(is_int(cfg.seed), f"seed must be an integer, got {cfg.seed!r}")
    check(is_real(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr!r}")
    check(is_real(cfg.weight_decay) and cfg.weight_decay >= 0,
          f"weight_decay must be a finite number >= 0, got {cfg.weight_decay!r}")


def prepare_run(cfg: Config) -> tuple[Task, Dataset, torch.nn.Module]:
    """Everything a run needs, checked before any training or output: the config, the task and whether
    its sample space holds the validation set, and the model (built and run once on two samples)."""
    validate_config(cfg)
    try:
        task = TASKS[cfg.task](**cfg.task_args)
        val_task = TASKS[cfg.task](**{**cfg.task_args, **cfg.val_task_args}) if cfg.val_task_args else None
        data = Dataset(task, cfg.num_val, cfg.seed, val_task)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {cfg.name!r}: task {cfg.task!r} with task_args {cfg.task_args} and val_task_args "
                         f"{cfg.val_task_args}: {e}") from None
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, **cfg.model_args)
        with torch.no_grad():
            model(encode(data.val[:2])[0])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"config {cfg.name!r}: model {cfg.model!r} with model_args {cfg.model_args}: {e}") from None
    return task, data, model


def train(cfg: Config, progress: bool = True, prepared=None, on_eval=None) -> dict:
    """Train and evaluate one config. The result's "status" is "completed", "diverged" (a non-finite
    training loss stops the run) or "interrupted" (Ctrl-C / SIGTERM); on_eval(result) is called after
    every evaluation with the result so far (status "running")."""
    from tqdm import tqdm
    task, data, model = prepared or prepare_run(cfg)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve = []
    described = task.describe()
    if cfg.val_task_args:  # the validation task's settings that differ, as the seed's "val-nops" column
        val_described = TASKS[cfg.task](**{**cfg.task_args, **cfg.val_task_args}).describe()
        described.update({f"val-{k}": v for k, v in val_described.items() if v != described.get(k)})
    result = dict(config=asdict(cfg), task=described, params=params, status="running", steps_done=0, curve=curve)
    t0 = time.perf_counter()

    def update(status):
        seconds = time.perf_counter() - t0  # includes the evaluations, as the seeds' train times do
        final = curve[-1] if curve else {}
        result.update(status=status, train_minutes=seconds / 60,
                      throughput=result["steps_done"] * cfg.batch_size / max(seconds, 1e-9),
                      **{k: final.get(k) for k in ("val_loss", "mask_error", "sample_error")})

    bar = tqdm(range(cfg.steps), desc=cfg.name, disable=not progress, mininterval=2)
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            inputs, targets, _ = encode(data.train_samples(cfg.batch_size))
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            if not math.isfinite(loss.item()):
                result["diverged_at_step"] = step + 1
                print(f"{cfg.name}: training loss is {loss.item()} at step {step + 1}: diverged, stopping this run")
                update("diverged")
                return result
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result["steps_done"] = step + 1
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                m = evaluate(model, data)
                curve.append(dict(step=step + 1, train_loss=loss.item(), **m))
                bar.set_postfix(loss=f"{loss.item():.4f}", mask_err=f"{m['mask_error']:.2f}%",
                                sample_err=f"{m['sample_error']:.2f}%")
                update("running")
                if on_eval is not None:
                    on_eval(result)
    except KeyboardInterrupt:
        update("interrupted")
        return result
    update("completed")
    return result


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: list[dict]) -> str:
    """Columns as in the seeds' tables: task settings, model settings, metrics, size, time, throughput."""
    task_keys = sorted({k for r in results for k in r["task"]})
    model_keys = ["layers", "ch", "ks", "d_state", "attn"]
    head = (["name", *task_keys, "model", "l", "ch", "ks", "d_state", "attn", "validation loss", "validation_mask_error%",
             "validation_sample_error%", "model params", "train time (minutes)", "throughput"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ma = r["config"]["model_args"]
        name = r["config"]["name"] + ("" if r["status"] == "completed" else f" ({r['status']} at step {r['steps_done']})")
        row = [name, *[str(r["task"].get(k, "")) for k in task_keys], r["config"]["model"],
               *[str(ma.get(k, "")) for k in model_keys], fmt(r["val_loss"], ".6g"), fmt(r["mask_error"], ".4f"),
               fmt(r["sample_error"], ".4f"), f"{r['params']:,}", f"{r['train_minutes']:.2f}", f"{r['throughput']:,.0f}/s"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        for ax, key in zip(axes, ("mask_error", "sample_error")):
            ax.plot(steps, [max(c[key], 1e-3) for c in r["curve"]], marker=".", label=r["config"]["name"])
    for ax, key in zip(axes, ("validation mask error % (0 drawn at 1e-3)", "validation sample error % (0 drawn at 1e-3)")):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if any(r["curve"] for r in results):
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Temporary file, fsync, rename: a crash or a full disk never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_run_dir(parent: Path, names: str) -> Path:
    """A fresh folder <time>_<names>[_N]; mkdir is atomic, so two runs started together never share one."""
    stem = time.strftime("%Y%m%d-%H%M%S") + "_" + re.sub(r"[^A-Za-z0-9._+-]", "_", names)[:80]
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = parent / (stem if i == 1 else f"{stem}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"999 run folders named {stem}* already exist in {parent}")


def load_config(path: str) -> list[Config]:
    import yaml
    try:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SystemExit(f"cannot read config {path}: {e}") from None
    raw = raw if isinstance(raw, list) else [raw]
    known = set(Config.__dataclass_fields__)
    for r in raw:
        if not isinstance(r, dict):
            raise SystemExit(f"{path}: each config must be a mapping of keys to values, got {r!r}")
        unknown = set(r) - known
        if unknown:
            raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return [Config(**r) for r in raw]


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"ch\": 32}}', got {text!r}")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="*", default=[], help="preset names (see --list)")
    ap.add_argument("--config", help="YAML or JSON file: one config or a list")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--full", action="store_true", help="the seeds' full step counts (hours on a CPU; for GPUs)")
    ap.add_argument("--out", default=str(REPO / "runs" / "seqtasks"))
    ap.add_argument("--no_progress", action="store_true")
    for f in ("task", "model", "name"):
        ap.add_argument(f"--{f}")
    for f in ("steps", "batch_size", "eval_every", "num_val", "seed", "warmup"):
        ap.add_argument(f"--{f}", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--task_args", type=json_dict, help="JSON dict")
    ap.add_argument("--model_args", type=json_dict, help="JSON dict")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in PRESETS.items():
            print(f"{name:24s} task={c.task} {c.task_args} model={c.model} {c.model_args} steps={c.steps} (full {c.full_steps})")
        return []
    unknown = [p for p in args.preset if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; see --list")
    configs = [PRESETS[p] for p in args.preset] + (load_config(args.config) if args.config else [])
    if not configs:
        if not (args.task and args.model):
            raise SystemExit("give --preset, --config, or --task and --model")
        configs = [Config(name=f"{args.task}-{args.model}", task=args.task, model=args.model)]
    overrides = {k: getattr(args, k) for k in ("task", "model", "name", "steps", "batch_size", "eval_every", "num_val",
                                               "seed", "warmup", "lr", "task_args", "model_args")
                 if getattr(args, k) is not None}
    configs = [Config(**{**asdict(c), **overrides}) for c in configs]
    if args.full:
        configs = [Config(**{**asdict(c), "steps": c.full_steps or c.steps,
                             "eval_every": max(c.eval_every, (c.full_steps or c.steps) // 50)}) for c in configs]
    try:  # every config is checked, and its task and model built, before a folder is created
        prepared = [prepare_run(c) for c in configs]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    out = new_run_dir(Path(args.out), "+".join(c.name for c in configs))
    results = []

    def save(current=None):
        write_atomic(out / "results.json", json.dumps(results + ([current] if current else []), indent=1))

    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        for c, p in zip(configs, prepared):
            results.append(train(c, progress=not args.no_progress, prepared=p, on_eval=save))
            save()
            if results[-1]["status"] == "interrupted":
                print(f"interrupted: results so far kept in {out}")
                break
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    table = markdown(results)
    write_atomic(out / "results.md", table + "\n")
    plot(results, out / "curves.png")
    print(table)
    print(f"\nwrote {out}/results.json, results.md, curves.png")
    return results


def raise_keyboard_interrupt(signum, frame):
    """SIGTERM ends a run as Ctrl-C does: what was measured is written, marked interrupted."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    if any(r["status"] != "completed" for r in main()):
        raise SystemExit(1)  # interrupted or diverged: the outputs are written, but a run did not complete
