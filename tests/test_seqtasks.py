"""Synthetic tasks (seeds 000, 001, 004): generators, held-out validation, models, runner."""
import json
import random

import pytest
import torch

import kernels

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


# ---------------------------------------------------------------- reliability: checked configs, no hang, no loss

TINY = ["--task", "selcopy", "--model", "conv", "--task_args", '{"num_items": 2, "area": 6}', "--model_args",
        '{"ch": 8, "layers": 1, "ks": 3}', "--num_val", "16", "--steps", "4", "--eval_every", "2", "--no_progress"]


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--batch_size", "-1"], "batch_size must be an integer >= 1, got -1"),
    (["--eval_every", "0"], "eval_every must be an integer >= 1, got 0"),
    (["--num_val", "0"], "num_val must be an integer >= 1, got 0"),
    (["--warmup", "-3"], "warmup must be an integer >= 0, got -3"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--model", "rnn"], "model must be one of"),
    (["--task_args", '{"num_items": 0, "area": 6}'], r"num_items must be in \[1, area=6\]"),
    (["--task_args", '{"items": 3}'], "unexpected keyword argument 'items'"),
    (["--model_args", '{"ch": 0}'], "model_args ch must be an integer >= 1, got 0"),
    (["--model_args", '{"width": 3}'], "unexpected keyword argument 'width'"),
    (["--model", "transformer", "--model_args", '{"max_len": 4}'], "longer than max_len=4"),
    (["--model", "transformer", "--model_args", '{"ch": 12, "heads": 8}'], r"heads \(8\) must divide ch \(12\)"),
    (["--model", "mamba2", "--model_args", '{"ch": 8, "headdim": 5}'], r"headdim \(5\) must divide d_ssm \(16\)"),
])
def test_bad_config_is_refused_before_any_folder(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run_main(TINY + flags + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_bad_config_file_is_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- just a string\n")
    with pytest.raises(SystemExit, match="each config must be a mapping"):
        run_main(["--config", str(cfg), "--out", str(tmp_path / "out")])
    cfg.write_text("name: [unclosed\n")
    with pytest.raises(SystemExit, match="cannot read config"):
        run_main(["--config", str(cfg), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_sample_space_too_small_for_validation_is_an_error_not_a_hang(tmp_path):
    # 1 letter in 10 slots: 26 * 10 = 260 distinct samples, fewer than the default 1000 validation samples
    with pytest.raises(SystemExit, match="gave only 260 distinct samples .* fewer than num_val=1000.*at most 130"):
        run_main(["--task", "selcopy", "--model", "conv", "--task_args", '{"num_items":1,"area":10}',
                  "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"the 200 validation samples cover 7\d% of what the task draws"):
        Dataset(SelectiveCopy(num_items=1, area=10), num_val=200)
    data = Dataset(SelectiveCopy(num_items=1, area=10), num_val=100)  # room for fresh training samples
    assert not {s.text for s in data.train_samples(500)} & data.val_texts
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ops", ["remove", "swap,remove", "remove,insert"])
def test_very_selective_copy_op_subsets_sample_valid_programs(ops):
    task = VerySelectiveCopy(num_items=(2, 4), num_ops=(1, 4), ops=ops)
    rng = random.Random(5)
    for _ in range(100):
        items, prog, answer = parse_program(task.sample(rng).text.rstrip())
        assert run_program(items, [o for o in prog if o]) == answer


@pytest.mark.parametrize("kwargs,message", [
    (dict(ops="insert"), "needs 'remove'"), (dict(num_ops=(3, 1)), "num_ops must be >= 1"),
    (dict(num_ops=0), "num_ops must be >= 1"), (dict(num_items="5"), "num_items must be an integer"),
    (dict(num_items=(1, 2, 3)), r"num_items must be an integer or a \[min, max\] pair"),
])
def test_very_selective_copy_rejects_bad_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VerySelectiveCopy(**kwargs)


def test_run_folders_are_unique_within_one_second(tmp_path, monkeypatch):
    import seqtasks.run as run_module
    monkeypatch.setattr(run_module.time, "strftime", lambda fmt: "20260101-000000")
    folders = {run_module.new_run_dir(tmp_path, "same/name") for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() and f.parent == tmp_path for f in folders)


def test_results_are_written_after_every_evaluation_and_kept_on_interrupt(tmp_path, monkeypatch):
    import seqtasks.run as run_module
    real_evaluate, on_disk = run_module.evaluate, []

    def evaluate_then_interrupt(model, data):
        files = list((tmp_path / "out").glob("*/results.json"))
        on_disk.append(len(json.loads(files[0].read_text())[0]["curve"]) if files else 0)
        if len(on_disk) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third evaluation
        return real_evaluate(model, data)

    monkeypatch.setattr(run_module, "evaluate", evaluate_then_interrupt)
    (res,) = run_main(TINY[:-5] + ["--steps", "10", "--eval_every", "2", "--no_progress", "--out", str(tmp_path / "out")])
    assert on_disk == [0, 1, 2]  # each evaluation was on disk before the next one started
    (folder,) = (tmp_path / "out").iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert res["status"] == "interrupted" and saved[0]["status"] == "interrupted" and saved[0]["steps_done"] == 6
    assert [c["step"] for c in saved[0]["curve"]] == [2, 4]
    assert "(interrupted at step 6)" in (folder / "results.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "results.json", "results.md"]  # no temp files


def test_non_finite_loss_stops_the_run_as_diverged():
    cfg = Config("nan", "selcopy", dict(num_items=2, area=6), "conv", dict(ch=8, layers=1, ks=3), steps=50,
                 eval_every=2, num_val=16)
    from seqtasks.run import prepare_run
    task, data, model = prepare_run(cfg)
    calls = []

    def poison(module, inputs, output):  # the logits turn NaN on the 5th training step
        calls.append(module.training)
        return output * float("nan") if sum(calls) >= 5 and module.training else output

    model.head.register_forward_hook(poison)
    res = train(cfg, progress=False, prepared=(task, data, model))
    assert res["status"] == "diverged" and res["diverged_at_step"] == 5 and res["steps_done"] == 4
    assert [c["step"] for c in res["curve"]] == [2, 4]


@pytest.mark.parametrize("heads", [1, 4, 8])
def test_multihead_attention_conv_trains_a_step(heads):
    """Seed 001's 'attn 0,0,X' rows: nn.MultiheadAttention in the last layer, q/k from the conv."""
    torch.manual_seed(0)
    model = build_model("conv", ch=16 if heads < 8 else 32, layers=2, ks=3, attn_layers=[1], attn="QK",
                        attn_heads=heads)
    assert model.layers[1].mha.num_heads == heads and model.layers[0].mha is None
    inputs, targets, _ = encode([VerySelectiveCopy(num_items=3, num_ops=2, ops="swap").sample(random.Random(i))
                                 for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        assert model.layers[1].mha.in_proj_weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_multihead_attention_rejects_heads_not_dividing_channels():
    with pytest.raises(ValueError, match="attn_heads"):
        build_model("conv", ch=12, layers=1, ks=3, attn_layers=[0], attn="QK", attn_heads=5)


def test_val_task_args_change_the_validation_task():
    """Train on 1-3 operations, validate on exactly 3: every validation program has 3 operations, the
    training stream keeps shorter ones, and the result's task columns name the validation setting."""
    from seqtasks.run import prepare_run
    cfg = Config("val", "vselcopy", dict(num_items=4, num_ops=[1, 3], ops="swap"), "conv",
                 dict(ch=8, layers=1, ks=3), steps=2, eval_every=2, num_val=50, val_task_args=dict(num_ops=3))
    _, data, _ = prepare_run(cfg)
    n_ops = lambda s: len(parse_program(s.text.strip())[1])  # noqa: E731
    assert {n_ops(s) for s in data.val} == {3}
    assert {n_ops(s) for s in data.train_samples(200)} == {1, 2, 3}
    _, same, _ = prepare_run(Config(**{**cfg.__dict__, "val_task_args": {}}))
    assert {n_ops(s) for s in same.val} == {1, 2, 3}
    result = train(cfg, progress=False)
    assert result["task"]["nops"] == "1,3" and result["task"]["val-nops"] == "3,3"


@pytest.mark.parametrize("kind,args", [
    ("encdec", dict(ch=16, layers=1, heads=4)),
    ("scan_mamba", dict(ch=16, layers=1, d_state=4, discretization="zoh")),
    ("scan_mamba", dict(ch=16, layers=1, d_state=4, discretization="zoh_exact")),
    ("scan_mamba", dict(ch=16, layers=1, d_state=4, discretization="bilinear")),
])
def test_new_models_learn_a_batch(kind, args):
    torch.manual_seed(0)
    model = build_model(kind, **args)
    inputs, targets, _ = encode([PigLatin().sample(random.Random(i)) for i in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert model(inputs).shape == (8, inputs.shape[1], 256) and loss.item() < first


def test_exact_zoh_matches_the_matrix_exponential():
    """Exact ZOH of x' = A x + u: exp([[A, 1], [0, 0]] dt) = [[exp(A dt), int_0^dt exp(A s) ds], [0, 1]], an
    independent float64 reference for (decay, (exp(A dt) - 1) / A); approximate ZOH differs by O(dt^2 A)."""
    from seqtasks.models import discretize
    dt = torch.tensor([[1e-4], [0.05], [0.7], [3.0]], dtype=torch.float64)
    A = -torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    decay, coef = discretize(dt, A, "zoh_exact")
    for i in range(dt.shape[0]):
        for j in range(A.shape[0]):
            M = torch.tensor([[A[j].item(), 1.0], [0.0, 0.0]], dtype=torch.float64) * dt[i, 0]
            E = torch.linalg.matrix_exp(M)
            torch.testing.assert_close(decay[i, j], E[0, 0], rtol=1e-12, atol=0)
            torch.testing.assert_close(coef[i, j], E[0, 1], rtol=1e-10, atol=0)
    approx = discretize(dt, A, "zoh")[1]
    assert (approx - coef).abs()[2:].min() > 1e-3  # the options really differ at large dt
    with pytest.raises(ValueError, match="discretization"):
        build_model("scan_mamba", ch=8, layers=1, discretization="euler")
    with pytest.raises(ValueError, match="scan_mamba"):
        build_model("mamba2", ch=8, layers=1, discretization="bilinear")
    mamba = build_model("mamba", ch=8, layers=1, discretization="zoh_exact")  # kernels.Mamba takes it through
    assert all(block.discretization == "zoh_exact" for block in mamba.modules() if isinstance(block, kernels.Mamba))
