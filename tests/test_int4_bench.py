"""The INT4 benchmarks' --dry modes run on CPU in seconds and write their JSON (so they cannot rot)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.parametrize("name", ["int4_linear", "int4_step"])
def test_dry_run_writes_json(name, tmp_path):
    out = tmp_path / f"{name}.json"
    payload = _load(name).main(["--dry", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["env"]["torch"] and data["env"]["command"]
    if name == "int4_linear":
        assert [r["shape"] for r in data["results"]] == [
            {"M": 256, "K": 128, "N": 64},
            {"M": 512, "K": 64, "N": 128},
        ]
        assert all(r["median_ms"]["int4"] > 0 and r["median_ms"]["bf16"] > 0 for r in payload["results"])
    else:
        assert (
            set(data["ratio_vs_fp32"]) == {"fp32", "int4-naive", "int4"}
            and data["ratio_vs_fp32"]["fp32"] == 1
        )
