"""Compile every Triton kernel configuration the package can launch, for a GPU architecture, without a GPU.

    python -m kernels.compile_check                    # sm_90 (Hopper); exit 1 on any failure
    python -m kernels.compile_check --quick --json out.json --filter ssd

Triton's interpreter (how the tests run the kernels on a CPU) accepts code the compiler rejects, and says
nothing about registers or shared memory. This lowers every configuration through TTIR -> PTX -> cubin
with the real specialisations and reports, per configuration, the registers, spill bytes and stack frame
(from the ptxas log of that very build) and the shared memory Triton allocated. It fails on a compile
error, on any spill, and on shared memory above what one block may have on an H100/H200.

Contract: every module kernels/**/triton_*.py defines `compile_specs()`, a list of dicts
    {"name": str, "fn": @triton.jit function, "signature": {arg: "*bf16" | "*fp16" | "*fp32" | "*i32" |
     "i32" | "i64" | "fp32" | "constexpr", ...} (every argument of fn), "constexprs": {arg: value},
     "num_warps": int, "num_stages": int, "divisible_by_16": [args specialised as multiples of 16]}
covering every configuration its launchers or autotuners can pick. A module without it is a failure
(--allow_missing makes it a warning). --module checks other modules (dotted names or .py paths) instead.

Must run without TRITON_INTERPRET=1. Compiles run in a pool of processes (--jobs), each with a fresh
temporary Triton cache, so every run really compiles and nothing is written into the repository.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Largest shared memory one block may use on sm_90 (227 KB: cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200)
SHARED_MEMORY_LIMIT = 232_448
SPEC_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "divisible_by_16")


def discover_modules() -> list[str]:
    """Dotted names of every triton_*.py in this package (kernels.* in the repository, mamba_kernels.*
    when installed from the wheel)."""
    package_dir = Path(__file__).resolve().parent
    return sorted(".".join((__package__, *p.relative_to(package_dir).with_suffix("").parts))
                  for p in package_dir.rglob("triton_*.py"))


def load_module(name: str):
    """A dotted module name, or a path to a .py file (imported under a name derived from its path)."""
    if name.endswith(".py"):
        path = Path(name).resolve()
        mod_name = "compile_check_" + re.sub(r"\W", "_", str(path))
        if mod_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        return sys.modules[mod_name]
    return importlib.import_module(name)


def spec_problem(spec) -> str | None:
    """Why a spec does not follow the contract, or None."""
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        return f"spec must be a dict with keys {SPEC_KEYS}"
    args = list(getattr(spec["fn"], "arg_names", []))
    if not args:
        return f"{spec['name']}: fn is not a @triton.jit function"
    sig, const = spec["signature"], spec["constexprs"]
    if set(sig) != set(args):
        return f"{spec['name']}: signature must name exactly the arguments {args}, got {sorted(sig)}"
    wrong = sorted(set(const) ^ {a for a in args if sig[a] == "constexpr"})
    if wrong:
        return f"{spec['name']}: constexprs must give a value for exactly the 'constexpr' arguments; mismatch: {wrong}"
    bad_div = [a for a in spec["divisible_by_16"] if a not in sig or sig[a] == "constexpr"]
    if bad_div:
        return f"{spec['name']}: divisible_by_16 names non-runtime arguments {bad_div}"
    return None


def pointer_dtype(spec) -> str:
    """The first floating-point pointer type: what --quick groups configurations by."""
    return next((t[1:] for t in spec["signature"].values() if t.startswith("*fp") or t.startswith("*bf")), "none")


def collect(modules: list[str], allow_missing: bool, name_filter: str | None, quick: bool):
    """(jobs, problems): one job (module, index, spec name) per spec to compile; problems are failures
    found before compiling (import errors, missing or malformed specs)."""
    jobs, problems = [], []
    for mod_name in modules:
        try:
            module = load_module(mod_name)
        except Exception as e:  # noqa: BLE001 - report every module, then fail
            problems.append(dict(module=mod_name, problem=f"import failed: {type(e).__name__}: {e}"))
            continue
        if not hasattr(module, "compile_specs"):
            problems.append(dict(module=mod_name, problem="no compile_specs", warning=allow_missing))
            continue
        specs = module.compile_specs()
        if not specs:
            problems.append(dict(module=mod_name, problem="compile_specs() is empty"))
        seen = set()
        for i, spec in enumerate(specs):
            why = spec_problem(spec)
            if why:
                problems.append(dict(module=mod_name, problem=why))
                continue
            if name_filter and name_filter not in spec["name"]:
                continue
            group = (spec["fn"].__name__, pointer_dtype(spec))
            if quick and group in seen:
                continue
            seen.add(group)
            jobs.append((mod_name, i, spec["name"]))
    return jobs, problems


def divisibility_attrs(backend, spec) -> dict:
    """Triton's per-argument attributes marking the divisible_by_16 arguments, built the way the installed
    Triton's JIT builds them (3.3+: {(arg index,): backend.parse_attr("D")})."""
    args = list(spec["fn"].arg_names)
    div16 = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    return {(args.index(a),): div16 for a in spec["divisible_by_16"]}


PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers (the most of any function in the log), spill and stack bytes (summed over functions: a
    non-inlined device function reports its own), or None when the log lacks them."""
    out = {}
    for key, rx in PTXAS_RE.items():
        values = [int(v) for v in rx.findall(log)]
        out[key] = (max(values) if key == "registers" else sum(values)) if values else None
    return out


def compile_one(job, arch: int) -> dict:
    """Compile one spec (in a pool worker) and return its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    mod_name, index, name = job
    spec = load_module(mod_name).compile_specs()[index]
    result = dict(module=mod_name, name=name, kernel=spec["fn"].__name__, num_warps=spec["num_warps"],
                  num_stages=spec["num_stages"], dtype=pointer_dtype(spec))
    target = GPUTarget("cuda", arch, 32)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(spec["fn"], dict(spec["signature"]), constexprs=dict(spec["constexprs"]),
                        attrs=divisibility_attrs(make_backend(target), spec))
        # a cache of its own per compile: two specs that lower to the same kernel (a constexpr the kernel
        # ignores) would otherwise hit the cache, skip ptxas and leave no log to read
        with tempfile.TemporaryDirectory(prefix="compile_check_cache_") as cache_dir, \
                contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v log here
            os.environ["TRITON_CACHE_DIR"] = cache_dir
            kernel = triton.compile(src, target=target,
                                    options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as e:  # noqa: BLE001 - report every kernel, then fail
        result.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
        return result
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    result.update(parse_ptxas_log(log.getvalue()))
    result["shared_bytes"] = int(kernel.metadata.shared)
    errors = []
    if "cubin" not in kernel.asm:
        errors.append("no cubin")
    if result["registers"] is None:
        errors.append("no ptxas log (TRITON_DUMP_PTXAS_LOG ignored by this Triton?)")
    if (result["spill_store_bytes"] or 0) + (result["spill_load_bytes"] or 0) > 0:
        errors.append(f"spills {result['spill_store_bytes']} B stores / {result['spill_load_bytes']} B loads")
    if result["shared_bytes"] > SHARED_MEMORY_LIMIT:
        errors.append(f"shared memory {result['shared_bytes']} B > {SHARED_MEMORY_LIMIT} B")
    result.update(ok=not errors, error="; ".join(errors) or None)
    return result


def init_worker():
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's launch-time default; silences 3.9's warning


def run_jobs(jobs, arch: int, workers: int):
    """Yield results as compiles finish, in a spawned process pool (each compile with a fresh Triton cache)."""
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn"),
                             initializer=init_worker) as pool:
        futures = [pool.submit(compile_one, job, arch) for job in jobs]
        for fut, job in zip(futures, jobs):
            try:
                yield fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker fails its job, not the report
                yield dict(module=job[0], name=job[2], ok=False, error=f"worker failed: {type(e).__name__}: {e}")


def fmt(v) -> str:
    return "-" if v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch_pos", nargs="?", type=int, help=argparse.SUPPRESS)  # old form: compile_check 90
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90 (default)")
    ap.add_argument("--json", default=None, help="write every result and the verdict here")
    ap.add_argument("--filter", default=None, help="only specs whose name contains this substring")
    ap.add_argument("--quick", action="store_true", help="one spec per kernel and pointer dtype")
    ap.add_argument("--max_specs", type=int, default=None, help="compile only the first N (a dry run of the tool)")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16), help="compile processes")
    ap.add_argument("--module", action="append", default=None,
                    help="check this module (dotted name or .py path) instead of kernels/**/triton_*.py; repeatable")
    ap.add_argument("--allow_missing", action="store_true", help="a module without compile_specs is a warning")
    args = ap.parse_args(argv)
    arch = args.arch_pos or args.arch
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile (the interpreter replaces @triton.jit functions)", file=sys.stderr)
        return 2
    modules = args.module or discover_modules()
    jobs, problems = collect(modules, args.allow_missing, args.filter, args.quick)
    jobs = jobs[:args.max_specs] if args.max_specs is not None else jobs
    for p in problems:
        print(f"{'WARNING' if p.get('warning') else 'FAILED'} {p['module']}: {p['problem']}", flush=True)
    print(f"compiling {len(jobs)} configurations from {len(modules)} modules for sm_{arch} "
          f"with {args.jobs} processes", flush=True)
    print("| ok | module | spec | warps | stages | registers | spill st/ld B | stack B | shared B | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    results = []

    def save(passed):  # after every result, so a run killed at a time limit leaves what it compiled
        if args.json:
            Path(args.json).write_text(json.dumps(dict(
                arch=arch, shared_memory_limit=SHARED_MEMORY_LIMIT, modules=modules, configurations=len(jobs),
                modules_compiled=sorted({r["module"] for r in results}), problems=problems, results=results,
                passed=passed), indent=1))

    for r in run_jobs(jobs, arch, args.jobs):
        results.append(r)
        save(None)
        short_mod = Path(r["module"]).stem if r["module"].endswith(".py") else r["module"].rsplit(".", 1)[-1]
        spill = f"{fmt(r.get('spill_store_bytes'))}/{fmt(r.get('spill_load_bytes'))}"
        print(f"| {'ok' if r['ok'] else 'FAILED'} | {short_mod} | {r['name']} | {fmt(r.get('num_warps'))} | "
              f"{fmt(r.get('num_stages'))} | {fmt(r.get('registers'))} | {spill} | {fmt(r.get('stack_frame_bytes'))} | "
              f"{fmt(r.get('shared_bytes'))} | {fmt(r.get('compile_s'))} |", flush=True)
        if not r["ok"]:
            print(f"    {r['name']}: {r['error']}", flush=True)
    failed = [r for r in results if not r["ok"]] + [p for p in problems if not p.get("warning")]
    reported = sorted({r["module"] for r in results})
    print(f"\n{len(results) - sum(not r['ok'] for r in results)}/{len(results)} configurations ok, "
          f"{len(problems)} module problems, modules compiled: {', '.join(reported) or 'none'}; "
          f"{time.perf_counter() - t0:.0f} s")
    print("FAILED" if failed else "PASSED")
    save(not failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
