"""The README's GPU results, rendered from the latest tools/gpu_check.py record.

    python tools/gpu_results.py                 # markdown on stdout, from records/gpu/*/summary.md
    python tools/gpu_results.py --root DIR

Folders are named <date>_<device>, so the latest is the last by name; dry-run folders are ignored. Without
any record it says plainly that no GPU measurement exists yet.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
NO_RESULTS = ("No GPU measurement exists yet: every number in this README was measured on a CPU. "
              "`python tools/gpu_check.py` on a CUDA machine writes the first records/gpu/ folder "
              "(see \"GPU check\").")


def latest_record(root: Path) -> Path | None:
    runs = sorted(p.parent for p in root.glob("*/summary.md") if "dryrun" not in p.parent.name)
    return runs[-1] if runs else None


def render(root: Path, heading_level: int = 3) -> str:
    """Markdown for the README: the latest summary.md with its headings moved under heading_level."""
    record = latest_record(root)
    if record is None:
        return NO_RESULTS + "\n"
    body = (record / "summary.md").read_text()
    shift = "#" * (heading_level - 1)
    body = re.sub(r"^(#+) ", lambda m: shift + m.group(1) + " ", body, flags=re.MULTILINE)
    where = record.relative_to(REPO_DIR) if record.is_relative_to(REPO_DIR) else record
    return f"From `{where}/` (written by `tools/gpu_check.py`; JSON per stage and the console log beside it).\n\n{body}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO_DIR / "records" / "gpu"))
    ap.add_argument("--heading_level", type=int, default=3, help="level of the record's top heading")
    args = ap.parse_args(argv)
    sys.stdout.write(render(Path(args.root), args.heading_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
