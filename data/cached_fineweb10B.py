"""Download the GPT-2-tokenized FineWeb10B shards used by the speedrun.

    python data/cached_fineweb10B.py 8     # val shard + 8 train shards (800M tokens, enough for a record run)

Files land in data/fineweb10B/; files already present (and valid) are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.shards import ShardError, read_shard  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
LOCAL_DIR = Path(__file__).resolve().parent / "fineweb10B"


def shard_names(num_train: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("num_train_shards", type=int, nargs="?", default=8,
                    help="train shards of 100M tokens each (the full set has 103)")
    ap.add_argument("--local_dir", default=str(LOCAL_DIR))
    args = ap.parse_args(argv)
    if not 0 <= args.num_train_shards <= 103:
        ap.error(f"num_train_shards must be in [0, 103], got {args.num_train_shards}")
    from huggingface_hub import hf_hub_download
    from tqdm import tqdm

    os.makedirs(args.local_dir, exist_ok=True)
    names = shard_names(args.num_train_shards)
    for name in tqdm(names, desc="fineweb10B shards", unit="shard"):
        path = os.path.join(args.local_dir, name)
        if os.path.exists(path):
            try:
                read_shard(path)
                continue
            except ShardError as e:
                tqdm.write(f"re-downloading {name}: {e}")
                os.remove(path)
        hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=args.local_dir)
    print(f"{len(names)} shards in {args.local_dir}")


if __name__ == "__main__":
    main()
