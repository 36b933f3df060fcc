"""bench/simulate.py --quick runs end to end (tiny sizes, eager), so the benchmark cannot break unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "simulate.py"


@pytest.mark.slow  # about 10 s: a subprocess running both sections
def test_simulate_bench_quick_and_compare(tmp_path):
    out = tmp_path / "quick.json"
    run = subprocess.run([sys.executable, BENCH, "--quick", "--no-compile", "--recipes", "fp32", "fp8-sim",
                          "--out", out], capture_output=True, text=True, env=env(), timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and "simulate.py" in data["environment"]["command"]
    rows = {(r["format"], r["rounding"]): r for r in data["quantise"]}
    assert len(rows) == 16 and all(isinstance(r["vs_clone"], float) for r in rows.values())
    assert (
        rows[("fp16", "nearest")]["native_vs_clone"] is not None
        and rows[("tf32", "nearest")]["native_ms"] is None
    )
    steps = {(r["recipe"], r["scaling"]): r for r in data["step"]}
    assert steps[("fp32", "unit")]["vs_fp32"] == 1.0 and isinstance(
        steps[("fp8-sim", "unit")]["vs_fp32"], float
    )
    assert "| fp8_e4b | nearest | eager |" in out.with_suffix(".md").read_text()
    cmp = subprocess.run(
        [sys.executable, BENCH, "--compare", out, out], capture_output=True, text=True, env=env()
    )
    assert (
        cmp.returncode == 0 and "fp8_e4b nearest eager" in cmp.stdout and "fp8-sim unit eager" in cmp.stdout
    )
