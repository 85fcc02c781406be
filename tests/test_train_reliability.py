"""train_gpt.py's reliability: every flag checked up front, no record folder before the flags and the data
are checked, a data check of every shard before the first step, the divergence guard, atomic records,
interrupted runs that keep what they measured, --runs, and the GPU-only guards (checked without a GPU)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from data.shards import HEADER_BYTES, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny and identical on every machine: dense SDPA masks, no compile, fp32 (a CUDA box would otherwise pick
# compiled FlexAttention, bf16 and the FP8 head).
TINY = dict(preset="cpu", model_dim=32, num_heads=2, head_dim=16, block_size=32, train_seq_len=128,
            val_seq_len=128, batch_slices=2, val_tokens=256, num_iterations=6, val_loss_every=3,
            window_max_tokens=64, seed=0, attention="sdpa", compile="off", fp8_head="off", dtype="float32")


def argv(records, **kw):
    return [f"--{k}={v}" for k, v in {**TINY, "records_dir": records, **kw}.items()]


def records_in(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/summary.json"))]


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("flag,value", [
    ("val_tokens", -256), ("val_tokens", 0), ("batch_slices", 0), ("train_seq_len", 0), ("val_seq_len", -128),
    ("block_size", 0), ("model_dim", 0), ("cooldown_frac", 1.5), ("warmup_steps", -1), ("loss_chunk", -1),
    ("window_max_tokens", 0), ("num_iterations", 0), ("muon_momentum_end", 1.5), ("runs", 0),
    ("head_lr", float("nan")), ("seed", -2), ("vocab_size", 70000), ("chars_per_token", 0),
])
def test_bad_flag_named_with_its_range_and_no_folder_created(tmp_path, flag, value):
    records = tmp_path / "records"
    with pytest.raises(SystemExit, match=f"--{flag} must"):
        tg.main(argv(records, **{flag: value}))
    assert not records.exists()


@pytest.mark.parametrize("extra,message", [
    (dict(val_tokens=200), "--val_tokens \\(200\\) must be a multiple of --val_seq_len"),
    (dict(no_attn_layers="7,x"), "--no_attn_layers must be comma-separated layer indices"),
    (dict(mot="cross", char_heads=0), "--char_heads must be in \\[1"),
    (dict(mot="cross", char_dim=30, cross_heads=4), "--char_dim \\(30\\) must be divisible"),
    (dict(run_name=" "), "--run_name must not be empty"),
    (dict(attention="flash"), "--attention must be one of auto, flex, sdpa"),
])
def test_inconsistent_flags_rejected(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        tg.main(argv(tmp_path / "records", **extra))
    assert not (tmp_path / "records").exists()


def test_flag_without_value_does_not_swallow_the_next_flag():
    with pytest.raises(SystemExit, match="--run_name needs a value .*'--num_iterations=5' is a flag"):
        tg.parse_args(["--run_name", "--num_iterations=5"], cuda=False)
    with pytest.raises(SystemExit, match="--seed needs a value"):
        tg.parse_args(["--seed"], cuda=False)
    assert tg.parse_args(["--run_name", "x", "--seed", "-1"], cuda=False).run_name == "x"


def test_gpu_only_guards():
    a = tg.parse_args([], cuda=True)  # speedrun preset
    s = tg.resolve_settings(a, "cuda", hopper=True, world_size=8)
    assert (s.use_flex, s.use_compile, s.use_fp8, s.act_dtype, s.grad_accum) == (True, True, True, torch.bfloat16, 1)
    assert tg.resolve_settings(a, "cuda", hopper=False, world_size=1).grad_accum == 8
    with pytest.raises(SystemExit, match="--compile=off with --attention=flex on CUDA"):
        tg.resolve_settings(tg.parse_args(["--compile=off"], cuda=True), "cuda", True, 1)
    with pytest.raises(SystemExit, match="--block_size=32 with --attention=flex on CUDA"):
        tg.resolve_settings(tg.parse_args(["--block_size=32"], cuda=True), "cuda", True, 1)
    with pytest.raises(SystemExit, match="world size 3 must divide --batch_slices=8"):
        tg.resolve_settings(a, "cuda", True, 3)
    with pytest.raises(SystemExit, match="--attention=sdpa builds dense"):
        tg.resolve_settings(tg.parse_args(["--attention=sdpa"], cuda=True), "cuda", True, 1)


def test_sdpa_batches_above_the_grid_limit_are_split(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 2, 1, 8), torch.randn(20, 2, 12, 8), torch.randn(20, 2, 12, 8)
    mask = torch.rand(20, 1, 1, 12) > 0.3
    mask[..., 0] = True
    whole = tg.batched_sdpa(q, k, v, mask)
    monkeypatch.setattr(tg, "SDPA_MAX_BATCH", 7)  # 20 = 7 + 7 + 6
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(tg.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].size(0)) or real(*a, **kw))
    # same maths per token; the CPU kernel may block a smaller batch differently (last-bit fp32 rounding)
    torch.testing.assert_close(tg.batched_sdpa(q, k, v, mask), whole, rtol=1e-6, atol=1e-6)
    assert calls == [7, 7, 6]


# ---------------------------------------------------------------- data

def shard_pair(tmp_path, n_train=2, tokens=2000):
    rng = np.random.default_rng(0)
    for i in range(n_train):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", rng.integers(0, 50000, tokens))
    write_shard(tmp_path / "t_val_000000.bin", rng.integers(0, 50000, tokens))
    return dict(train_files=str(tmp_path / "t_train_*.bin"), val_files=str(tmp_path / "t_val_*.bin"))


@pytest.mark.parametrize("defect", ["truncated second train shard", "val shard not a shard", "val too short",
                                    "missing fineweb"])
def test_data_defects_reported_before_anything_is_built(tmp_path, defect):
    files = shard_pair(tmp_path)
    extra = {}
    if defect == "truncated second train shard":
        path = tmp_path / "t_train_000001.bin"
        os.truncate(path, HEADER_BYTES + 100)
        expected = "t_train_000001.bin header says 2000 tokens"
    elif defect == "val shard not a shard":
        (tmp_path / "t_val_000000.bin").write_bytes(b"x" * 5000)
        expected = "t_val_000000.bin has magic"
    elif defect == "val too short":
        extra = dict(val_tokens=128 * 20)
        expected = "val data .* holds 15 batches of 128 tokens, --val_tokens=2560 needs 20"
    else:
        files = dict(train_files=str(tmp_path / "fineweb10B/fineweb_train_*.bin"), val_files=files["val_files"])
        expected = "no shard files match .*fineweb.*python data/cached_fineweb10B.py 8"
    records = tmp_path / "records"
    with pytest.raises(SystemExit, match=f"data check failed before training: .*{expected}"):
        tg.main(argv(records, **files, **extra))
    assert not records.exists()


# ---------------------------------------------------------------- divergence, records, interruption

def poison_loss(monkeypatch, after_train_calls=None, in_eval=False):
    """Make the model's loss NaN after some training micro-steps, or at evaluation."""
    real = tg.GPT.forward
    calls = [0]

    def forward(self, *args, **kw):
        loss = real(self, *args, **kw)
        if self.training:
            calls[0] += 1
        poisoned = (not self.training) if in_eval else (self.training and calls[0] > after_train_calls)
        return loss * float("nan") if poisoned else loss
    monkeypatch.setattr(tg.GPT, "forward", forward)


