"""tools/gpu_check.py: the dry run exercises every stage on the CPU and writes the record; budgets cut
stages; tools/gpu_results.py renders the latest record (or says there is none); tools/prepare_gpu.py's
corpus copy keeps valid shards."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.shards import read_shard, write_shard
from tools import gpu_check, gpu_results, prepare_gpu

REPO_DIR = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_stage_and_reports_a_cut_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out_root", str(tmp_path),
                          "--variants", "none,cross", "--budget", "bench=1"],
                         cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (record,) = tmp_path.iterdir()
    stages = ["env", "compile", "cuda_tests", "bench", "train"]
    files = {p.name for p in record.iterdir()}
    assert files == {"console.log", "summary.md", *(f"{s}.json" for s in stages)}
    assert len(files) <= 8  # what a device call can return through $OUT
    res = {s: json.loads((record / f"{s}.json").read_text()) for s in stages}
    assert res["env"]["torch"] and res["env"]["dry_run"] is True
    assert res["compile"]["status"] == "passed" and res["compile"]["configurations"] >= 1
    assert res["cuda_tests"]["status"] == "passed"
    assert [r["rc"] for r in res["cuda_tests"]["runs"]] == [0, 0]  # -m cuda (skips on CPU), interpreter smoke
    assert res["bench"]["status"] == "cut" and res["bench"]["stage_seconds"] < 15
    train = {r["variant"]: r for r in res["train"]["runs"]}
    assert res["train"]["status"] == "passed" and set(train) == {"none", "cross"}
    assert train["none"]["ratio_to_baseline"] == 1.0 and train["cross"]["median_step_ms"] > 0
    assert all(r["steps"] == 2 for r in train.values())
    summary = (record / "summary.md").read_text()
    assert "| bench | cut |" in summary and "| train | passed |" in summary and "Dry run" in summary
    assert "stages cut: bench" in (record / "console.log").read_text()


def test_a_stage_over_its_budget_is_killed(tmp_path):
    console = gpu_check.Console(tmp_path / "console.log")
    run = gpu_check.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                timeout=2, console=console, env=dict(os.environ))
    assert run["cut"] and run["rc"] is None and run["seconds"] < 15
    assert gpu_check.status_of(run) == "cut" and run["lines"][0][1] == "started"


def test_record_folders_are_never_reused(tmp_path):
    first = gpu_check.new_run_dir(tmp_path, "NVIDIA H200")
    second = gpu_check.new_run_dir(tmp_path, "NVIDIA H200")
    assert first != second and first.name.endswith("_nvidia-h200") and first.is_dir() and second.is_dir()


def test_results_render_the_latest_record_or_say_there_is_none(tmp_path):
    assert gpu_results.render(tmp_path) == gpu_results.NO_RESULTS + "\n"
    for name, device in (("20261201-100000_nvidia-h100", "H100"), ("20261202-100000_nvidia-h200", "H200"),
                         ("20261203-100000_dryrun-cpu", "dry")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.md").write_text(f"# GPU check {device}\n\n## Training\n\n| a |\n")
    text = gpu_results.render(tmp_path, heading_level=3)
    assert "### GPU check H200" in text and "#### Training" in text and "20261202-100000_nvidia-h200" in text
    assert "H100" not in text and "dry" not in text.split("\n", 1)[1]


def test_prepare_copies_the_corpus_and_keeps_a_valid_prefix_when_short_of_room(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50257, 5000, dtype=np.uint16), rng.integers(0, 50257, 300, dtype=np.uint16)
    write_shard(src / "c_train_000000.bin", train)
    write_shard(src / "c_val_000000.bin", val)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.glob("*.bin")}
    (src / "SHA256SUMS").write_text("".join(f"{h}  corpus/{n}\n" for n, h in sums.items()))
    room = (src / "c_val_000000.bin").stat().st_size + 1024 + 2 * 1000  # val whole, 1000 train tokens
    info = prepare_gpu.copy_corpus(src, tmp_path / "out", room)
    assert info["c_val_000000.bin"]["whole"] and not info["c_train_000000.bin"]["whole"]
    np.testing.assert_array_equal(read_shard(tmp_path / "out" / "c_val_000000.bin"), val)
    np.testing.assert_array_equal(read_shard(tmp_path / "out" / "c_train_000000.bin"), train[:1000])
    (src / "c_val_000000.bin").write_bytes((src / "c_val_000000.bin").read_bytes()[:-2] + b"\0\0")
    with pytest.raises(SystemExit, match="checksum"):
        prepare_gpu.copy_corpus(src, tmp_path / "out2", room)
