"""data/prepare.py: flags checked before anything is written, one build per folder (--replace), non-UTF-8
and binary input."""
import numpy as np
import pytest

from data.prepare import main as prepare_main, prepare
from data.shards import EOT_ID, gpt2_encoding, read_shard

TEXT_A = "\n\n".join(f"Paragraph {i} of corpus A, with some words in it." for i in range(40))
TEXT_B = "\n\n".join(f"Corpus B says something else in paragraph {i}." for i in range(40))


def corpus(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def shard_names(folder):
    return sorted(p.name for p in folder.glob("*.bin"))


def decoded_documents(folder, name):
    enc = gpt2_encoding()
    docs = []
    for path in sorted(folder.glob(f"{name}_*.bin")):
        toks = read_shard(path)
        starts = np.flatnonzero(toks == EOT_ID).tolist() + [toks.size]
        docs += [enc.decode(toks[s + 1:e].tolist()) for s, e in zip(starts, starts[1:])]
    return docs


@pytest.mark.parametrize("flag,value,message", [
    ("shard_tokens", 0, "--shard_tokens must be an integer >= 1, got 0"),
    ("shard_tokens", -5, "--shard_tokens must be an integer >= 1, got -5"),
    ("min_doc_chars", 0, "--min_doc_chars must be an integer >= 1"),
    ("val_fraction", 0.0, r"--val_fraction must be in \(0, 1\), got 0.0"),
    ("val_fraction", 1.5, r"--val_fraction must be in \(0, 1\)"),
    ("name", "a/b", "--name must be letters"), ("name", "*", "--name must be letters"),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, flag, value, message):
    src = corpus(tmp_path, "a.txt", TEXT_A)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        prepare([src], out, **{flag: value}, quiet=True)
    with pytest.raises(SystemExit, match=message):  # the command names the flag too, without a traceback
        prepare_main([str(src), "--out_dir", str(out), f"--{flag}={value}"])
    assert not out.exists()


def test_missing_input_creates_nothing(tmp_path):
    with pytest.raises(SystemExit, match="input text file .*nope.txt does not exist"):
        prepare_main([str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_another_build_is_refused_then_replaced_completely(tmp_path):
    out = tmp_path / "out"
    a, b = corpus(tmp_path, "a.txt", TEXT_A), corpus(tmp_path, "b.txt", TEXT_B)
    prepare([a], out, name="c", min_doc_chars=100, shard_tokens=64, quiet=True)
    old = shard_names(out)
    assert len(old) > 4  # several train shards: the case where a partial overwrite used to leave stale ones
    before = {p: (out / p).read_bytes() for p in old}
    with pytest.raises(ValueError, match=r"already holds shards of another build: c \(\d+ shards\).*--replace"):
        prepare([b], out, name="c", min_doc_chars=100, shard_tokens=1000, quiet=True)
    assert {p: (out / p).read_bytes() for p in shard_names(out)} == before  # refused: untouched
    prepare([b], out, name="c", min_doc_chars=100, shard_tokens=1000, quiet=True, replace=True)
    assert shard_names(out) == ["c_train_000000.bin", "c_val_000000.bin"]  # every old shard is gone
    docs = decoded_documents(out, "c")
    assert "".join(docs).count("Corpus B") == 40 and "corpus A" not in "".join(docs)


def test_other_names_and_unlabelled_shards_count_as_other_builds(tmp_path):
    out = tmp_path / "out"
    a = corpus(tmp_path, "a.txt", TEXT_A)
    prepare([a], out, name="first", min_doc_chars=100, quiet=True)
    with pytest.raises(ValueError, match=r"another build: first \(2 shards\)"):
        prepare([a], out, name="second", min_doc_chars=100, quiet=True)
    (out / "first_build.json").unlink()  # shards from before build manifests existed: origin unknown
    with pytest.raises(ValueError, match="another build: first"):
        prepare([a], out, name="first", min_doc_chars=100, quiet=True)
    prepare_main([str(a), "--out_dir", str(out), "--name", "second", "--min_doc_chars", "100", "--replace"])
    assert shard_names(out) == ["second_train_000000.bin", "second_val_000000.bin"]


def test_same_build_reruns_and_gives_the_same_shards(tmp_path):
    out = tmp_path / "out"
    a = corpus(tmp_path, "a.txt", TEXT_A)
    prepare([a], out, name="c", min_doc_chars=100, quiet=True)
    first = {p: (out / p).read_bytes() for p in shard_names(out)}
    prepare([a], out, name="c", min_doc_chars=100, quiet=True)
    assert {p: (out / p).read_bytes() for p in shard_names(out)} == first


def test_non_utf8_bytes_warn_with_a_count(tmp_path, capsys):
    src = tmp_path / "latin1.txt"
    src.write_bytes(("Un garçon à l'hôtel.\n\nDeuxième paragraphe, sans accent ici.\n\n" * 5).encode("latin-1"))
    counts = prepare([src], tmp_path / "out", min_doc_chars=10, quiet=False)
    assert "has 20 byte sequences that are not valid UTF-8" in capsys.readouterr().err  # ç à ô è per copy
    assert counts["train"] > 0 and "\ufffd" in "".join(decoded_documents(tmp_path / "out", "out"))


@pytest.mark.parametrize("kind", ["random", "utf16"])
def test_binary_input_is_refused(tmp_path, kind):
    src = tmp_path / "blob"
    data = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes() if kind == "random" else \
        TEXT_A.encode("utf-16")
    src.write_bytes(data)
    with pytest.raises(SystemExit, match=f"input {src} is mostly not text"):
        prepare_main([str(src), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
