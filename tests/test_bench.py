"""kernels.bench: the CLI contract the GPU check relies on (`--preset tiny --json PATH` writes a list of
well-formed rows), the `--traffic` mode (prints without running anything), and the peers helpers."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO_DIR
from kernels.bench import main
from kernels.bench.peers import fitted_exponent

ROW_KEYS = {"op", "shape", "dtype", "impl", "fwd_bytes", "fwdbwd_bytes", "copy_gbs", "device", "torch", "command"}
MEASURED_KEYS = {"fwd_ms", "fwdbwd_ms", "fwd_gbs", "fwdbwd_gbs", "fwd_copy_share", "fwdbwd_copy_share", "peak_mib",
                 "saved_mib", "fwd_err", "grad_err", "ref_impl"}


def test_tiny_preset_writes_well_formed_rows(tmp_path, capsys):
    path = tmp_path / "rows.json"
    main(["--preset", "tiny", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    assert {r["op"] for r in rows} == {"selective_scan", "ssd", "ssd docs=2"}
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["fwdbwd_bytes"] > r["fwd_bytes"] > 0
        if "skipped" in r:
            continue
        assert MEASURED_KEYS <= set(r), r
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert math.isclose(r["fwd_gbs"], r["fwd_bytes"] / r["fwd_ms"] / 1e6)
        assert math.isclose(r["fwd_copy_share"], r["fwd_gbs"] / r["copy_gbs"])
        # fp32 against a float64 run: rounding-level errors (an O(1) error means a broken impl)
        assert r["fwd_err"] < 1e-4 and r["grad_err"] < 1e-4, r
    assert {"torch", "ref"} <= {r["impl"] for r in rows}
    assert "selective_scan (batch, dim, L, N)" in capsys.readouterr().out


def test_traffic_mode_prints_without_running(tmp_path):
    """Runs as the CLI does, in a subprocess; without kernels/ssd/traffic.py it says so instead of failing."""
    res = subprocess.run([sys.executable, "-m", "kernels.bench", "--traffic", "--preset", "gpu"], cwd=REPO_DIR,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "SSD memory traffic per kernel" in res.stdout
    assert "(8, 2048, 24, 64, 128, 1, 256)" in res.stdout
    assert ("ours / mamba_ssm" in res.stdout) or ("not available yet" in res.stdout)
    assert "fwd ms" not in res.stdout  # nothing was timed


@pytest.mark.parametrize("k", [1.0, 1.3, 2.0])
def test_fitted_exponent_recovers_power_law(k):
    lengths = [64, 256, 1024, 4096]
    assert abs(fitted_exponent(lengths, [3.0 * L ** k for L in lengths]) - k) < 1e-9
