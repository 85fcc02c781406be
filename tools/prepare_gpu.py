"""Fill .carry/ (git-ignored) with everything tools/gpu_check.py needs on a GPU machine without network.

    python tools/prepare_gpu.py                         # on a machine with network, before the GPU call
    python tools/prepare_gpu.py --corpus PATH --max_total_mib 60

Writes:
  .carry/wheels/          pure-Python wheels of the peers (pip download --no-deps): fla-core and
                          flash-linear-attention, mambapy, einops; installed offline by gpu_check.py
  .carry/mamba_ssm/       mamba_ssm's Triton kernels from its PyPI sdist: mamba_ssm/ops/triton/ and the two
                          utils modules they import, with empty package __init__ files (the real ones import
                          the compiled CUDA extension); LICENSE kept
  .carry/corpus/          the 12M-token corpus shards (speedrun format), checked against SHA256SUMS; if the
                          whole tree would pass --max_total_mib, a prefix of the train shard (header rewritten)
  .carry/MANIFEST.json    what is there, versions, sizes, checksums
Then it installs the wheels into a temporary folder and imports them, so a broken download shows here.
Prints the size of .carry and of everything a device call sends (tracked and untracked-not-ignored files
plus .carry), which must stay under 64 MiB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
# Pinned so that a GPU record names exactly what it compared against; --latest takes PyPI's newest.
WHEELS = {"fla-core": "0.6.0", "flash-linear-attention": "0.6.0", "mambapy": "1.2.0", "einops": "0.8.2"}
MAMBA_SSM_VERSION = "2.3.2.post1"
# what mamba_ssm/ops/triton/*.py import from the rest of the package
MAMBA_SSM_UTILS = ("utils/__init__.py", "utils/determinism.py", "utils/torch.py")
# import names gpu_check.py tries before installing a wheel (distribution -> module)
IMPORT_NAMES = {"fla-core": "fla", "flash-linear-attention": "fla.layers", "mambapy": "mambapy", "einops": "einops"}
SHARD_HEADER_INTS = 256  # speedrun shard: 256 int32 (magic 20240520, version 1, token count), then uint16 tokens
CARRY_LIMIT_MIB = 64


def mib(n: int) -> float:
    return n / 2**20


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def travelling_bytes() -> int:
    """Bytes of tracked and untracked-not-ignored files: what a device call sends besides carried folders."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO_DIR, capture_output=True,
                         check=True).stdout.decode()
    return sum((REPO_DIR / f).stat().st_size for f in out.split("\0") if f and (REPO_DIR / f).is_file())


def pypi_release(name: str, version: str | None) -> tuple[str, list]:
    """(version, files) of one release (the newest if version is None), from PyPI's project JSON."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
        meta = json.load(r)
    version = version or meta["info"]["version"]
    if version not in meta["releases"]:
        raise SystemExit(f"{name} {version} is not on PyPI")
    return version, meta["releases"][version]


def download_wheels(dest: Path, latest: bool) -> dict:
    dest.mkdir(parents=True)
    specs = [name if latest else f"{name}=={version}" for name, version in WHEELS.items()]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "py", "-d", str(dest), *specs], check=True)
    return {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


def fetch_mamba_ssm(dest: Path, latest: bool) -> str:
    """mamba_ssm's sdist straight from PyPI (its build needs CUDA, so no pip), pruned to the Triton kernels."""
    version, files = pypi_release("mamba-ssm", None if latest else MAMBA_SSM_VERSION)
    sdist = next(f for f in files if f["packagetype"] == "sdist")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / sdist["filename"]
        with urllib.request.urlopen(sdist["url"], timeout=120) as r:
            archive.write_bytes(r.read())
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sdist["digests"]["sha256"]:
            raise SystemExit(f"{sdist['filename']}: sha256 {digest} != PyPI's {sdist['digests']['sha256']}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("mamba_ssm-*/mamba_ssm"))
        pkg = dest / "mamba_ssm"
        shutil.copytree(src / "ops" / "triton", pkg / "ops" / "triton")
        for rel in MAMBA_SSM_UTILS:
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, pkg / rel)
        note = "# pruned copy for tools/gpu_check.py: the real __init__ imports mamba_ssm's compiled CUDA extension\n"
        (pkg / "__init__.py").write_text(note)
        (pkg / "ops" / "__init__.py").write_text(note)
        license_file = next(src.parent.glob("LICENSE*"), None)
        if license_file:
            shutil.copy(license_file, dest / license_file.name)
    return version


