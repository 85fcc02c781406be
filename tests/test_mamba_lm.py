"""Mamba / Mamba2 / hybrid language models in train_gpt.py: one-token decoding equals the full forward, no state
crosses a document, optimizer groups, checkpoints (round trip, resume = uninterrupted run)."""
import shutil

import pytest
import torch

import train_gpt as tg
from data.shards import EOT_ID

# 6 layers (the fewest allowed), block 16 and a 40-token window (3 blocks; short layers 1): windows bind
# inside the 64-token test sequence
BASE = dict(preset="cpu", num_layers=6, window_pattern="LSSSSL", no_attn_layers="", model_dim=32, num_heads=2,
            head_dim=16, block_size=16, train_seq_len=64, val_seq_len=64, val_tokens=128, window_max_tokens=40,
            num_iterations=8, val_loss_every=3, mamba_d_state=4, mamba2_d_state=8, mamba2_headdim=16,
            mamba2_chunk_size=16, loss_chunk=0)
MIXERS = {"attention": dict(mixer="attention"), "mamba": dict(mixer="mamba"), "mamba2": dict(mixer="mamba2"),
          "hybrid": dict(mixer_pattern="MA2-A2")}


def args(**kw) -> tg.Hyperparameters:
    return tg.parse_args([f"--{k}={v}" for k, v in {**BASE, **kw}.items()], cuda=False)


def random_model(a: tg.Hyperparameters, seed=0) -> tg.GPT:
    """Every weight random (zero-initialised projections would make the comparisons vacuous); the SSM dynamics
    in their usual ranges (decays exp(-softplus(dt) * A) neither 0 nor 1), so states carry over many tokens."""
    torch.manual_seed(seed)
    model = tg.GPT(a, max_seq_len=128)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p))
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.copy_(torch.rand_like(p) - 2)
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.ndim >= 2 else 1.0))
    return model.eval()


def packed(T=64, doc_starts=(0, 30), seed=0):
    seq = torch.randint(0, 50000, (T,), generator=torch.Generator().manual_seed(seed))
    seq[list(doc_starts)] = EOT_ID
    return seq


MOT_HYBRID = dict(MIXERS["hybrid"], mot="cross+mamba2", char_dim=16, char_heads=2, cross_heads=2, chars_per_token=4)


@pytest.mark.parametrize("kind", [*MIXERS, "hybrid+mot"])
def test_decoding_one_token_at_a_time_equals_the_full_forward(kind):
    """Two documents, windows that bind: the KV cache (window, document) and the Mamba caches (reset at EOT)
    reproduce every position's logits. Tolerance: the full forward runs the chunked scan, decoding the
    per-token recurrence, both fp32; their differences (~1e-5 relative per layer) pass through 6 layers of
    random 0.5-scale weights to logits of magnitude ~30 (softcap): 1e-3 absolute is ~3e-5 relative."""
    a = args(**(MOT_HYBRID if kind == "hybrid+mot" else MIXERS[kind]))  # MoT: the char Mamba2 recomputed per step
    model = random_model(a)
    seq = packed()
    window = torch.tensor(tg.window_blocks_at(a.num_iterations, a), dtype=torch.int32)
    with torch.no_grad():
        full = model.logits(seq, window, dense_mask=True)[0]
    state = tg.DecodeState(model, seq.numel())
    steps = torch.stack([model.decode_step(int(t), state) for t in seq])
    assert (steps - full).abs().max() < 1e-3
    with pytest.raises(ValueError, match="does not fit"):
        model.decode_step(1, state)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "hybrid"])
def test_no_state_crosses_a_document(kind):
    """Changing document 1 changes its logits and leaves document 2's (from its EOT on) as they were."""
    model = random_model(args(**MIXERS[kind]))
    seq = packed(doc_starts=(0, 37))  # 37: the boundary inside a Mamba2 chunk and an attention block
    changed = seq.clone()
    changed[5:37] = torch.randint(0, 50000, (32,), generator=torch.Generator().manual_seed(1))
    w = torch.tensor(3, dtype=torch.int32)
    with torch.no_grad():
        before, after = model.logits(seq, w, True)[0], model.logits(changed, w, True)[0]
    assert (before[5:37] - after[5:37]).abs().max() > 0.1
    assert (before[37:] - after[37:]).abs().max() < 1e-5  # fp32 round-off only: the chunk sums differ in order


def test_layer_mixers_and_flag_checks():
    assert tg.layer_mixers(args(mixer="mamba2")) == "222222"
    assert tg.layer_mixers(args(mixer_pattern="MA2-A2", no_attn_layers="1")) == "M-2-A2"
    assert tg.layer_mixers(args(no_attn_layers="3")) == "AAA-AA"
    for bad, msg in ((dict(mixer="rnn"), "--mixer must be one of"), (dict(mixer_pattern="MA2"), "--mixer_pattern"),
                     (dict(mixer_pattern="MAXMAM"), "--mixer_pattern"),
                     (dict(mixer="mamba2", mamba2_headdim=24), "--mamba2_headdim"),
                     (dict(save_checkpoint="every_0"), "--save_checkpoint"),
                     (dict(save_checkpoint="sometimes"), "--save_checkpoint")):
        with pytest.raises(SystemExit, match=msg):
            args(**bad)


