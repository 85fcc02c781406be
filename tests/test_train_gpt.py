"""train_gpt.py: masks, model properties, optimizers, command line, training runs and records."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt as tg
from data.shards import EOT_ID
from summarize import load_records, main as summarize_main, summarize

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(**kw) -> tg.Hyperparameters:
    base = dict(preset="cpu", model_dim=32, num_heads=2, head_dim=16, block_size=16, train_seq_len=128,
                val_seq_len=256, batch_slices=2, val_tokens=512, num_iterations=8, val_loss_every=4,
                window_max_tokens=96, loss_chunk=0)
    base.update(kw)
    argv = [f"--{k}={v}" for k, v in base.items()]
    return tg.parse_args(argv, cuda=False)


def random_model(a: tg.Hyperparameters, seed=0) -> tg.GPT:
    """Every weight random: zero-initialised projections would make causality tests vacuous."""
    torch.manual_seed(seed)
    model = tg.GPT(a, max_seq_len=512)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim >= 2 else 1.0))
    return model.eval()


def packed_tokens(T, doc_starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 50000, (T,), generator=g)
    seq[list(doc_starts)] = EOT_ID
    return seq


# ---------------------------------------------------------------- masks

def brute_force_mask(seq: torch.Tensor, window: int, bs: int) -> torch.Tensor:
    """Independent statement of the rule: a query sees a key if causal and same document, and the key's
    block is among the `window` most recent blocks holding any key visible from the query's block."""
    T = seq.numel()
    docs = np.cumsum(seq.numpy() == EOT_ID)
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    vis = (k <= q) & (docs[:, None] == docs[None, :])
    nb = T // bs
    out = np.zeros((T, T), dtype=bool)
    for qb in range(nb):
        rows = slice(qb * bs, (qb + 1) * bs)
        visible_blocks = [kb for kb in range(nb) if vis[rows, kb * bs:(kb + 1) * bs].any()]
        kept = sorted(visible_blocks, reverse=True)[:window]
        for kb in kept:
            out[rows, kb * bs:(kb + 1) * bs] = vis[rows, kb * bs:(kb + 1) * bs]
    return torch.from_numpy(out)


