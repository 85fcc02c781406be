"""seqtasks.sweep: a tiny config runs N seeds per row and writes the table, JSON and plot."""
import json

import pytest
import yaml

from seqtasks.sweep import load_sweep, main

TINY = dict(
    title="tiny", source="test", seed_budget="1,000 steps", metrics=["val_loss", "mask_error"],
    base=dict(task="selcopy", task_args=dict(num_items=2, area=6), model="conv", model_args=dict(ch=8, ks=3),
              steps=1000, full_steps=1000, batch_size=8, lr=1e-2, warmup=1, eval_every=3, num_val=20),
    reduced=dict(steps=6),
    rows=[dict(name="l1", model_args=dict(layers=1), seed=dict(val_loss=0.5, mask_error=12.5, mask_error_std=1.5)),
          dict(name="l2", model_args=dict(layers=2), seed=dict(val_loss=0.25))],
)


def write(tmp_path, spec):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_writes_table_json_and_plot_with_mean_and_std(tmp_path):
    record = main([write(tmp_path, TINY), "--seeds", "2", "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    (folder,) = out.iterdir()
    data = json.loads((folder / "table.json").read_text())
    assert (folder / "curves.png").stat().st_size > 1000
    assert data["machine"]["cpus"] >= 1 and "--seeds 2" in data["command"]
    for row in data["summary"]:
        runs = data["runs"][row["name"]]
        assert row["runs"] == len(runs) == 2 and {r["config"]["seed"] for r in runs} == {0, 1}
        assert all(r["steps_done"] == 6 for r in runs)  # the reduced budget, not full_steps
        losses = [r["val_loss"] for r in runs]
        assert row["ours"]["val_loss"]["mean"] == pytest.approx(sum(losses) / 2)
        assert row["ours"]["val_loss"]["std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
    assert [r["config"]["model_args"]["layers"] for r in data["runs"]["l2"]] == [2, 2]
    table = (folder / "table.md").read_text()
    assert "REDUCED BUDGET" in table and "1,000" in table
    assert "| l1 |" in table and "| 0.5 |" in table and "12.5 ± 1.5" in table
    assert record["summary"] == data["summary"]


def test_sweep_rows_filter_and_full_budget_header(tmp_path):
    spec = {**TINY, "base": {**TINY["base"], "full_steps": 4}}
    main([write(tmp_path, spec), "--seeds", "1", "--full", "--rows", "l2", "--out", str(tmp_path / "o")])
    (folder,) = (tmp_path / "o").iterdir()
    data = json.loads((folder / "table.json").read_text())
    assert list(data["runs"]) == ["l2"] and data["runs"]["l2"][0]["steps_done"] == 4
    assert "REDUCED" not in (folder / "table.md").read_text()


@pytest.mark.parametrize("change,match", [
    (dict(metrics=["speed"]), "metrics"),
    (dict(rows=[dict(name="a"), dict(name="a")]), "distinct name"),
    (dict(rows=[dict(name="a", layerz=3)]), "unknown fields"),
    (dict(rows=[dict(name="a", seed=dict(sample_error=1))]), "not in metrics"),
    (dict(colour="red"), "unknown keys"),
])
def test_bad_sweep_configs_raise(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        load_sweep(write(tmp_path, {**TINY, **change}))


def test_shipped_configs_load():
    from pathlib import Path
    configs = sorted((Path(__file__).parent.parent / "seqtasks" / "configs").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        spec = load_sweep(str(path))
        assert spec["base"]["full_steps"] > spec["reduced"]["steps"], path