def test_nan_train_loss_stops_the_run_and_the_record_says_diverged(tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, after_train_calls=4)  # grad_accum 2: step 3's loss is the first NaN
    summary = tg.main(argv(tmp_path, num_iterations=50))
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 3
    assert "DIVERGED: train loss is nan at step 3" in capsys.readouterr().out
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "diverged" and rec["diverged_at_step"] == 3 and rec["final_val_loss"] is None
    assert len(rec["train_loss"]) == 3 and np.isnan(rec["train_loss"][-1]) and len(rec["step_ms"]) == 3
    assert [v["step"] for v in rec["val"]] == []  # stopped before the validation at step 3


def test_nan_val_loss_stops_the_run(tmp_path, monkeypatch):
    poison_loss(monkeypatch, in_eval=True)
    summary = tg.main(argv(tmp_path))
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 3
    (rec,) = records_in(tmp_path)
    assert rec["final_val_loss"] is None and len(rec["train_loss"]) == 3 and np.isnan(rec["val"][0]["val_loss"])


def test_records_are_written_atomically(tmp_path):
    path = tmp_path / "summary.json"
    tg.write_json_atomic(path, dict(a=1))
    with pytest.raises(TypeError):
        tg.write_json_atomic(path, dict(a=object()))  # fails half-way through the dump
    assert json.loads(path.read_text()) == dict(a=1)  # the previous record is intact
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_writes_what_it_measured(tmp_path, monkeypatch, sig):
    real = tg.GPT.forward
    calls = [0]

    def forward(self, *args, **kw):  # the signal arrives during step 4's first micro-step
        calls[0] += self.training
        if calls[0] == 7:
            os.kill(os.getpid(), sig)
        return real(self, *args, **kw)
    monkeypatch.setattr(tg.GPT, "forward", forward)
    summary = tg.main(argv(tmp_path, num_iterations=50, val_loss_every=2))
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted by {sig.name}"
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "interrupted" and rec["interrupted_at_step"] == 3 and rec["final_val_loss"] is None
    assert len(rec["train_loss"]) == 3 and len(rec["step_ms"]) == 3 and [v["step"] for v in rec["val"]] == [2]
    assert signal.getsignal(sig) is not tg.raise_interrupted  # the previous handler is back


def test_interrupted_process_exits_130_with_its_record(tmp_path):
    """A real signal to a real process (what a scheduler's SIGTERM does)."""
    cmd = [sys.executable, "train_gpt.py", *argv(tmp_path, num_iterations=500, val_loss_every=0)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step:2/500 train_loss"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted by SIGTERM" in rest
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "interrupted" and rec["interrupted_at_step"] >= 2 and len(rec["train_loss"]) >= 2


def test_runs_trains_several_seeds_then_reports_statistics(tmp_path, capsys):
    summary = tg.main(argv(tmp_path, runs=2, num_iterations=3, val_loss_every=0, target_loss=20.0))
    recs = records_in(tmp_path)
    assert sorted(r["hyperparameters"]["seed"] for r in recs) == [0, 1] and summary["hyperparameters"]["seed"] == 1
    assert all(r["status"] == "completed" for r in recs)
    losses = [r["final_val_loss"] for r in recs]
    assert losses[0] != losses[1]  # different seeds, different runs
    out = capsys.readouterr().out
    assert "2 runs of 'baseline', seeds [0, 1]" in out
    assert f"| baseline | 2 | {np.mean(losses):.4f}" in out  # mean over the two runs, as summarize.py prints
