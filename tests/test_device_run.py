"""bench/device_run.py, the one prepared GPU run: its dry mode on CPU (every phase, toy sizes) and its
bookkeeping (one JSON per phase even past the deadline, pytest summary parsing, round-robin order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import device_run  # noqa: E402
from _common import time_round_robin  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_phase(tmp_path):  # ~90 s on 2 busy cores
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", "bench/device_run.sh", "--dry"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in device_run.PHASE_NAMES}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{n}.json" for n in device_run.PHASE_NAMES] + ["device_run.log"]
    )  # ≤ 8 files come back
    int4_present = (ROOT / "bench" / "int4_linear.py").exists()
    for name, rec in records.items():
        assert rec["status"] == ("skipped" if name == "int4_linear" and not int4_present else "ok"), rec
    smoke = records["smoke"]["result"]
    assert smoke["ok"] and set(smoke["checks"]) == {
        "triton_casts",
        "fp8_vs_simulate",
        "compile",
        "gemm_counts",
    }
    assert smoke["checks"]["compile"]["graph_breaks"] == 0
    shape = records["linear_headline"]["result"]["results"][0]["variants"]
    assert shape["ours"]["fp8_gemms_per_step"] == 3 and shape["ours"]["speedup_vs_bf16"] > 0
    train = records["train_step"]["result"]["results"]
    assert train["fp8-unit"]["fp8_gemms_per_step"] > 0 and train["bf16-unit"]["fp8_gemms_per_step"] == 0
    assert records["pytest_gpu"]["result"].get("skipped", 0) > 0  # collected; every GPU test skips on CPU
    import report

    assert report.main([str(tmp_path), "--dest", str(tmp_path / "rep" / "device_run")]) == 0
    md = (tmp_path / "rep" / "device_run.md").read_text()
    assert "## linear_headline: ok" in md and "fp8-unit" in md


def test_past_the_deadline_every_phase_still_gets_its_json(tmp_path):
    assert device_run.main(["--dry", "--out", str(tmp_path), "--deadline", "0"]) == 1
    for name in device_run.PHASE_NAMES:
        assert json.loads((tmp_path / f"{name}.json").read_text())["status"] == "not run"


def test_pytest_summary_parsing():
    text = "....\nFAILED tests/gpu/x.py::t - assert\n3 failed, 110 passed, 4 skipped in 81.20s (0:01:21)\n"
    assert device_run._pytest_summary(text) == {"failed": 3, "passed": 110, "skipped": 4}
    assert device_run._pytest_summary("114 skipped in 11.89s") == {"skipped": 114}


def test_round_robin_interleaves_and_rotates():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = time_round_robin(fns, rounds=3, steps=2, warmup=1, device="cpu")
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert "".join(calls[3:]) == "aabbcc" + "bbccaa" + "ccaabb"  # one sample each per round, order rotated
    assert all(len(s["samples_ms"]) == 3 and s["steps_per_sample"] == 2 for s in stats.values())
