"""The wheel built from pyproject.toml: only `mamba_kernels`, installable next to Hugging Face's `kernels`.

Nothing here downloads: the wheel is built with the setuptools of the running environment, the fresh virtual
environment reaches torch through a .pth file pointing at this environment's site-packages, and Hugging
Face's `kernels` wheel comes from .cache/wheels (setup.sh downloads it there).
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
HF_WHEEL_DIR = REPO_DIR / ".cache" / "wheels"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def run(cmd, cwd, timeout=120):
    # PYTHONPATH is dropped so that neither the repository nor the caller's paths leak into the fresh venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds from a copy of the sources so the build leaves no build/ or egg-info in the repository."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_DIR / name, src / name)
    shutil.copytree(REPO_DIR / "kernels", src / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    run(PIP + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "dist"), str(src)],
        cwd=work)
    (built,) = (work / "dist").glob("mamba_kernels-*.whl")
    return built


def test_wheel_holds_only_mamba_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    dist_info = [t for t in top_level if t.endswith(".dist-info")]
    assert top_level == {"mamba_kernels", *dist_info} and len(dist_info) == 1, top_level
    # every module of kernels/ is shipped under the new name (a sub-package missing from pyproject.toml fails)
    expected = {"mamba_kernels/" + p.relative_to(REPO_DIR / "kernels").as_posix()
                for p in (REPO_DIR / "kernels").rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= set(names), sorted(expected - set(names))
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/METADATA").decode()
    requires = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert requires == ["torch>=2.6", 'triton; sys_platform == "linux"'], requires


@pytest.fixture(scope="module")
def venv_with_both(wheel, tmp_path_factory):
    hf_wheels = sorted(HF_WHEEL_DIR.glob("kernels-*.whl"))
    if not hf_wheels:
        pytest.skip(f"Hugging Face's kernels wheel is not cached in {HF_WHEEL_DIR}: run ./setup.sh "
                    "(pip download kernels --no-deps -d .cache/wheels)")
    venv = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent)
    python = venv / "bin" / "python"
    site_dir = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=venv.parent).strip())
    # torch and the other dependencies come from this environment, after the venv's own site-packages
    # (addsitedir also runs that directory's .pth files, as its own interpreter would)
    torch_site = Path(torch.__file__).resolve().parent.parent
    (site_dir / "_dependencies.pth").write_text(f"import site; site.addsitedir({str(torch_site)!r})\n")
    run(PIP + ["--python", str(python), "install", "--no-deps", "--no-index", str(wheel), str(hf_wheels[-1])],
        cwd=venv.parent)
    return python, site_dir


def run_in_venv(venv_with_both, code, cwd):
    python, site_dir = venv_with_both
    return run([str(python), "-c", textwrap.dedent(code), str(site_dir)], cwd=cwd)


def test_both_import_from_the_fresh_venv(venv_with_both, tmp_path):
    out = run_in_venv(venv_with_both, """
        import sys
        from pathlib import Path
        import torch
        import kernels
        from kernels import get_kernel
        import mamba_kernels
        from mamba_kernels import selective_scan_fn, selective_scan_ref
        from mamba_kernels.compat import install_mamba_ssm_aliases

        site_dir = Path(sys.argv[1])
        for module in (kernels, mamba_kernels):
            assert Path(module.__file__).is_relative_to(site_dir), (module.__name__, module.__file__)
        assert callable(get_kernel) and not hasattr(kernels, "selective_scan_fn")
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(2, 3, 5, generator=g), torch.rand(2, 3, 5, generator=g)
        A, B, C = -torch.rand(3, 4, generator=g), torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
        out = selective_scan_fn(u, delta, A, B, C, backend="torch")
        torch.testing.assert_close(out, selective_scan_ref(u, delta, A, B, C))
        print("ok", kernels.__name__, mamba_kernels.__name__)
    """, cwd=tmp_path)
    assert out.strip() == "ok kernels mamba_kernels"


def test_transformers_model_imports_next_to_both(venv_with_both, tmp_path):
    """The collision the rename removes: transformers imports Hugging Face's `kernels` when it is installed;
    and the installed compat layer serves mamba_ssm to transformers' Mamba2."""
    pytest.importorskip("transformers", reason="transformers is not installed in this environment")
    out = run_in_venv(venv_with_both, """
        import torch
        import mamba_kernels
        from mamba_kernels.compat import install_mamba_ssm_aliases
        assert install_mamba_ssm_aliases() == ["causal_conv1d", "mamba_ssm"]
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        assert mamba_chunk_scan_combined is mamba_kernels.mamba_chunk_scan_combined
        from transformers import Mamba2Config, Mamba2ForCausalLM
        config = Mamba2Config(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_size=4, head_dim=4,
                              num_heads=4, n_groups=1, chunk_size=4)
        logits = Mamba2ForCausalLM(config)(torch.arange(6)[None]).logits
        assert logits.shape == (1, 6, 16) and bool(logits.isfinite().all())
        print("ok")
    """, cwd=tmp_path)
    assert out.strip() == "ok", out
