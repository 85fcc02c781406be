"""summarize.py on synthetic record folders: only completed finite runs are ranked; broken records are
skipped with a warning; loss_stats against scipy-independent arithmetic."""
import json
import math

import pytest

from summarize import load_records, loss_stats, main as summarize_main, summarize


def record(run_name, loss, status=None, **extra):
    rec = dict(run_name=run_name, final_val_loss=loss, median_step_ms=100.0, peak_memory_allocated_mib=10,
               tokens_per_s=1000.0, device="cpu (2 cores)",
               val=[dict(step=5, val_loss=9.0, train_time_ms=500.0), dict(step=10, val_loss=loss, train_time_ms=1000.0)])
    if status is not None:
        rec["status"] = status
    rec.update(extra)
    return rec


def write(folder, name, content):
    d = folder / name
    d.mkdir()
    path = d / "summary.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def records_dir(tmp_path):
    for i, loss in enumerate((3.25, 3.26, 3.27)):
        write(tmp_path, f"good{i}", record("good", loss, "completed", diverged_at_step=None))
    write(tmp_path, "old", record("old", 3.5))  # written before "status" existed: a completed run
    write(tmp_path, "nan", record("good", float("nan"), "completed"))  # NaN in the JSON (json.dumps writes NaN)
    write(tmp_path, "div", record("good", None, "diverged", diverged_at_step=10))
    write(tmp_path, "int", record("good", None, "interrupted", interrupted_at_step=7))
    write(tmp_path, "fail", record("good", None, "failed", error="ShardError: shard x.bin is truncated", step_ms=[]))
    write(tmp_path, "neg_only_diverged", record("bad", -0.0, "diverged", diverged_at_step=3))
    write(tmp_path, "garbage", "{not json")
    write(tmp_path, "empty", "")
    write(tmp_path, "list", "[1, 2]")
    write(tmp_path, "no_name", {"final_val_loss": 1.0})
    write(tmp_path, "odd_status", record("good", 1.0, "exploded"))
    write(tmp_path, "wrong_types", record("typed", "3.1", "completed", median_step_ms="fast", val="nope",
                                          peak_memory_allocated_mib=None, device=5))
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    return tmp_path


def test_only_completed_finite_runs_are_ranked(records_dir, capsys):
    records = load_records(records_dir)
    warnings = capsys.readouterr().err
    for bad in ("garbage", "empty", "list", "no_name", "odd_status", "binary"):
        assert f"{bad}" in warnings, bad  # each skipped record is named
    assert "unknown status 'exploded'" in warnings
    rows = {r["run_name"]: r for r in summarize(records, target=3.28)}
    assert set(rows) == {"good", "old"}  # "bad" only diverged, "typed" has a string loss
    assert rows["good"]["n"] == 3 and rows["good"]["mean_loss"] == pytest.approx(3.26)
    assert rows["good"]["p_value"] < 0.05
    assert rows["old"]["n"] == 1 and math.isnan(rows["old"]["p_value"])


def test_command_lists_unranked_runs_apart(records_dir, tmp_path_factory, capsys):
    out_dir = tmp_path_factory.mktemp("out")
    rows = summarize_main(["--records_dir", str(records_dir), "--plot", str(out_dir / "p.png"),
                           "--json", str(out_dir / "rows.json")])
    out = capsys.readouterr().out
    table, _, unranked = out.partition("Not ranked")
    assert "| good | 3 |" in table and "| bad |" not in table and "| typed |" not in table
    assert "good: diverged at step 10" in unranked and "good: interrupted at step 7" in unranked
    assert "bad: diverged at step 3" in unranked and "good: failed at step 0: ShardError: shard x.bin is truncated" in unranked
    assert "good: completed, but its final val loss is nan" in unranked
    assert "typed: completed, but its final val loss is '3.1'" in unranked
    assert len(rows) == 2 and (out_dir / "p.png").stat().st_size > 1000
    assert json.loads((out_dir / "rows.json").read_text())[0]["run_name"] in ("good", "old")  # strict JSON, no NaN


def test_wrong_typed_fields_do_not_break_a_ranked_row(tmp_path):
    write(tmp_path, "a", record("x", 3.0, median_step_ms="fast", tokens_per_s=None, peak_memory_allocated_mib=[1],
                                device=None, val=[{"step": "1"}, 7]))
    write(tmp_path, "b", record("x", 3.2))
    (row,) = summarize(load_records(tmp_path), baseline="x")
    assert row["n"] == 2 and row["median_step_ms"] == 100.0 and row["ms_ratio"] == 1.0 and row["peak_mib"] == 10
    summarize_main(["--records_dir", str(tmp_path), "--plot", str(tmp_path / "p.png")])


def test_baseline_with_only_failed_runs_is_named(tmp_path):
    write(tmp_path, "a", record("base", None, "diverged", diverged_at_step=2))
    write(tmp_path, "b", record("x", 3.2))
    with pytest.raises(SystemExit, match="--baseline 'base' matches no completed run; ranked names: x"):
        summarize(load_records(tmp_path), baseline="base")


def test_loss_stats_matches_the_t_statistic():
    losses = [3.27, 3.29, 3.25, 3.26]
    s = loss_stats(losses, 3.28)
    mean = sum(losses) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in losses) / 3)
    assert s["n"] == 4 and s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    t = (mean - 3.28) / (std / 2)
    # t = -1.549 with 3 degrees of freedom: the one-sided p of a t distribution, from its closed form for
    # nu = 3: F(t) = 1/2 + (atan(u) + u / (1 + u^2)) / pi with u = t / sqrt(3)
    u = t / math.sqrt(3)
    assert s["p_value"] == pytest.approx(0.5 + (math.atan(u) + u / (1 + u * u)) / math.pi, rel=1e-9)
    assert loss_stats([3.0, 3.0], 3.28)["p_value"] == 0.0 and loss_stats([3.5, 3.5], 3.28)["p_value"] == 1.0
    one = loss_stats([3.1], 3.28)
    assert one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["p_value"])


@pytest.mark.parametrize("losses,message", [
    ([3.2, float("nan")], r"losses\[1\] must be a finite number, got nan"),
    ([float("inf")], r"losses\[0\] must be a finite number"), ([None, 3.0], r"losses\[0\]"),
    ([True], r"losses\[0\]"), ([], "at least one value"),
])
def test_loss_stats_rejects_non_results(losses, message):
    with pytest.raises(ValueError, match=message):
        loss_stats(losses, 3.28)
