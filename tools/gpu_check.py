"""One command that checks and measures everything on a CUDA GPU, offline, in under 9 minutes, and records it.

    python tools/prepare_gpu.py                     # once, on a machine with network: fills .carry/
    python tools/gpu_check.py                       # on the GPU machine (no network needed)
    python tools/gpu_check.py --dry-run             # every stage on the CPU at tiny sizes (what the tests run)

Stages, each a subprocess with its own time budget (the whole call stays under --total seconds; a stage
that runs out is killed and reported as cut, the next one starts):
  env           device, driver, Python/torch/Triton/numpy versions, git commit; peers from .carry/wheels
                installed offline (pip --no-index) into a temporary folder when they do not import
  compile       python -m kernels.compile_check: every kernel configuration for the device's architecture,
                registers, spills, shared memory
  cuda_tests    the CUDA tests (pytest -m cuda: every test skipped without a GPU), repeated to catch races
  bench         python -m kernels.bench --preset gpu, with mamba_ssm's Triton SSD from .carry/mamba_ssm
  train         train_gpt.py --preset=speedrun on the carried corpus, one GPU with the 8-GPU batch by
                gradient accumulation: the baseline and every MoT variant; ms/step, ratio to the baseline,
                peak memory, warm-up (compile) time
  suite         the whole test suite once (GPU only; the dry run is itself part of the suite)

Writes a new folder records/gpu/<date>-<time>_<device>/ (never overwrites; --out_root picks the parent): one JSON
per stage, summary.md (the tables) and console.log; at most 8 files, so that a device call can return it
whole through $OUT. --dry-run writes under a temporary folder unless --out_root is given.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))  # the project's packages (kernels, seqtasks) when run as a script
CARRY_DIR = REPO_DIR / ".carry"
MOT_VARIANTS = ("none", "cross", "cross+attn", "cross+mamba", "cross+mamba2")
STAGES = ("env", "compile", "cuda_tests", "bench", "train", "suite")
# seconds per stage; the sum stays under the 9 minutes a lent GPU call may take (plus the start-up)
GPU_BUDGETS = dict(env=20, compile=75, cuda_tests=75, bench=80, train=230, suite=60)
DRY_BUDGETS = dict(env=60, compile=90, cuda_tests=90, bench=60, train=150, suite=0)
KILL_GRACE_S = 5


class Console:
    """Prints and appends to console.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, text: str):
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)

    def line(self, text: str = ""):
        self.write(text + "\n")


def run_command(cmd: list[str], timeout: float, console: Console, env: dict, shown: str | None = None) -> dict:
    """Run cmd, streaming its output; kill its process group after timeout seconds. Returns rc (None when
    cut), seconds, and every output line with the second it appeared (for warm-up times)."""
    console.line(f"$ {shown or ' '.join(cmd)}    [budget {timeout:.0f} s]")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append((round(time.monotonic() - start, 2), line.rstrip("\n")))
            console.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        cut, rc = True, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=KILL_GRACE_S)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        console.line(f"[cut after {timeout:.0f} s]")
    reader.join(timeout=KILL_GRACE_S)
    return dict(cmd=cmd, rc=rc, cut=cut, seconds=round(time.monotonic() - start, 2), lines=lines)


def output_tail(run: dict, n: int = 15) -> list[str]:
    return [text for _, text in run["lines"][-n:]]