def read_sha256sums(corpus: Path) -> dict:
    """{file name: sha256} from SHA256SUMS beside or above the corpus folder, if any."""
    for sums in (corpus / "SHA256SUMS", corpus.parent / "SHA256SUMS"):
        if sums.is_file():
            return {Path(line.split()[1]).name: line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
    return {}


def write_prefix_shard(src: Path, dst: Path, keep_bytes: int) -> int:
    """The first tokens of a shard (whole file at most keep_bytes), with the header's count rewritten."""
    header = np.fromfile(src, dtype=np.int32, count=SHARD_HEADER_INTS)
    tokens = (keep_bytes - 4 * SHARD_HEADER_INTS) // 2
    if tokens < 1:
        raise SystemExit(f"no room left for {src.name}: raise --max_total_mib")
    header[2] = min(int(header[2]), tokens)
    body = np.fromfile(src, dtype=np.uint16, count=int(header[2]), offset=4 * SHARD_HEADER_INTS)
    with open(dst, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())
    return int(header[2])


def copy_corpus(corpus: Path, dest: Path, room_bytes: int) -> dict:
    """Copy the val and train shards (val first: small and needed whole); truncate train to fit room_bytes."""
    dest.mkdir(parents=True)
    sums = read_sha256sums(corpus)
    shards = sorted(corpus.glob("*_val_*.bin")) + sorted(corpus.glob("*_train_*.bin"))
    if not shards:
        raise SystemExit(f"no *_train_*.bin / *_val_*.bin shards in {corpus}")
    info = {}
    for src in shards:
        if src.name in sums and hashlib.sha256(src.read_bytes()).hexdigest() != sums[src.name]:
            raise SystemExit(f"{src}: checksum differs from SHA256SUMS")
        size = src.stat().st_size
        if size <= room_bytes:
            shutil.copy(src, dest / src.name)
            info[src.name] = dict(bytes=size, tokens=int(np.fromfile(src, np.int32, SHARD_HEADER_INTS)[2]), whole=True)
        elif "_train_" in src.name:
            tokens = write_prefix_shard(src, dest / src.name, room_bytes)
            info[src.name] = dict(bytes=(dest / src.name).stat().st_size, tokens=tokens, whole=False)
        else:
            raise SystemExit(f"{src.name} ({mib(size):.1f} MiB) does not fit: raise --max_total_mib")
        room_bytes -= info[src.name]["bytes"]
    return info


def check_offline_install(wheels: Path, mamba_dir: Path) -> list[str]:
    """Install the wheels with pip --no-index into a temporary folder and import each; import mamba_ssm's SSD."""
    problems = []
    with tempfile.TemporaryDirectory() as site:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", site,
                        *map(str, sorted(wheels.glob("*.whl")))], check=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(mamba_dir)]))
        for module in list(IMPORT_NAMES.values()) + ["mamba_ssm.ops.triton.ssd_combined"]:
            r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
            status = "imports" if r.returncode == 0 else f"does not import here: {r.stderr.strip().splitlines()[-1]}"
            print(f"  {module}: {status}")
            if r.returncode:
                problems.append(module)
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_DIR / ".carry"), help="folder to fill (replaced); must be git-ignored")
    ap.add_argument("--corpus", default=str(REPO_DIR.parent / "shared" / "data" / "corpus"),
                    help="folder with the *_train_*.bin / *_val_*.bin shards")
    ap.add_argument("--max_total_mib", type=float, default=60.0,
                    help=f"cap on everything a device call sends (its limit is {CARRY_LIMIT_MIB} MiB)")
    ap.add_argument("--latest", action="store_true", help="PyPI's newest versions instead of the pinned ones")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=REPO_DIR).returncode == 0
    if not ignored:
        print(f"WARNING: {out} is not git-ignored: it would travel with the working tree and could be committed")
    print(f"wheels -> {out / 'wheels'}")
    wheels = download_wheels(out / "wheels", args.latest)
    for name, size in wheels.items():
        print(f"  {name}: {mib(size):.2f} MiB")
    print(f"mamba_ssm Triton kernels -> {out / 'mamba_ssm'}")
    mamba_version = fetch_mamba_ssm(out / "mamba_ssm", args.latest)
    print(f"  mamba_ssm {mamba_version}: {mib(tree_bytes(out / 'mamba_ssm')):.2f} MiB")
    room = int(args.max_total_mib * 2**20) - travelling_bytes() - tree_bytes(out) - 4096  # 4 KiB for the manifest
    print(f"corpus {args.corpus} -> {out / 'corpus'} (room {mib(room):.1f} MiB)")
    corpus = copy_corpus(Path(args.corpus), out / "corpus", room)
    for name, c in corpus.items():
        print(f"  {name}: {c['tokens']:,} tokens, {mib(c['bytes']):.2f} MiB{'' if c['whole'] else ' (prefix)'}")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO_DIR, capture_output=True, text=True).stdout.strip()  # noqa: E731
    # the device machine may get the working tree without .git: gpu_check.py reports this commit then
    manifest = dict(wheels=wheels, import_names=IMPORT_NAMES, mamba_ssm=mamba_version, corpus=corpus,
                    corpus_source=str(Path(args.corpus).resolve()), git_commit_at_preparation=git("rev-parse", "HEAD"))
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    print("offline install check:")
    problems = check_offline_install(out / "wheels", out / "mamba_ssm")
    carry, total = tree_bytes(out), tree_bytes(out) + travelling_bytes()
    print(f"\n.carry: {mib(carry):.1f} MiB; with the working tree a device call sends {mib(total):.1f} MiB "
          f"(limit {CARRY_LIMIT_MIB} MiB)")
    print(f"next: on the GPU machine, carry {out.relative_to(REPO_DIR) if out.is_relative_to(REPO_DIR) else out} "
          f"and run: python3 tools/gpu_check.py")
    if problems:
        print(f"note: {', '.join(problems)} did not import on this machine (they may still import on the GPU machine)")
    return 1 if total > CARRY_LIMIT_MIB * 2**20 else 0


if __name__ == "__main__":
    sys.exit(main())
