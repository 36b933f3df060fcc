"""FSDP2 with the real FP8 backend on CUDA (one GPU: world size 1 still exercises fully_shard/DTensor)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs CUDA with FP8 (sm_89+)",
)


def test_fsdp_with_fp8_backend_trains(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["unit scaling keeps tensors near one"] * 3000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(port),
           "-m", "unitscale.cli", "train", "--parallel", "fsdp", "--device", "cuda", "--precision", "fp8-hw",
           "--model", "gpt", "--data", str(text), "--steps", "20", "--batch-size", "16", "--seq-len", "128",
           "--set", "d_model=256", "--set", "n_layers=2", "--set", "n_heads=4", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["parallel"]["mode"] == "fsdp"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert summary["final_loss"] < first.get("loss", float("inf"))


@pytest.mark.parametrize("weight_scale", ["pow2_amax", "static"])
def test_fsdp_with_forced_fp8_gemms_matches_an_unsharded_twin(weight_scale, tmp_path):
    # The CLI run above trains d_model=256, which the default Dispatch keeps in bf16: here every linear is
    # forced onto _scaled_mm (Dispatch.always()) and, after each optimizer step, the sharded model must match
    # an unsharded simulate-backend twin with the same weights, so stale FP8 weight copies (issue 20) fail.
    script = Path(__file__).resolve().parents[1] / "fsdp_fp8_twin.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = str(min(2, torch.cuda.device_count()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks,
           "--master-port", str(port), str(script), "cuda", weight_scale]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 OK" in proc.stdout, proc.stdout[-3000:]