def test_value_embeddings_only_where_an_attention_layer_reads_them():
    assert len(tg.GPT(args(mixer="mamba2"), 64).value_embeds) == 0
    # slot i feeds layers i and L-3+i: with "MA2-A2" slot 0 (layers 0, 3) is unread, 1 (1, 4) read, 2 (2, 5) unread
    assert list(tg.GPT(args(mixer_pattern="MA2-A2"), 64).value_embeds) == ["1"]
    assert list(tg.GPT(args(), 64).value_embeds) == ["0", "1", "2"]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_optimizer_groups_for_mamba_layers(kind):
    """Muon: in_proj, out_proj (and Mamba's x_proj); Adam at mamba_lr: A_log, D, dt, conv; every parameter in
    exactly one group (build_optimizers asserts it) and every one gets a gradient."""
    a = args(mixer=kind, mamba_lr=0.0123)
    model = random_model(a)
    adam, muon = tg.build_optimizers(model, a, 0, 1, fused=False)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    mamba_group = next(g for g in adam.param_groups if g["lr"] == 0.0123)
    in_mamba_group = {id(p) for p in mamba_group["params"]}
    for name, p in model.named_parameters():
        if ".ssm." not in name:
            continue
        leaf = name.split(".ssm.")[1]
        if leaf in ("in_proj.weight", "out_proj.weight", "x_proj.weight"):
            assert id(p) in in_muon, name
        else:
            assert id(p) in in_mamba_group, name
    model.train()
    seq = packed()
    model(seq, packed(seed=1).long(), torch.tensor(3, dtype=torch.int32), True).backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """8 steps of a hybrid with a checkpoint every 4 steps; each checkpoint written is copied aside."""
    tmp = tmp_path_factory.mktemp("ckpt")
    copies = []
    write = tg.write_atomic

    def keep_copies(path, fn):
        write(path, fn)
        if path.name == tg.CHECKPOINT_NAME:
            copies.append(tmp / f"step_copy{len(copies)}.pt")
            shutil.copy(path, copies[-1])

    argv = [f"--{k}={v}" for k, v in {**BASE, **MIXERS["hybrid"]}.items()]
    argv += ["--seed=3", f"--records_dir={tmp}", "--save_checkpoint=every_4"]
    mp = pytest.MonkeyPatch()
    mp.setattr(tg, "write_atomic", keep_copies)
    try:
        summary = tg.main(argv)
    finally:
        mp.undo()
    return tmp, summary, copies


def test_checkpoint_round_trip(checkpointed_run):
    """The final checkpoint loads with weights_only=True and its model reproduces the run's final val loss."""
    tmp, summary, copies = checkpointed_run
    assert summary["status"] == "completed" and len(copies) == 2  # step 4 and the final step 8
    raw = torch.load(copies[1], weights_only=True)
    assert raw["step"] == 8 and raw["hyperparameters"]["mixer_pattern"] == "MA2-A2"
    ck = tg.load_checkpoint(copies[1])
    a = tg.Hyperparameters(**tg.checkpoint_hyperparameters(ck))
    model = tg.model_from_checkpoint(ck, "cpu")
    val = tg.distributed_data_generator(a.val_files, a.val_seq_len, 0, 1, a.vocab_size, loop=False)
    window = torch.tensor(tg.window_blocks_at(a.num_iterations, a), dtype=torch.int32)
    with torch.no_grad():
        losses = [model(*next(val), window, True) for _ in range(a.val_tokens // a.val_seq_len)]
    assert abs(torch.stack(losses).mean().item() - summary["final_val_loss"]) < 1e-5


def test_resume_continues_the_same_loss_curve(checkpointed_run):
    """Resumed from step 4: steps 5-8 (loader position, optimizer moments, schedule) and the val losses equal
    the uninterrupted run's. Same process, same CPU kernels: equal up to fp32 round-off."""
    tmp, summary, copies = checkpointed_run
    resumed = tg.main([f"--resume={copies[0]}", f"--records_dir={tmp}", "--run_name=resumed"])
    assert resumed["status"] == "completed"
    assert resumed["train_loss"] == pytest.approx(summary["train_loss"], rel=1e-6, abs=0)
    assert [v["val_loss"] for v in resumed["val"]] == pytest.approx([v["val_loss"] for v in summary["val"]],
                                                                    rel=1e-6, abs=0)


def test_checkpoint_errors(checkpointed_run, tmp_path):
    _, summary, copies = checkpointed_run
    with pytest.raises(SystemExit, match="no checkpoint at"):
        tg.parse_args([f"--resume={tmp_path / 'missing.pt'}"], cuda=False)
    with pytest.raises(tg.CheckpointError, match="holds no checkpoint.pt"):
        tg.load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(tg.CheckpointError, match="not a readable checkpoint"):
        tg.load_checkpoint(tmp_path / "junk.pt")
    ck = torch.load(copies[1], weights_only=True)
    ck["hyperparameters"]["future_flag"] = 1
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(tg.CheckpointError, match="unknown hyperparameters"):
        tg.model_from_checkpoint(tg.load_checkpoint(tmp_path / "future.pt"), "cpu")
    del ck["hyperparameters"]["future_flag"]
    ck["hyperparameters"]["model_dim"] = 64
    torch.save(ck, tmp_path / "other_shape.pt")
    with pytest.raises(tg.CheckpointError, match="weights do not fit"):
        tg.model_from_checkpoint(tg.load_checkpoint(tmp_path / "other_shape.pt"), "cpu")
    with pytest.raises(SystemExit, match="resuming needs the same"):
        tg.main([f"--resume={copies[0]}", f"--records_dir={tmp_path}", "--batch_slices=4"])


def test_hybrid_model_traces_as_one_graph():
    """torch.compile: dynamo captures the whole hybrid GPT (attention, Mamba, Mamba2) without a graph break,
    the Mamba layers as the kernels' custom ops (kernels/compile_ops.py)."""
    model = random_model(args(**MIXERS["hybrid"]))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(packed(), packed(seed=1).long(), torch.tensor(3, dtype=torch.int32), True)
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert explained.graph_break_count == 0
    assert {"nanogpt_mamba.selective_scan_fwd.default", "nanogpt_mamba.ssd_fwd.default"} <= ops
