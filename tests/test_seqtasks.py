"""Synthetic tasks (seeds 000, 001, 004): generators, held-out validation, models, runner."""
import json
import random

import pytest
import torch

from seqtasks.models import build_model, linear_attention
from seqtasks.run import PRESETS, Config, main as run_main, train
from seqtasks.tasks import (Dataset, PigLatin, SelectiveCopy, VerySelectiveCopy, encode, parse_program, pig_latin,
                            run_program)

SEED_PROGRAMS = [  # seed 001, verbatim
    "NA: 2>1: AN", "DQ: -1: Q", "EJWHB: 3>5: EJBHW", "ULHP: 3>4, 2>1: LUPH", "YNP: 3>1, -3, 2>1: NP",
    "EJACQ: 1>2, -1, +3: EAJCQ", "YESBR: 3>5, 5>1, 1>5, 3>4: YEBRS", "UXMP: -2, -3, 1>2, +2: MPU",
]
SEED_SWAPS = ["NPFKT:5>4 3>1 1>4 4>2 1>3:NFTPK", "UKLRM:5>1 4>2 1>4 2>4 3>2:KLMRU", "TNEOL:1>3 4>1 4>1 4>3 5>3:ENLTO"]


@pytest.mark.parametrize("example", SEED_PROGRAMS)
def test_programs_from_the_seed(example):
    items, ops, answer = parse_program(example)
    assert run_program(items, ops) == answer


@pytest.mark.parametrize("example", SEED_SWAPS)
def test_swap_programs_from_the_seed(example):
    items, ops, answer = example.split(":")
    assert run_program(items, ops.split()) == answer


def test_invalid_programs_raise():
    with pytest.raises(ValueError, match="empty stack"):
        run_program("AB", ["+1"])
    with pytest.raises(ValueError, match="outside"):
        run_program("AB", ["1>3"])


@pytest.mark.parametrize("word,expected", [
    ("brown", "ownbray"), ("is", "isway"), ("conditioning", "onditioningcay"),
    ("pleasure-grounds", "easureplay-oundsgray"), ("strengthening", "engtheningstray"),
    ("thoughtfulness", "oughtfulnessthay"),
])
def test_pig_latin_examples_from_the_seed(word, expected):
    assert pig_latin(word) == expected


def test_selective_copy_samples():
    task = SelectiveCopy(num_items=10, area=40)
    rng = random.Random(0)
    for _ in range(50):
        s = task.sample(rng)
        question, answer = s.text[:40], s.text[41:]
        assert len(s.text) == task.seq_len == 51 and s.text[40] == ":" and s.mask_start == 41
        assert answer == question.replace(".", "") and len(set(answer)) == 10


def test_very_selective_copy_samples_are_correct_programs():
    task = VerySelectiveCopy(num_items=(2, 5), num_ops=(1, 5))
    rng = random.Random(1)
    for _ in range(200):
        s = task.sample(rng)
        assert len(s.text) == task.seq_len
        items, ops, answer = parse_program(s.text.rstrip())
        assert run_program(items, ops) == answer and 1 <= len(ops) <= 5
        assert s.text[:s.mask_start].endswith(": ")


def test_validation_never_appears_in_training():
    for task in (SelectiveCopy(num_items=2, area=6), VerySelectiveCopy(num_items=2, num_ops=1)):
        data = Dataset(task, num_val=20, seed=0)
        assert len(data.val) == 20
        train = {s.text for s in data.train_samples(3000)}
        assert not train & data.val_texts
    pig = PigLatin()
    assert not set(pig.train_words) & set(pig.val_words) and len(pig.val_words) > 100
    data = Dataset(pig, num_val=50)
    assert all(s.text.split(":")[0] in pig.val_words for s in data.val)
    assert not {s.text for s in data.train_samples(2000)} & data.val_texts


