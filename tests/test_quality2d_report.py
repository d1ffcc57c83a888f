"""benchmarks/quality2d.py's bookkeeping: rows are keyed by the prior they loaded, and rows of a
later prior are reported under their own label beside the first prior's, never mixed with them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quality2d():
    spec = importlib.util.spec_from_file_location("quality2d", REPO / "benchmarks" / "quality2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, nrmse: float, seed: int = 0, **extra) -> dict:
    return {"case": "4h_GE_256", "R": 4, "seed": seed, "method": method, "size": 256, "nrmse_percent": nrmse,
            "psnr_db": 40.0, "ssim": 0.9, "seconds": 1.0, "prior_evals": 0, "steps": 10,
            "machine": "test", "date": "2026-12-01T00:00:00", **extra}


def test_rows_of_a_later_prior_are_reported_apart(tmp_path) -> None:
    q = _quality2d()
    later = "abcdef123456 (2026-12-01)"
    rows = [_row("inr_tv", 3.0), _row("fast", 2.8), _row("fast", 2.6, prior=later), _row("l1_wavelet", 3.5)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a first-prior row (no "prior" field) does not count as done for a later prior, and vice versa
    done = q.done_keys(runs)
    assert ("4h_GE_256", 4, 0, "fast", q.FIRST_PRIOR) in done and ("4h_GE_256", 4, 0, "fast", later) in done
    assert ("4h_GE_256", 4, 0, "inr_tv", None) in done
    assert ("4h_GE_256", 4, 0, "fast", "000000000000 (2027-01-01)") not in done
    out = tmp_path / "report.md"
    q.report(runs, out, None)
    text = out.read_text()
    assert "| 4 | fast | 0 | 2.80 |" in text  # the first prior's row alone, not the mean with 2.6
    assert "| 4 | fast (prior 2026-12-01) | 0 | 2.60 |" in text
    assert "| 4h_GE_256 (256 px) | 4 | 0 | 3.00 | 2.80 | 2.60 |" in text  # first-vs-new prior table
