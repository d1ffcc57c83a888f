"""The GPU benchmark scripts run their own code path on CPU (tiny shapes; timings meaningless), so a
GPU session finds them working: benchmarks/kernels.py --cpu-dry-run, gpu_check3d.py --cpu-smoke."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=600)


def _table_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if re.match(r"\| *\d", line)]


def test_kernels_benchmark_dry_run_writes_a_table(tmp_path):
    out = tmp_path / "kernels.md"
    proc = _run("kernels.py", "--cpu-dry-run", "--output", str(out), "--batches", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_table_rows(out.read_text())) >= 2  # one row per path and case


def test_kernels_benchmark_keeps_dry_timings_out_of_results():
    proc = _run("kernels.py", "--cpu-dry-run")
    assert proc.returncode == 2 and "--cpu-dry-run needs --output" in proc.stderr


@pytest.mark.slow  # about 15 s on 2 shared cores: a tiny 3D case, 6 timed steps
def test_gpu_check3d_smoke_writes_every_row(tmp_path):
    out = tmp_path / "gpu_check3d.md"
    proc = _run("gpu_check3d.py", "--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(out.read_text())
    assert len(rows) == 6  # K = 1, 2 and one full-DC step, bf16 off and on
    assert all("nan" not in row for row in rows)
    assert _run("gpu_check3d.py", "--cpu-smoke").returncode == 2  # smoke timings never land in results/