def test_encode_masks_the_answer():
    s = SelectiveCopy(num_items=2, area=5).sample(random.Random(3))
    inputs, targets, mask = encode([s])
    assert bytes(targets[0].tolist()).decode() == s.text
    assert (inputs[0, s.mask_start:] == 0).all() and torch.equal(inputs[0, :s.mask_start], targets[0, :s.mask_start])
    assert mask[0].sum() == len(s.text) - s.mask_start


MODELS = {
    "conv": dict(ch=16, layers=3, ks=5, dilation=[1, 2, 1]),
    "conv-attn": dict(ch=16, layers=3, ks=5, attn_layers=[2], attn="QKV", feature="dpfp"),
    "lstm": dict(ch=16, layers=1),
    "transformer": dict(ch=16, layers=1, heads=2),
    "mamba": dict(ch=16, layers=1, d_state=4),
    "mamba2": dict(ch=16, layers=1, d_state=4, headdim=8, chunk_size=16),
}


@pytest.mark.parametrize("task", [SelectiveCopy(4, 10), VerySelectiveCopy(3, 2), PigLatin(max_len=8)],
                         ids=["selcopy", "vselcopy", "piglatin"])
@pytest.mark.parametrize("name", list(MODELS))
def test_models_run_forward_and_backward(name, task):
    torch.manual_seed(0)
    model = build_model(name.split("-")[0], **MODELS[name])
    inputs, targets, _ = encode([task.sample(random.Random(i)) for i in range(3)])
    logits = model(inputs)
    assert logits.shape == (*inputs.shape, 256)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_linear_attention_is_parameter_free_and_length_agnostic():
    q, k, v = torch.randn(3, 2, 7, 4).unbind(0)
    out = linear_attention(q, k, v)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    torch.testing.assert_close(out, torch.einsum("blc,bmc,bmd->bld", fq, fk, v) / (4 * 7))
    assert linear_attention(*torch.randn(3, 1, 13, 4).unbind(0), kind="dpfp").shape == (1, 13, 4)


def test_training_improves_and_runner_writes_outputs(tmp_path):
    cfg = Config("tiny", "selcopy", dict(num_items=2, area=6), "mamba", dict(ch=16, layers=1, d_state=4),
                 steps=60, batch_size=32, lr=3e-3, warmup=5, eval_every=30, num_val=64)
    res = train(cfg, progress=False)
    assert res["curve"][-1]["val_loss"] < res["curve"][0]["val_loss"] or res["val_loss"] < 1.0
    assert 0 <= res["sample_error"] <= 100 and res["params"] > 0
    out = run_main(["--preset", "selcopy-conv6", "--steps", "4", "--eval_every", "2", "--num_val", "16",
                    "--model_args", '{"ch": 8, "layers": 2, "ks": 3}', "--out", str(tmp_path), "--no_progress"])
    (folder,) = list(tmp_path.iterdir())
    table = (folder / "results.md").read_text()
    assert "validation_sample_error%" in table and "| selcopy-conv6 |" in table
    assert json.loads((folder / "results.json").read_text())[0]["config"]["steps"] == 4
    assert (folder / "curves.png").stat().st_size > 1000 and len(out) == 1


def test_yaml_config(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("- name: tiny-yaml\n  task: vselcopy\n  task_args: {num_items: 3, num_ops: 2}\n  model: lstm\n"
                   "  model_args: {ch: 8, layers: 1}\n  steps: 3\n  eval_every: 3\n  num_val: 8\n")
    (res,) = run_main(["--config", str(cfg), "--out", str(tmp_path / "out"), "--no_progress"])
    assert res["config"]["name"] == "tiny-yaml" and res["config"]["task_args"] == {"num_items": 3, "num_ops": 2}


def test_runner_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="unknown preset"):
        run_main(["--preset", "nope"])
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("rnn")
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"task": "selcopy", "modle": "conv"}))
    with pytest.raises(SystemExit, match="unknown keys"):
        run_main(["--config", str(bad)])
    assert all(p.full_steps >= p.steps for p in PRESETS.values())
