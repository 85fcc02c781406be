"""Tokenize text files into speedrun-format shards (GPT-2 BPE, <|endoftext|> before each document).

    python data/prepare.py --out_dir data/devil_jargon data/devil_jargon.txt
    python data/prepare.py --out_dir data/mycorpus --name mycorpus --split file docs/*.txt

Documents: with --split file each input file is one document; with --split paragraphs (the default)
blank-line-separated paragraphs are packed into documents of at least --min_doc_chars characters.
Documents are assigned to val with probability --val_fraction (seeded, so the split is reproducible);
at least one goes to each side. Output: {name}_val_000000.bin and {name}_train_000000.bin, ... with at
most --shard_tokens tokens per shard. Works offline: the GPT-2 ranks ship in data/gpt2.tiktoken.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.shards import EOT_ID, gpt2_encoding, write_shard  # noqa: E402

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "devil_jargon.txt"
EMBEDDED_OUT_DIR = Path(__file__).resolve().parent / "devil_jargon"


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


def prepare(inputs, out_dir, name=None, split="paragraphs", min_doc_chars=3000, val_fraction=0.05,
            shard_tokens=100_000_000, seed=1337, quiet=False) -> dict:
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input text file {p} does not exist")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or out_dir.name
    docs = []
    for p in inputs:
        docs += split_documents(p.read_text(encoding="utf-8", errors="replace"), split, min_doc_chars)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents for a train/val split, got {len(docs)} from {inputs}; "
                         f"use --split paragraphs or more files")
    rng = random.Random(seed)
    is_val = [rng.random() < val_fraction for _ in docs]
    if not any(is_val):
        is_val[-1] = True
    if all(is_val):
        is_val[0] = False
    enc = gpt2_encoding()
    out = {"train": [], "val": []}
    counts = {"train": 0, "val": 0, "docs_train": 0, "docs_val": 0}
    encoded = enc.encode_ordinary_batch(docs)
    for toks, v in zip(encoded, is_val):
        key = "val" if v else "train"
        out[key].append(np.array([EOT_ID] + toks, dtype=np.uint16))
        counts["docs_" + key] += 1
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


def prepare_embedded(quiet=False) -> dict:
    """The demo corpus that ships in the repo (public-domain Devil's Dictionary + Jargon File)."""
    return prepare([EMBEDDED_CORPUS], EMBEDDED_OUT_DIR, name="devil_jargon", quiet=quiet)


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
    args = ap.parse_args(argv)
    if not args.inputs:
        return prepare_embedded()
    if args.out_dir is None:
        ap.error("--out_dir is required when input files are given")
    return prepare(args.inputs, args.out_dir, args.name, args.split, args.min_doc_chars, args.val_fraction,
                   args.shard_tokens, args.seed)


if __name__ == "__main__":
    main()
