"""Tokenize text files into speedrun-format shards (GPT-2 BPE, <|endoftext|> before each document).

    python data/prepare.py                                            # the embedded demo corpus
    python data/prepare.py --out_dir data/mycorpus --name mycorpus --split file docs/*.txt
    python data/prepare.py --out_dir data/mycorpus --replace more_docs/*.txt   # rebuild with other inputs

Documents: with --split file each input file is one document; with --split paragraphs (the default)
blank-line-separated paragraphs are packed into documents of at least --min_doc_chars characters.
Documents are assigned to val with probability --val_fraction (seeded, so the split is reproducible);
at least one goes to each side. Output: {name}_val_000000.bin and {name}_train_000000.bin, ... with at
most --shard_tokens tokens per shard, and {name}_build.json (the inputs' SHA-256 and the settings).
Works offline: the GPT-2 ranks ship in data/gpt2.tiktoken.

One folder holds one build: if it already holds shards of other inputs, other settings or another
name, prepare.py refuses (a glob over the folder would mix the corpora) unless --replace is given,
which deletes every old shard there first. Re-running the same build rewrites it. Input bytes that
are not UTF-8 are replaced by U+FFFD with a warning and a count; a file that is mostly not text
(over MAX_NON_TEXT_FRACTION of its characters invalid or control characters) is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.shards import EOT_ID, gpt2_encoding, write_shard  # noqa: E402

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "devil_jargon.txt"
EMBEDDED_OUT_DIR = Path(__file__).resolve().parent / "devil_jargon"
# Measured fractions of invalid + control characters: random bytes and a PNG 0.55, UTF-16 text 0.50 (NULs),
# accent-heavy French in Latin-1 0.17 (every accented letter one invalid byte), UTF-8 text about 0.
MAX_NON_TEXT_FRACTION = 0.3
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # not tab, newline, form feed, CR
SHARD_PATTERN = re.compile(r"(?P<name>.+)_(?:train|val)_\d{6}\.bin")
MANIFEST_SUFFIX = "_build.json"


def split_documents(text: str, mode: str, min_doc_chars: int) -> list[str]:
    if mode == "file":
        return [text] if text.strip() else []
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, current, length = [], [], 0
    for p in paragraphs:
        current.append(p)
        length += len(p)
        if length >= min_doc_chars:
            docs.append("\n\n".join(current))
            current, length = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def decode_text(path: Path, raw: bytes, quiet: bool = False) -> str:
    """UTF-8 text of one input file; warns with a count of undecodable sequences, refuses binary data."""
    text = raw.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - raw.count("\ufffd".encode())  # U+FFFD that were in the file are text
    control = len(CONTROL_CHARS.findall(text))
    if text and (invalid + control) / len(text) > MAX_NON_TEXT_FRACTION:
        raise ValueError(f"input {path} is mostly not text: {invalid} invalid UTF-8 sequences and {control} control "
                         f"characters in {len(text):,} characters (over {MAX_NON_TEXT_FRACTION:.0%}); is it a binary "
                         f"file or UTF-16? Convert it to UTF-8 text first")
    if invalid and not quiet:
        print(f"warning: {path} has {invalid:,} byte sequences that are not valid UTF-8; they are tokenized as "
              f"U+FFFD (re-encode the file to UTF-8 to keep them)", file=sys.stderr)
    return text


def validate_settings(name, split, min_doc_chars, val_fraction, shard_tokens, seed) -> None:
    def check(cond, msg):
        if not cond:
            raise ValueError(msg)

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    check(isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None,
          f"--name must be letters, digits, '.', '_' or '-' (it prefixes the shard files and the trainer's glob), "
          f"got {name!r}")
    check(split in ("paragraphs", "file"), f"--split must be 'paragraphs' or 'file', got {split!r}")
    check(is_int(min_doc_chars) and min_doc_chars >= 1, f"--min_doc_chars must be an integer >= 1, got {min_doc_chars!r}")
    check(isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1,
          f"--val_fraction must be in (0, 1), got {val_fraction!r}")
    check(is_int(shard_tokens) and shard_tokens >= 1, f"--shard_tokens must be an integer >= 1, got {shard_tokens!r}")
    check(is_int(seed), f"--seed must be an integer, got {seed!r}")


def existing_shards(out_dir: Path) -> dict[str, list[Path]]:
    """Shard files already in out_dir, by build name."""
    found: dict[str, list[Path]] = {}
    if out_dir.is_dir():
        for p in sorted(out_dir.iterdir()):
            m = SHARD_PATTERN.fullmatch(p.name)
            if m and p.is_file():
                found.setdefault(m["name"], []).append(p)
    return found


def read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def clear_old_build(out_dir: Path, name: str, build_id: str, replace: bool, quiet: bool) -> None:
    """Refuse a folder that holds another build's shards (unless replace); then delete every old shard
    that the new build would not overwrite exactly, so no stale shard survives next to the new ones."""
    shards = existing_shards(out_dir)
    same = shards.get(name) and (read_manifest(out_dir / f"{name}{MANIFEST_SUFFIX}") or {}).get("build_id") == build_id
    others = {n: files for n, files in shards.items() if not (n == name and same)}
    if others and not replace:
        listing = ", ".join(f"{n} ({len(f)} shards)" for n, f in others.items())
        raise ValueError(f"--out_dir {out_dir} already holds shards of another build: {listing} (other inputs, "
                         f"settings or name). Writing {name!r} next to them would let a glob over the folder mix two "
                         f"corpora. Use another --out_dir, or pass --replace to delete those shards first")
    removed = 0
    for n, files in shards.items():
        for f in files:
            f.unlink()
            removed += 1
        (out_dir / f"{n}{MANIFEST_SUFFIX}").unlink(missing_ok=True)
    if removed and not quiet:
        print(f"removed {removed} old shard files from {out_dir}")


def prepare(inputs, out_dir, name=None, split="paragraphs", min_doc_chars=3000, val_fraction=0.05,
            shard_tokens=100_000_000, seed=1337, quiet=False, replace=False) -> dict:
    """Every argument and input is checked before anything is written (ValueError / FileNotFoundError
    naming the flag or file)."""
    inputs = [Path(p) for p in inputs]
    out_dir = Path(out_dir)
    name = name or out_dir.resolve().name
    validate_settings(name, split, min_doc_chars, val_fraction, shard_tokens, seed)
    if not inputs:
        raise ValueError("no input files given")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out_dir {out_dir} exists and is not a folder")
    raws = []
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input text file {p} does not exist")
        raws.append(p.read_bytes())
    texts = [decode_text(p, raw, quiet) for p, raw in zip(inputs, raws)]
    docs = [d for text in texts for d in split_documents(text, split, min_doc_chars)]
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a train/val split, got {len(docs)} from "
                         f"{[str(p) for p in inputs]}; use --split paragraphs or more files")
    settings = dict(name=name, split=split, min_doc_chars=int(min_doc_chars), val_fraction=float(val_fraction),
                    shard_tokens=int(shard_tokens), seed=int(seed))
    input_hashes = [hashlib.sha256(raw).hexdigest() for raw in raws]
    build_id = hashlib.sha256(json.dumps([input_hashes, settings], sort_keys=True).encode()).hexdigest()

    rng = random.Random(seed)
    is_val = [rng.random() < val_fraction for _ in docs]
    if not any(is_val):
        is_val[-1] = True
    if all(is_val):
        is_val[0] = False
    enc = gpt2_encoding()
    out = {"train": [], "val": []}
    counts = {"train": 0, "val": 0, "docs_train": 0, "docs_val": 0}
    for toks, v in zip(enc.encode_ordinary_batch(docs), is_val):
        key = "val" if v else "train"
        out[key].append(np.array([EOT_ID] + toks, dtype=np.uint16))
        counts["docs_" + key] += 1

    out_dir.mkdir(parents=True, exist_ok=True)
    clear_old_build(out_dir, name, build_id, replace, quiet)
    manifest = dict(build_id=build_id, inputs=[dict(path=str(p.resolve()), bytes=len(raw), sha256=h)
                                               for p, raw, h in zip(inputs, raws, input_hashes)], **settings)
    # the manifest goes first, so an interrupted build is recognised as this build and rewritten on re-run
    (out_dir / f"{name}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=1))
    written = []
    for key in ("val", "train"):
        tokens = np.concatenate(out[key])
        counts[key] = int(tokens.size)
        for i, start in enumerate(range(0, tokens.size, shard_tokens)):
            path = out_dir / f"{name}_{key}_{i:06d}.bin"
            write_shard(path, tokens[start:start + shard_tokens])
            written.append(str(path))
    if not quiet:
        print(f"prepared {counts['docs_train']} train docs ({counts['train']:,} tokens) and "
              f"{counts['docs_val']} val docs ({counts['val']:,} tokens) -> {', '.join(written)}")
    return counts


def prepare_embedded(quiet=False, **settings) -> dict:
    """The demo corpus that ships in the repo (public-domain Devil's Dictionary + Jargon File). Its folder
    belongs to it, so a rebuild replaces whatever shards are there."""
    return prepare([EMBEDDED_CORPUS], EMBEDDED_OUT_DIR, name="devil_jargon", quiet=quiet, replace=True, **settings)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="text files (default: the embedded demo corpus)")
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--name", default=None, help="shard file prefix (default: the out_dir's name)")
    ap.add_argument("--split", choices=["paragraphs", "file"], default="paragraphs")
    ap.add_argument("--min_doc_chars", type=int, default=3000)
    ap.add_argument("--val_fraction", type=float, default=0.05)
    ap.add_argument("--shard_tokens", type=int, default=100_000_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--replace", action="store_true",
                    help="delete the shards of another build in --out_dir instead of refusing")
    args = ap.parse_args(argv)
    if not args.inputs:
        if args.out_dir is not None or args.name is not None:
            ap.error("--out_dir/--name need input files (without inputs the embedded demo corpus is built)")
    elif args.out_dir is None:
        ap.error("--out_dir is required when input files are given")
    settings = dict(split=args.split, min_doc_chars=args.min_doc_chars, val_fraction=args.val_fraction,
                    shard_tokens=args.shard_tokens, seed=args.seed)
    try:
        if not args.inputs:
            return prepare_embedded(**settings)
        return prepare(args.inputs, args.out_dir, args.name, replace=args.replace, **settings)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"prepare.py: {e}") from None


if __name__ == "__main__":
    main()
