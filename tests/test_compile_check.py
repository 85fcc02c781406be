"""kernels.compile_check: the package's kernels compile for sm_90 without spills or shared-memory overruns,
and the checker itself catches each kind of problem (on toy kernels written here)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels.compile_check import collect, discover_modules

REPO_DIR = Path(__file__).resolve().parent.parent

TOY_KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2, mask=m)


    @triton.jit
    def deep_pipeline_dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


    @triton.jit
    def normalize_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(y_ptr + offs, x / tl.sum(x * x, axis=0))  # x stays live across the reduction


    def compile_specs():
        specs = [dict(name=f"double[{t[1:]}]", fn=double_kernel,
                      signature={"x_ptr": t, "y_ptr": t, "n": "i32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024},
                      num_warps=4, num_stages=1, divisible_by_16=["x_ptr", "y_ptr", "n"]) for t in ("*fp32", "*bf16")]
        # 4 stages of two 128 x 128 fp32 tiles: 512 KiB of shared memory
        specs.append(dict(name="too_much_shared", fn=deep_pipeline_dot_kernel,
                          signature={"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "K": "i32",
                                     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
                          constexprs={"BM": 128, "BN": 128, "BK": 128}, num_warps=8, num_stages=4,
                          divisible_by_16=["a_ptr", "b_ptr", "c_ptr", "K"]))
        # one warp holding 8192 live floats: 256 per thread, more than the 255 registers a thread may have
        specs.append(dict(name="spills", fn=normalize_kernel,
                          signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                          constexprs={"BLOCK": 8192}, num_warps=1, num_stages=1, divisible_by_16=[]))
        return specs
''')


def run_check(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "kernels.compile_check", "--jobs", "2", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_DIR)


def test_package_kernels_compile_for_hopper(tmp_path):
    """Every configuration every kernel module exposes compiles for sm_90 without spills and within the
    shared memory of one block: the full set (about 30 s on 2 cores; --quick once missed a spill that only
    one chunk size's configuration had)."""
    out = run_check("--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and not report["problems"]
    assert report["modules_compiled"] == discover_modules() and len(report["modules"]) >= 2
    dtypes = {r["dtype"] for r in report["results"]}
    assert {"bf16", "fp32"} <= dtypes, dtypes
    assert all(r["registers"] > 0 and r["spill_store_bytes"] == 0 for r in report["results"])


def test_checker_fails_on_spills_and_shared_memory(tmp_path):
    toy = tmp_path / "toy_kernels.py"
    toy.write_text(TOY_KERNELS)
    out = run_check("--module", str(toy), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    results = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert results["double[fp32]"]["ok"] and results["double[bf16]"]["ok"], results
    assert results["double[fp32]"]["shared_bytes"] <= 232_448 and results["double[fp32]"]["spill_store_bytes"] == 0
    bad_smem = results["too_much_shared"]
    assert not bad_smem["ok"] and bad_smem["shared_bytes"] > 232_448 and "shared memory" in bad_smem["error"]
    spills = results["spills"]
    assert not spills["ok"] and spills["spill_store_bytes"] > 0 and "spills" in spills["error"]
    # the good kernels alone pass
    assert run_check("--module", str(toy), "--filter", "double").returncode == 0


@pytest.mark.parametrize("body,problem", [
    ("X = 1\n", "no compile_specs"),
    (TOY_KERNELS.replace('"n": "i32", ', ""), "signature must name exactly"),
    (TOY_KERNELS.replace('constexprs={"BLOCK": 1024}', "constexprs={}"), "constexprs must give a value"),
    (TOY_KERNELS.replace('divisible_by_16=["x_ptr", "y_ptr", "n"]', 'divisible_by_16=["BLOCK"]'), "divisible_by_16"),
], ids=["missing", "signature", "constexprs", "divisible"])
def test_modules_breaking_the_contract_are_problems(tmp_path, body, problem):
    mod = tmp_path / "mod.py"
    mod.write_text(body)
    jobs, problems = collect([str(mod)], allow_missing=False, name_filter=None, quick=False)
    assert any(problem in p["problem"] and not p.get("warning") for p in problems), problems
    if problem != "no compile_specs":  # the broken double_kernel specs are left out, the others still compile
        assert {name for _, _, name in jobs} == {"too_much_shared", "spills"}


def test_a_module_without_specs_fails_the_run_unless_allowed(tmp_path):
    mod = tmp_path / "mod.py"
    mod.write_text("X = 1\n")
    out = run_check("--module", str(mod))
    assert out.returncode == 1 and "FAILED" in out.stdout and "no compile_specs" in out.stdout, out.stdout + out.stderr
    assert run_check("--module", str(mod), "--allow_missing").returncode == 0