class Check:
    """Shared state of one gpu_check call: options, output folder, console, child environment, deadline."""

    def __init__(self, args, out_dir: Path, stages=STAGES, argv=()):
        self.args, self.out_dir, self.stages, self.argv = args, out_dir, list(stages), list(argv)
        self.console = Console(out_dir / "console.log")
        self.start = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
            [str(REPO_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if args.dry_run:  # CPU only, Triton through its interpreter, even on a machine with a GPU
            self.env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        self.results = {}

    def remaining(self) -> float:
        return self.args.total - (time.monotonic() - self.start)

    def run(self, cmd, timeout, env=None, shown=None) -> dict:
        return run_command(cmd, min(timeout, max(self.remaining(), 0)), self.console, env or self.env, shown)

    def path_in_env(self, folder: Path):
        self.env["PYTHONPATH"] = os.pathsep.join([str(folder), self.env["PYTHONPATH"]])


# ----------------------------------------------------------------------------- stages
def stage_env(check: Check, budget: float) -> dict:
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                platform=platform.platform(), cpu_count=os.cpu_count(), dry_run=check.args.dry_run)
    for mod in ("triton", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO_DIR, capture_output=True, text=True).stdout.strip()  # noqa: E731
    info.update(git_commit=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    if not info["git_commit"]:  # a working tree sent without .git: the commit .carry was prepared at
        info["git_commit"] = f"{carry_manifest(check).get('git_commit_at_preparation', 'unknown')} (when .carry was prepared)"
    if torch.cuda.is_available() and not check.args.dry_run:
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    else:
        info["device"] = f"CPU {platform.processor() or platform.machine()} (dry run)"
    info["peers"] = install_peers(check, budget)
    for k, v in info.items():
        check.console.line(f"{k}: {v}")
    return dict(status="passed", **info)


def carry_manifest(check: Check) -> dict:
    path = check.args.carry / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def install_peers(check: Check, budget: float) -> dict:
    """Install the carried wheels whose top-level module does not import, offline, into a temporary folder
    that every later stage gets on PYTHONPATH; put the pruned mamba_ssm copy on PYTHONPATH too."""
    wheels_dir, status = check.args.carry / "wheels", {}
    if not wheels_dir.is_dir():
        return {"note": f"no {wheels_dir}: peers not installed (run tools/prepare_gpu.py on a networked machine)"}
    names = carry_manifest(check).get("import_names", {})
    missing = []
    for whl in sorted(wheels_dir.glob("*.whl")):
        dist = whl.name.split("-")[0].replace("_", "-")
        top = names.get(dist, dist.replace("-", "_")).split(".")[0]
        present = importlib.util.find_spec(top) is not None
        status[dist] = "already importable" if present else "installed from .carry"
        if not present:
            missing.append(str(whl))
    if missing:
        site = check.tmp / "site"
        r = check.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                       "--target", str(site), *missing], budget)
        if r["rc"] != 0:
            return dict(status, error="pip install failed: " + " | ".join(output_tail(r, 5)))
        check.path_in_env(site)
    return status


def stage_compile(check: Check, budget: float) -> dict:
    out = check.tmp / "compile_check.json"
    env = {k: v for k, v in check.env.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.compile_check", "--json", str(out), "--jobs", str(check.args.jobs)]
    if check.args.dry_run:
        cmd += ["--quick", "--max_specs", "2"]
    r = check.run(cmd, budget, env=env)
    report = json.loads(out.read_text()) if out.is_file() else None
    res = dict(status=status_of(r), seconds=r["seconds"], command=" ".join(cmd[1:]))
    if report:
        ok = [x for x in report["results"] if x.get("ok")]
        bad = [p["module"] + ": " + p["problem"] for p in report["problems"] if not p.get("warning")]
        bad += [x["name"] + ": " + str(x.get("error")) for x in report["results"] if not x.get("ok")]
        res["note"] = "; ".join(bad)[:300]
        res.update(configurations=report.get("configurations", len(report["results"])), compiled=len(report["results"]),
                   ok=len(ok), problems=report["problems"],
                   max_registers=max((x.get("registers") or 0 for x in report["results"]), default=None),
                   max_shared_bytes=max((x.get("shared_bytes") or 0 for x in report["results"]), default=None),
                   failed=[dict(name=x["name"], error=x.get("error")) for x in report["results"] if not x.get("ok")],
                   results=report["results"])
    else:
        res["tail"] = output_tail(r)
    return res


def junit_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:20]
    return counts


