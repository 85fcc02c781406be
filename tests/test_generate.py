"""generate.py: sampling rules, UTF-8 streaming, the command line end to end (greedy completion equals greedy
decoding by full forwards), interactive mode, decoding-state size, and its error messages."""
import io

import pytest
import torch

import generate
import train_gpt as tg
from data.shards import EOT_ID
from test_mamba_lm import BASE, MIXERS, args, random_model


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g)
    best = int(logits.argmax())
    assert generate.sample(logits, g, 0.0, 0, 1.0) == best
    assert generate.sample(logits, g, 5.0, 1, 1.0) == best  # top-1 at any temperature
    assert generate.sample(logits, g, 5.0, 0, 1e-6) == best  # the smallest nucleus holds the best token only
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert {generate.sample(logits, g, 2.0, 3, 1.0) for _ in range(200)} == top3
    # nucleus: two tokens of probability 0.5 - eps each and many tiny ones; top_p 0.9 keeps only the two
    peaked = torch.full((50,), -20.0)
    peaked[[7, 9]] = 0.0
    assert {generate.sample(peaked, g, 1.0, 0, 0.9) for _ in range(100)} == {7, 9}
    first = [generate.sample(logits, torch.Generator().manual_seed(5), 1.0, 0, 1.0) for _ in range(3)]
    assert len(set(first)) == 1  # the seed fixes the draw


def test_utf8_stream_waits_for_whole_characters():
    out = io.StringIO()
    stream = generate.Utf8Stream(out)
    euro = "€".encode()  # 3 bytes
    stream.write(b"a" + euro[:1])
    assert out.getvalue() == "a"
    stream.write(euro[1:])
    assert out.getvalue() == "a€"
    stream.write(b"\xff")
    stream.close()
    assert out.getvalue() == "a€\ufffd"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """A 2-step hybrid run with its final checkpoint."""
    tmp = tmp_path_factory.mktemp("gen")
    argv = [f"--{k}={v}" for k, v in {**BASE, **MIXERS["hybrid"], "num_iterations": 2}.items()]
    tg.main(argv + ["--seed=0", f"--records_dir={tmp}", "--save_checkpoint=final"])
    (record_dir,) = [p for p in tmp.iterdir() if p.is_dir()]
    return record_dir


def run_cli(argv, stdin=""):
    out = io.StringIO()
    rc = generate.main(argv, stdin=io.StringIO(stdin), out=out)
    return rc, out.getvalue()


def test_greedy_completion_equals_full_forward_decoding(record):
    """With temperature 0 the streamed text is the prompt plus the tokens that argmax over full forwards of the
    growing sequence picks (the cached decoding agrees with recomputing everything)."""
    rc, text = run_cli([str(record), "--prompt", "The devil", "--temperature=0", "--max_new_tokens=6"])
    assert rc == 0
    ck = tg.load_checkpoint(record)
    model = tg.model_from_checkpoint(ck, "cpu")
    from data.shards import gpt2_encoding
    enc = gpt2_encoding()
    seq = [EOT_ID] + enc.encode_ordinary("The devil")
    window = torch.tensor(tg.window_blocks_at(model.a.num_iterations, model.a), dtype=torch.int32)
    new = []
    with torch.no_grad():
        for _ in range(6):
            # padded to whole mask blocks; causal, so the padding leaves position len(seq)-1 alone
            padded = torch.tensor(seq + [0] * (-len(seq) % model.a.block_size))
            nxt = int(model.logits(padded, window, True)[0, len(seq) - 1, :model.a.vocab_size].argmax())
            if nxt == EOT_ID:
                break
            seq.append(nxt)
            new.append(nxt)
    assert text == "The devil" + enc.decode(new) + "\n"


def test_interactive_mode_completes_each_line(record):
    rc, text = run_cli([str(record), "--max_new_tokens=3", "--seed=1"], stdin="Hello\nA lawyer\n")
    lines = text.split("\n")
    assert rc == 0 and len(lines) == 3 and lines[0].startswith("Hello") and lines[1].startswith("A lawyer")


def test_errors_name_the_problem(record, tmp_path, capsys):
    assert run_cli([str(tmp_path / "nowhere")])[0] == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert run_cli([str(tmp_path)])[0] == 2
    assert "--save_checkpoint" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"junk")
    assert run_cli([str(tmp_path / "x.pt")])[0] == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.parse_args([str(record), "--top_p=0"])
    assert "--top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mamba_decoding_state_does_not_grow_with_length(kind):
    model = random_model(args(**MIXERS[kind]))
    assert generate.state_bytes(tg.DecodeState(model, 16)) == generate.state_bytes(tg.DecodeState(model, 4096))
    attention = random_model(args())
    assert (generate.state_bytes(tg.DecodeState(attention, 4096))
            > 100 * generate.state_bytes(tg.DecodeState(attention, 16)) / 2)
