"""Shard format, prepare tool and loader validation."""
import numpy as np
import pytest
import torch

import train_gpt as tg
from data.prepare import prepare, split_documents
from data.shards import EOT_ID, HEADER_BYTES, MAGIC, ShardError, gpt2_encoding, read_shard, write_shard


def test_offline_tokenizer_is_gpt2():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID


def test_prepare_round_trip(tmp_path):
    texts = ["First document.\n\nIt has two paragraphs, é and ü.", "Second one: 123 + 456.", "Third, last."]
    files = []
    for i, t in enumerate(texts):
        f = tmp_path / f"t{i}.txt"
        f.write_text(t, encoding="utf-8")
        files.append(f)
    counts = prepare(files, tmp_path / "out", name="c", split="file", val_fraction=0.34, quiet=True, seed=3)
    train = read_shard(tmp_path / "out" / "c_train_000000.bin")
    val = read_shard(tmp_path / "out" / "c_val_000000.bin")
    assert counts["train"] == train.size and counts["val"] == val.size
    enc = gpt2_encoding()
    docs = []
    for shard in (train, val):
        assert shard[0] == EOT_ID  # every document starts with <|endoftext|>
        starts = np.flatnonzero(shard == EOT_ID).tolist() + [shard.size]
        docs += [enc.decode(shard[s + 1:e].tolist()) for s, e in zip(starts, starts[1:])]
    assert sorted(docs) == sorted(texts)


def test_prepare_splits_paragraphs_into_documents():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(10))
    docs = split_documents(text, "paragraphs", min_doc_chars=120)
    assert len(docs) == 5 and all(d.count("paragraph") == 2 for d in docs)


def test_loader_slices_per_rank(tmp_path):
    tokens = np.arange(1000) % 50000
    write_shard(tmp_path / "x_train_000000.bin", tokens)
    pattern = str(tmp_path / "x_train_*.bin")
    for rank in range(2):
        gen = tg.distributed_data_generator(pattern, 100, rank, 2, 50257)
        for step in range(3):
            x, y = next(gen)
            start = step * 200 + rank * 100
            assert torch.equal(x, torch.arange(start, start + 100, dtype=torch.int32))
            assert torch.equal(y, torch.arange(start + 1, start + 101)) and y.dtype == torch.int64


def corrupt(path, kind):
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4").copy()
    if kind == "magic":
        header[0] = 12345
    elif kind == "version":
        header[1] = 7
    elif kind == "truncated":
        raw = raw[:-10]
    elif kind == "short_header":
        raw = raw[:100]
    elif kind == "out_of_range":
        toks = np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").copy()
        toks[5] = 60000
        raw[HEADER_BYTES:] = toks.tobytes()
    if kind in ("magic", "version"):
        raw[:HEADER_BYTES] = header.tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,message", [
    ("magic", f"magic 12345, expected {MAGIC}"), ("version", "version 7, expected 1"),
    ("truncated", "truncated or corrupt"), ("short_header", "shorter than its 1024-byte header"),
    ("out_of_range", "token id 60000 at position 5"),
])
def test_bad_shards_raise_clear_errors(tmp_path, kind, message):
    path = tmp_path / "mine_train_000000.bin"
    write_shard(path, np.arange(500))
    corrupt(path, kind)
    with pytest.raises(ShardError) as e:
        next(tg.distributed_data_generator(str(tmp_path / "mine_train_*.bin"), 64, 0, 1, 50257))
    assert message in str(e.value) and str(path) in str(e.value)
    assert "python data/prepare.py" in str(e.value)  # the fix


def test_missing_and_too_small_data(tmp_path):
    with pytest.raises(ShardError, match="cached_fineweb10B.py 8"):
        next(tg.distributed_data_generator(str(tmp_path / "fineweb10B/fineweb_train_*.bin"), 64, 0, 1, 50257))
    with pytest.raises(ShardError, match="python data/prepare.py"):
        next(tg.distributed_data_generator(str(tmp_path / "devil_jargon/devil_jargon_train_*.bin"), 64, 0, 1, 50257))
    write_shard(tmp_path / "s_train_000000.bin", np.arange(100))
    with pytest.raises(ShardError, match="fewer than one batch needs \\(2 ranks x 64 \\+ 1 = 129\\)"):
        next(tg.distributed_data_generator(str(tmp_path / "s_train_*.bin"), 64, 0, 2, 50257))


def test_write_shard_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="must fit in uint16"):
        write_shard(tmp_path / "bad.bin", [1, 2, 70000])