def pytest_run(check: Check, args: list[str], budget: float, tag: str) -> dict:
    xml = check.tmp / f"{tag}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    r = check.run(cmd, budget)
    return dict(command=" ".join(cmd[3:]).replace(f"--junitxml={xml} ", ""), rc=r["rc"], cut=r["cut"],
                seconds=r["seconds"], counts=junit_counts(xml), tail=output_tail(r, 8) if r["rc"] not in (0, None) else [])


def stage_cuda_tests(check: Check, budget: float) -> dict:
    """The CUDA tests, repeated (fresh random inputs each time) while the budget lasts, up to --repeat runs.
    Dry run: the same selection collects and skips cleanly, then a tiny triton-vs-torch check runs under
    the interpreter."""
    deadline = time.monotonic() + budget
    runs = []
    if check.args.dry_run:
        runs.append(pytest_run(check, ["-m", "cuda", "tests"], budget, "cuda_tests_1"))
        r = check.run([sys.executable, __file__, "--smoke"], deadline - time.monotonic())
        runs.append(dict(command="gpu_check.py --smoke (triton interpreter vs torch)", rc=r["rc"], cut=r["cut"],
                         seconds=r["seconds"], tail=output_tail(r, 4)))
    else:
        for i in range(check.args.repeat):
            left = deadline - time.monotonic()
            if left < 5:
                break
            runs.append(pytest_run(check, ["-m", "cuda", "tests"], left, f"cuda_tests_{i + 1}"))
            if runs[-1]["cut"]:
                break
    cut = any(r["cut"] for r in runs) or (not check.args.dry_run and len(runs) < check.args.repeat)
    failed = any(r["rc"] not in (0, None) for r in runs) or not runs
    note = "; ".join(t for r in runs for t in ((r.get("counts") or {}).get("failed_tests") or []))[:300]
    return dict(status="failed" if failed else "cut" if cut else "passed", repetitions=len(runs), runs=runs,
                note=note)


def stage_suite(check: Check, budget: float) -> dict:
    run = pytest_run(check, ["tests", "--ignore=tests/test_gpu_check.py"], budget, "suite")
    note = "; ".join((run["counts"] or {}).get("failed_tests") or [])[:300]
    return dict(status="cut" if run["cut"] else "passed" if run["rc"] == 0 else "failed", note=note, **run)


BENCH_WRAPPER = """
import runpy, sys
mamba_root, args = sys.argv[1], sys.argv[2:]
if mamba_root:
    sys.path.insert(0, mamba_root)
    try:  # the pruned copy as the real package, so kernels.bench finds it loaded and adds no stubs
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception as e:
        print(f"mamba_ssm's Triton SSD does not import ({type(e).__name__}: {e}); benchmarking without it")
        i = args.index("--mamba_ssm_triton")
        del args[i:i + 2]
sys.argv = ["kernels.bench", *args]
runpy.run_module("kernels.bench", run_name="__main__", alter_sys=True)
"""


def stage_bench(check: Check, budget: float) -> dict:
    out = check.tmp / "bench.json"
    args = ["--preset", "tiny" if check.args.dry_run else "gpu", "--json", str(out)]
    mamba_root = check.args.carry / "mamba_ssm"
    if (mamba_root / "mamba_ssm" / "ops" / "triton").is_dir() and not check.args.dry_run:
        args += ["--mamba_ssm_triton", str(mamba_root / "mamba_ssm" / "ops" / "triton")]
    else:
        mamba_root = ""
    command = "python -m kernels.bench " + " ".join(args).replace(str(check.tmp), "<tmp>")
    r = check.run([sys.executable, "-c", BENCH_WRAPPER, str(mamba_root), *args], budget,
                  shown=command + (f"    (mamba_ssm pre-imported from {mamba_root})" if mamba_root else ""))
    res = dict(status=status_of(r), seconds=r["seconds"], command=command)
    if out.is_file():
        res["rows"] = json.loads(out.read_text())
    if res["status"] != "passed":
        res["tail"] = output_tail(r)
    return res


