"""Token shards in the speedrun format, and the offline GPT-2 tokenizer.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by `count` uint16 token ids. FineWeb shards from kjj0/fineweb10B-gpt2 use this format, and so
do the shards that `data/prepare.py` writes.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT_ID = 50256  # <|endoftext|>, placed before every document
GPT2_VOCAB_SIZE = 50257

DATA_DIR = Path(__file__).resolve().parent
GPT2_RANKS_FILE = DATA_DIR / "gpt2.tiktoken"
# tiktoken's r50k / gpt2 split pattern
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class ShardError(ValueError):
    """A shard file that cannot be used; the message names the file and the fix."""


def gpt2_encoding():
    """GPT-2 BPE built from the ranks file shipped in data/ (identical to tiktoken's "gpt2";
    no network: tiktoken's own loader would try to download it)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(GPT2_RANKS_FILE))
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_ID})


def write_shard(path: str | os.PathLike, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"tokens for {path} must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)  # never leave a half-written shard behind


def check_shard(path: str | os.PathLike, fix: str = "") -> int:
    """Validate one shard's header and size without reading its tokens; returns its token count.
    Every defect raises ShardError naming the file, what is wrong and `fix` (the command that rebuilds
    or downloads it)."""
    hint = f" Fix: {fix}" if fix else ""
    path = str(path)
    if not os.path.isfile(path):
        raise ShardError(f"shard {path} does not exist.{hint}")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header "
                         f"(truncated download?).{hint}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"shard {path} has magic {header[0]}, expected {MAGIC}: not a token shard.{hint}")
    if header[1] != VERSION:
        raise ShardError(f"shard {path} has version {header[1]}, expected {VERSION}.{hint}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(f"shard {path} header says {count} tokens ({expected} bytes) but the file has {size} "
                         f"bytes (truncated or corrupt).{hint}")
    return count


def read_shard(path: str | os.PathLike, vocab_size: int = GPT2_VOCAB_SIZE, fix: str = "") -> np.ndarray:
    """Read and validate one shard (check_shard, then every token id below vocab_size); returns its
    uint16 tokens."""
    hint = f" Fix: {fix}" if fix else ""
    count = check_shard(path, fix)
    tokens = np.fromfile(str(path), dtype="<u2", count=count, offset=HEADER_BYTES)
    if count and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"shard {path} has token id {int(tokens[bad])} at position {bad}, outside the "
                         f"vocabulary [0, {vocab_size}).{hint}")
    return tokens


def shard_files(pattern: str, fix: str = "") -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        hint = f" Fix: {fix}" if fix else ""
        raise ShardError(f"no shard files match {pattern!r}.{hint}")
    return files