def materialize_block_mask(bm, T: int, bs: int) -> torch.Tensor:
    """Token-level mask as the GPU kernel sees it: full blocks entirely, partial blocks via mask_mod."""
    out = torch.zeros(T, T, dtype=torch.bool)
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    dense_mod = bm.mask_mod(0, 0, q, k)
    for qb in range(T // bs):
        rows = slice(qb * bs, (qb + 1) * bs)
        for j in range(int(bm.kv_num_blocks[0, 0, qb])):
            kb = int(bm.kv_indices[0, 0, qb, j])
            out[rows, kb * bs:(kb + 1) * bs] |= dense_mod[rows, kb * bs:(kb + 1) * bs]
        for j in range(int(bm.full_kv_num_blocks[0, 0, qb])):
            kb = int(bm.full_kv_indices[0, 0, qb, j])
            out[rows, kb * bs:(kb + 1) * bs] = True
    return out


@pytest.mark.parametrize("layout_seed", range(4))
def test_masks_match_brute_force(layout_seed):
    rng = np.random.default_rng(layout_seed)
    bs = 8
    T = bs * int(rng.integers(6, 12))
    n_docs = int(rng.integers(1, 6))
    starts = sorted(set([0] + rng.integers(1, T, n_docs).tolist()))  # boundaries anywhere, also mid-block
    seq = packed_tokens(T, starts, seed=layout_seed)
    for window in (1, 2, 3, 5, 64):
        w = torch.tensor(window, dtype=torch.int32)
        long_b, short_b = tg.make_block_masks(seq, w, bs)
        long_d, short_d = tg.make_dense_masks(seq, w, bs)
        for bm, dense, win in ((long_b, long_d, window), (short_b, short_d, max(window // 2, 1))):
            expected = brute_force_mask(seq, win, bs)
            assert torch.equal(dense, expected), f"dense mask, window {win}"
            assert torch.equal(materialize_block_mask(bm, T, bs), expected), f"block lists, window {win}"
            # full blocks must really be fully visible (the kernel skips mask_mod on them)
            for qb in range(T // bs):
                for j in range(int(bm.full_kv_num_blocks[0, 0, qb])):
                    kb = int(bm.full_kv_indices[0, 0, qb, j])
                    assert expected[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs].all()


def test_flex_and_dense_paths_agree():
    a = tiny_args()
    model = random_model(a)
    seq = packed_tokens(256, [0, 50, 51, 130, 200])
    for window in (1, 3, 16):
        w = torch.tensor(window, dtype=torch.int32)
        with torch.no_grad():
            flex = model.logits(seq, w, dense_mask=False)
            dense = model.logits(seq, w, dense_mask=True)
        assert torch.allclose(flex, dense, atol=2e-5, rtol=1e-5), (flex - dense).abs().max()


# ---------------------------------------------------------------- model properties

@pytest.mark.parametrize("dense", [True, False], ids=["sdpa", "flex"])
def test_causality(dense):
    a = tiny_args()
    model = random_model(a)
    T, t = 192, 100
    seq = packed_tokens(T, [0, 40, 150])
    w = torch.tensor(8, dtype=torch.int32)
    changed = seq.clone()
    changed[t + 1:] = torch.randint(0, 50000, (T - t - 1,))  # keep EOTs out: doc layout of the past unchanged
    with torch.no_grad():
        before = model.logits(seq, w, dense)[0]
        after = model.logits(changed, w, dense)[0]
    assert torch.allclose(before[:t + 1], after[:t + 1], atol=1e-5, rtol=0)
    assert not torch.allclose(before[t + 1:], after[t + 1:], atol=1e-3)  # the test can see a change


@pytest.mark.parametrize("dense", [True, False], ids=["sdpa", "flex"])
def test_document_isolation(dense):
    a = tiny_args()
    model = random_model(a)
    T = 192
    seq = packed_tokens(T, [0, 70, 150])  # documents [0,70), [70,150), [150,192)
    w = torch.tensor(12, dtype=torch.int32)
    changed = seq.clone()
    changed[1:70] = torch.randint(0, 50000, (69,))  # perturb document 0 only
    with torch.no_grad():
        before = model.logits(seq, w, dense)[0]
        after = model.logits(changed, w, dense)[0]
    assert torch.allclose(before[70:], after[70:], atol=1e-5, rtol=0)
    assert not torch.allclose(before[1:70], after[1:70], atol=1e-3)


def test_speedrun_architecture_and_parameter_count():
    a = tg.parse_args(["--preset=speedrun"], cuda=True)
    with torch.device("meta"):
        model = tg.GPT(a, max_seq_len=1024)
    assert [b.attn is None for b in model.blocks] == [i == 7 for i in range(12)]
    d, V = 768, 50257
    expected = (4 * V * d                      # token + 3 value embeddings
                + 12 * (2 * 4 * d * d + 2)     # MLPs + block lambdas
                + 11 * (4 * d * d + 2)         # merged QKV + out projection + value lambdas
                + 50304 * d + 6)               # padded head + skip weights
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.lm_head.weight.shape == (50304, 768)
    assert tuple(model.blocks[0].attn.qkv_w.shape) == (3, 768, 768)


def test_rotary_rotates_half_the_dims_and_preserves_norm():
    rot = tg.Rotary(head_dim=16, max_seq_len=32)
    x = torch.randn(1, 32, 2, 16)
    y = rot(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # frequencies 4..7 of each half are zero: those dims pass through unchanged
    assert torch.equal(y[..., 4:8], x[..., 4:8]) and torch.equal(y[..., 12:16], x[..., 12:16])
    assert not torch.allclose(y[:, 1:, :, 0:4], x[:, 1:, :, 0:4])


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    G = torch.randn(2, 48, 32)
    X = tg.zeropower_via_newtonschulz5(G).float()
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's documented band (about 0.7 - 1.2)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = F.cosine_similarity(X.flatten(1), (U @ Vh).flatten(1), dim=1)
    assert (cos > 0.95).all()


# ---------------------------------------------------------------- optimizers and command line

def test_optimizer_coverage_assertion_fires():
    a = tiny_args()
    model = tg.GPT(a, max_seq_len=256)
    tg.build_optimizers(model, a, 0, 1, fused=False)  # complete: no error
    model.forgotten = nn.Linear(4, 4, bias=False)   # e.g. the MoT projection the reference left out
    with pytest.raises(AssertionError, match="forgotten.weight"):
        tg.build_optimizers(model, a, 0, 1, fused=False)
    model2 = tg.GPT(a, max_seq_len=256)
    opts = tg.build_optimizers(model2, a, 0, 1, fused=False)
    opts[1].param_groups[0]["params"].append(model2.skip_weights)  # also in Adam's scalar group
    with pytest.raises(AssertionError, match="several: \\['skip_weights'\\]"):
        tg.check_optimizer_coverage(model2, opts)


def test_command_line_overrides_and_errors():
    a = tg.parse_args(["--preset=cpu", "--model_dim=64", "--num_iterations", "7", "--sync_every_step=false",
                       "--cooldown_frac=0.5"], cuda=False)
    assert (a.model_dim, a.num_iterations, a.sync_every_step, a.cooldown_frac) == (64, 7, False, 0.5)
    assert a.train_files.endswith("devil_jargon_train_*.bin")  # from the preset
    assert tg.parse_args([], cuda=True).preset == "speedrun"
    assert tg.parse_args([], cuda=False).preset == "cpu"
    with pytest.raises(SystemExit, match="unknown hyperparameter --modle_dim"):
        tg.parse_args(["--modle_dim=3"], cuda=False)
    with pytest.raises(SystemExit, match="--num_layers: invalid literal"):
        tg.parse_args(["--num_layers=twelve"], cuda=False)
    with pytest.raises(SystemExit, match="window_pattern must have one L/S per layer"):
        tg.parse_args(["--num_layers=8"], cuda=False)
    with pytest.raises(SystemExit, match="preset must be one of"):
        tg.parse_args(["--preset=huge"], cuda=False)


def test_schedules():
    a = tg.parse_args(["--preset=speedrun"], cuda=True)
    assert tg.lr_multiplier(0, a) == 1.0 and tg.lr_multiplier(1000, a) == 1.0
    assert tg.lr_multiplier(1770, a) == pytest.approx(0.1)
    assert tg.window_blocks_at(0, a) == 1 and tg.window_blocks_at(1770, a) == 1792 // 128


# ---------------------------------------------------------------- training runs and records

TINY_RUN = ["--preset=cpu", "--model_dim=32", "--num_heads=2", "--head_dim=16", "--block_size=32",
            "--train_seq_len=128", "--val_seq_len=256", "--batch_slices=2", "--val_tokens=512",
            "--num_iterations=8", "--val_loss_every=4", "--window_max_tokens=128", "--seed=0", "--loss_chunk=64"]


def run_training(tmp_path, nproc, name):
    """A CPU run on every machine: CUDA hidden, so the 2-rank run uses gloo even on a 1-GPU box and both runs
    take the same (dense-mask, fp32) path as the reference they are compared with."""
    records = tmp_path / f"records_{name}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + ["train_gpt.py", *TINY_RUN, f"--records_dir={records}", f"--run_name={name}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (summary,) = list(records.glob("*/summary.json"))
    return json.loads(summary.read_text()), summary.parent, out.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("run1"), 1, "tiny")


def test_training_lowers_loss_and_writes_record(one_process_run):
    summary, folder, stdout = one_process_run
    assert summary["train_loss"][-1] < summary["train_loss"][0] - 0.5
    assert summary["val"][-1]["val_loss"] < summary["val"][0]["val_loss"]
    assert len(summary["step_ms"]) == 8 and all(ms > 0 for ms in summary["step_ms"])
    assert [v["step"] for v in summary["val"]] == [4, 8]
    assert summary["world_size"] == 1 and summary["grad_accum"] == 2
    assert summary["hyperparameters"]["model_dim"] == 32
    log = (folder / "train.log").read_text()
    assert "class GPT(nn.Module)" in log  # the source is logged
    assert "Running PyTorch" in log and "step:8/8 val_loss:" in log and "peak memory" in log
    assert "step:3/8 train_loss:" in log and "train data: 1 shards" in log
    assert summary["status"] == "completed" and summary["diverged_at_step"] is None
    assert "step:8/8 val_loss:" in stdout


def test_runs_never_overwrite_records(tmp_path):
    a = tg.new_record_dir(str(tmp_path), "same")
    b = tg.new_record_dir(str(tmp_path), "same")
    assert a != b and a.is_dir() and b.is_dir()


def test_summary_command_reads_records(one_process_run, tmp_path, capsys):
    summary, folder, _ = one_process_run
    records = load_records(folder.parent)
    assert len(records) == 1
    # a second fake group to exercise the ratio and the t-test
    other = dict(summary, run_name="other", median_step_ms=summary["median_step_ms"] * 2)
    for i, loss in enumerate((3.25, 3.26, 3.27)):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(dict(other, final_val_loss=loss)))
    rows = summarize(load_records(tmp_path) + records, baseline="tiny", target=3.28)
    by = {r["run_name"]: r for r in rows}
    assert by["other"]["ms_ratio"] == pytest.approx(2.0)
    assert by["other"]["mean_loss"] == pytest.approx(3.26)
    assert by["other"]["p_value"] < 0.05
    assert np.isnan(by["tiny"]["p_value"])  # one run: no test
    png = tmp_path / "plot.png"
    summarize_main(["--records_dir", str(folder.parent), "--plot", str(png)])
    assert png.stat().st_size > 1000
    assert "| tiny | 1 |" in capsys.readouterr().out


def test_two_process_gloo_matches_gradient_accumulation(one_process_run, tmp_path):
    single, _, _ = one_process_run
    double, _, _ = run_training(tmp_path, 2, "tiny2")
    assert double["world_size"] == 2 and double["grad_accum"] == 1
    # Same data, same averaged gradients: only float summation order differs (measured: equal to 5 decimals).
    # The reported train loss must be the global mean, not rank 0's slice.
    np.testing.assert_allclose(double["train_loss"], single["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(double["final_val_loss"], single["final_val_loss"], rtol=1e-4)