def train_command(check: Check, variant: str, records: Path) -> list[str]:
    common = [f"--mot={variant}", f"--run_name=gpucheck_{variant}", f"--records_dir={records}", "--val_loss_every=0"]
    if check.args.dry_run:  # the cpu preset, shrunk to seconds per variant, on the demo corpus
        return [*common, "--preset=cpu", "--num_iterations=2", "--warmup_steps=0", "--train_seq_len=128",
                "--val_seq_len=128", "--val_tokens=128", "--batch_slices=1", "--window_max_tokens=128",
                "--model_dim=64", "--num_heads=1"]
    corpus = check.args.carry / "corpus"
    files = []
    if sorted(corpus.glob("*_train_*.bin")) and sorted(corpus.glob("*_val_*.bin")):
        files = [f"--train_files={corpus}/*_train_*.bin", f"--val_files={corpus}/*_val_*.bin"]
    # 64K validation tokens in one 64K sequence: the carried val shard holds 252K
    return [*common, "--preset=speedrun", f"--num_iterations={check.args.train_steps}",
            f"--warmup_steps={check.args.warmup_steps}", "--val_seq_len=65536", "--val_tokens=65536", *files]


def first_line_time(run: dict, pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, text in run["lines"] if rx.search(text)), None)


def stage_train(check: Check, budget: float) -> dict:
    deadline = time.monotonic() + budget
    rows, notes = [], []
    if not check.args.dry_run and not sorted((check.args.carry / "corpus").glob("*_train_*.bin")):
        notes.append(f"no corpus in {check.args.carry / 'corpus'}: trained on the preset's default files")
    for variant in check.args.variants:
        left = deadline - time.monotonic()
        if left < 5:
            rows.append(dict(variant=variant, status="cut", note="not started: stage budget spent"))
            continue
        records = check.tmp / "train" / variant.replace("+", "_")
        cmd = [sys.executable, str(REPO_DIR / "train_gpt.py"), *train_command(check, variant, records)]
        r = check.run(cmd, left)
        row = dict(variant=variant, status=status_of(r), seconds=r["seconds"], command=" ".join(cmd[1:]))
        summaries = sorted(records.glob("*/summary.json"))
        if summaries:
            s = json.loads(summaries[-1].read_text())
            row.update(median_step_ms=s.get("median_step_ms"), steps=len(s.get("step_ms") or []),
                       step_ms=s.get("step_ms"), peak_memory_allocated_mib=s.get("peak_memory_allocated_mib"),
                       peak_memory_reserved_mib=s.get("peak_memory_reserved_mib"),
                       final_val_loss=s.get("final_val_loss"), grad_accum=s.get("grad_accum"),
                       world_size=s.get("world_size"), device=s.get("device"), compile=s.get("compile"),
                       tokens_per_s=s.get("tokens_per_s"),
                       **{k: v for k, v in s.items() if ("compile" in k or "warmup" in k) and isinstance(v, (int, float))
                          and not isinstance(v, bool)})
        # warm-up: from the parameter count line (model built) to the first timed step's line, less that
        # step: torch.compile and the untimed warm-up steps; an upper bound read from output timestamps
        t_built, t_step1 = first_line_time(r, r"^parameters:"), first_line_time(r, r"^step:1/")
        if t_built is not None and t_step1 is not None:
            first_ms = (row.get("step_ms") or [0])[0]
            row["warmup_s_from_log"] = round(max(t_step1 - t_built - first_ms / 1000, 0.0), 1)
        trainer_warmup = [k for k in row if "warmup" in k and k != "warmup_s_from_log"]
        row["warmup_s"] = row[trainer_warmup[0]] if trainer_warmup else row.get("warmup_s_from_log")
        if summaries and s.get("status", "completed") != "completed":
            row.update(status="failed", error=f"trainer status {s.get('status')}: {s.get('error')}")
        if row["status"] != "passed" or not summaries:
            row["tail"] = output_tail(r)
            if row["status"] == "passed":
                row["status"] = "failed"
        rows.append(row)
    base = next((x.get("median_step_ms") for x in rows if x["variant"] == "none"), None)
    for x in rows:
        if base and x.get("median_step_ms"):
            x["ratio_to_baseline"] = round(x["median_step_ms"] / base, 3)
    statuses = {x["status"] for x in rows}
    status = "failed" if "failed" in statuses else "cut" if "cut" in statuses else "passed"
    note = "; ".join(f"{x['variant']} {x['status']}" for x in rows if x["status"] != "passed")
    return dict(status=status, runs=rows, notes=notes, note=note)


def status_of(run: dict) -> str:
    return "cut" if run["cut"] else "passed" if run["rc"] == 0 else "failed"


STAGE_FUNCS = dict(env=stage_env, compile=stage_compile, cuda_tests=stage_cuda_tests, bench=stage_bench,
                   train=stage_train, suite=stage_suite)


# ----------------------------------------------------------------------------- summary
def fmt(v, spec=""):
    if v is None:
        return "-"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def table_cell(text) -> str:
    """Text that keeps a markdown table row intact (errors can hold pipes and newlines)."""
    return re.sub(r"[|\n]+", " ", str(text))


def summary_markdown(check: Check) -> str:
    res, env = check.results, check.results.get("env", {})
    out = [f"# GPU check {check.out_dir.name}", ""]
    if check.args.dry_run:
        out += ["**Dry run** on the CPU at tiny sizes: no number below is a GPU measurement.", ""]
    out += [f"- device: {env.get('device', '-')} (capability {env.get('capability', '-')}, "
            f"{env.get('memory_gib', '-')} GiB), nvidia-smi: {env.get('nvidia_smi', '-')}",
            f"- Python {env.get('python', '-')}, torch {env.get('torch', '-')} (CUDA {env.get('cuda', '-')}), "
            f"Triton {env.get('triton', '-')}, numpy {env.get('numpy', '-')}",
            f"- commit {env.get('git_commit', '-')}{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
            f"command: `{' '.join(['python tools/gpu_check.py'] + check.argv)}`", "",
            "| stage | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name in check.stages:
        r = res.get(name, {})
        out.append(f"| {name} | {r.get('status', 'not run')} | {fmt(r.get('stage_seconds'), '.0f')} | "
                   f"{fmt(r.get('budget_s'), '.0f')} | {table_cell(r.get('note', ''))} |")
    comp = res.get("compile", {})
    if comp.get("configurations") is not None:
        out += ["", f"## Compile check (sm_{env.get('capability', '9.0').replace('.', '')})", "",
                f"{comp['ok']}/{comp['configurations']} configurations compiled without spills and within "
                f"{'' if comp['compiled'] == comp['configurations'] else '(' + str(comp['compiled']) + ' reached before the cut) '}"
                f"232,448 B of shared memory; most registers {comp['max_registers']}, most shared memory "
                f"{comp['max_shared_bytes']} B."]
        out += [f"- FAILED {f['name']}: {f['error']}" for f in comp.get("failed", [])]
        out += [f"- {'WARNING' if p.get('warning') else 'FAILED'} {p['module']}: {p['problem']}"
                for p in comp.get("problems", [])]
    tests = res.get("cuda_tests", {})
    if tests.get("runs"):
        out += ["", "## CUDA tests", "", "| run | status | tests | failures | errors | skipped | seconds |",
                "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(tests["runs"], 1):
            c = r.get("counts") or {}
            st = "cut" if r["cut"] else "passed" if r["rc"] == 0 else "failed"
            out.append(f"| {i}: `{r['command'][:60]}` | {st} | {fmt(c.get('tests'))} | {fmt(c.get('failures'))} | "
                       f"{fmt(c.get('errors'))} | {fmt(c.get('skipped'))} | {r['seconds']:.0f} |")
    bench = res.get("bench", {})
    if bench.get("rows"):
        out += ["", "## Kernel bench", "", f"`{bench['command']}`", "",
                "| op | shape | dtype | impl | fwd ms | fwd+bwd ms | fwd GB/s | fwd % copy BW | peak MiB | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            share = r.get("fwd_copy_share")
            out.append(f"| {r.get('op', '-')} | {r.get('shape', '-')} | {r.get('dtype', '-')} | {r.get('impl', '-')} | "
                       f"{fmt(r.get('fwd_ms'), '.3f')} | {fmt(r.get('fwdbwd_ms'), '.3f')} | {fmt(r.get('fwd_gbs'), '.1f')} | "
                       f"{fmt(None if share is None else 100 * share, '.1f')} | {fmt(r.get('peak_mib'), '.0f')} | "
                       f"{table_cell('skipped: ' + r['skipped']) if r.get('skipped') else ''} |")
    train = res.get("train", {})
    if train.get("runs"):
        out += ["", "## Training (speedrun preset, 1 GPU, 8-GPU batch by accumulation)" if not check.args.dry_run
                else "## Training (cpu preset, shrunk)", "",
                "| MoT variant | status | median ms/step | x baseline | steps | peak MiB allocated | warm-up s | "
                "final val loss |", "|---|---|---|---|---|---|---|---|"]
        for r in train["runs"]:
            out.append(f"| {r['variant']} | {r['status']} | {fmt(r.get('median_step_ms'), '.1f')} | "
                       f"{fmt(r.get('ratio_to_baseline'), '.3f')} | {fmt(r.get('steps'))} | "
                       f"{fmt(r.get('peak_memory_allocated_mib'))} | {fmt(r.get('warmup_s'))} | "
                       f"{fmt(r.get('final_val_loss'), '.4f')} |")
        out += ["", "Warm-up s: torch.compile plus the untimed warm-up steps: the trainer's own figure when its "
                "summary has one, else read from output timestamps (the model's parameter line to the first "
                "step's line, less that step: an upper bound, since on CUDA a step's line prints a step late)."]
        out += [f"- {n}" for n in train.get("notes", [])]
    suite = res.get("suite", {})
    if suite.get("counts"):
        c = suite["counts"]
        out += ["", "## Whole test suite", "", f"{suite['status']}: {c['tests']} tests, {c['failures']} failures, "
                f"{c['errors']} errors, {c['skipped']} skipped in {suite['seconds']:.0f} s"]
        out += [f"- {t}" for t in c.get("failed_tests", [])]
    return "\n".join(out) + "\n"


def write_outputs(check: Check, name: str):
    (check.out_dir / f"{name}.json").write_text(json.dumps(check.results[name], indent=1, default=str))
    (check.out_dir / "summary.md").write_text(summary_markdown(check))


def new_run_dir(root: Path, device: str) -> Path:
    """records/gpu/<date>-<time>_<device>[_N]: never reuses a folder (seqtasks' atomic-mkdir helper)."""
    from seqtasks.run import new_run_dir as fresh_dir
    return fresh_dir(root, re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-"))


# ----------------------------------------------------------------------------- interpreter smoke check
def smoke() -> int:
    """Triton (interpreter on the CPU) against the torch path: both scans at tiny shapes, forward and grads."""
    import torch

    import kernels
    from tools import interpreter_compat
    interpreter_compat.patch()
    torch.manual_seed(0)
    worst = 0.0
    u, dl = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    A, B, C, D = -torch.rand(4, 2) - 0.5, torch.randn(1, 2, 9), torch.randn(1, 2, 9), torch.randn(4)
    x, dt = torch.randn(1, 70, 2, 4), torch.rand(1, 70, 2)
    Ah, Bs, Cs = -torch.rand(2) - 0.5, torch.randn(1, 70, 1, 4), torch.randn(1, 70, 1, 4)
    cases = dict(selective_scan=(lambda t, b: kernels.selective_scan_fn(*t, delta_softplus=True, backend=b),
                                 (u, dl, A, B, C, D)),
                 ssd=(lambda t, b: kernels.mamba_chunk_scan_combined(*t, chunk_size=64, dt_softplus=True, backend=b),
                      (x, dt, Ah, Bs, Cs)))
    for name, (fn, inputs) in cases.items():
        outs = {}
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = fn(leaves, backend)
            (y * torch.cos(torch.arange(y.numel()).reshape(y.shape))).sum().backward()
            outs[backend] = [y.detach()] + [t.grad for t in leaves]
        for a, b in zip(outs["triton"], outs["torch"]):
            worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
        print(f"{name}: triton (interpreter) vs torch, forward and every gradient: worst relative error {worst:.2e}")
    return 0 if worst < 1e-4 else 1  # fp32 both ways, different summation orders: 2e-7 to 2e-5 measured


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                    help="every stage on the CPU at tiny sizes (no GPU needed)")
    ap.add_argument("--out_root", default=None, help="parent of the new folder (default records/gpu; dry run: a temp dir)")
    ap.add_argument("--carry", default=str(CARRY_DIR), help="the folder tools/prepare_gpu.py filled")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage budget")
    ap.add_argument("--total", type=float, default=540.0, help="seconds for the whole call (default 9 minutes)")
    ap.add_argument("--variants", default=",".join(MOT_VARIANTS), help="MoT variants to train (none = baseline)")
    ap.add_argument("--train_steps", type=int, default=20, help="timed speedrun steps per variant")
    ap.add_argument("--warmup_steps", type=int, default=3, help="untimed warm-up steps (compile happens here)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the CUDA tests (fresh random inputs each)")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="compile processes")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke()
    args.carry = Path(args.carry).resolve()
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in MOT_VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(MOT_VARIANTS)}")
    budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    for item in args.budget:
        stage, _, secs = item.partition("=")
        if stage not in STAGES or not secs:
            ap.error(f"--budget wants STAGE=SECONDS with STAGE in {STAGES}, got {item!r}")
        budgets[stage] = float(secs)
    stages = [s for s in (args.stages.split(",") if args.stages else STAGES) if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    if args.dry_run:
        stages = [s for s in stages if s != "suite"]  # the dry run is itself part of the suite
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --dry-run to exercise every stage on the CPU",
              file=sys.stderr)
        return 2
    device = "dryrun-cpu" if args.dry_run else torch.cuda.get_device_name(0)
    root = Path(args.out_root) if args.out_root else (Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run
                                                       else REPO_DIR / "records" / "gpu")
    check = Check(args, new_run_dir(root, device), stages, argv)
    check.console.line(f"gpu_check -> {check.out_dir} (stages {','.join(stages)}; total budget {args.total:.0f} s)")
    try:
        for name in stages:
            budget = min(budgets[name], check.remaining())
            t0 = time.monotonic()
            check.console.line(f"\n=== {name} (budget {budget:.0f} s)")
            if budget < 1:
                res = dict(status="cut", note="not started: the total budget was spent")
            else:
                try:
                    res = STAGE_FUNCS[name](check, budget)
                except Exception as e:  # noqa: BLE001 - a broken stage must not stop the others
                    res = dict(status="failed", note=f"stage failed: {type(e).__name__}: {e}")
            res.setdefault("note", "cut: ran out of its budget" if res["status"] == "cut" else "")
            res.update(budget_s=budget, stage_seconds=round(time.monotonic() - t0, 1))
            check.results[name] = res
            check.console.line(f"=== {name}: {res['status']} in {res['stage_seconds']:.0f} s {res['note']}")
            write_outputs(check, name)
    finally:
        shutil.rmtree(check.tmp, ignore_errors=True)
    cut = [n for n in stages if check.results.get(n, {}).get("status") == "cut"]
    failed = [n for n in stages if check.results.get(n, {}).get("status") == "failed"]
    check.console.line(f"\nstages cut: {', '.join(cut) or 'none'}; failed: {', '.join(failed) or 'none'}")
    check.console.line(f"wrote {check.out_dir} (summary.md, console.log, one JSON per stage)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
