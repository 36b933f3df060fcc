"""DDP and FSDP2 on CPU (gloo), 2 processes launched by torchrun from the test.

The same global batch on 1 or 2 ranks must give the same training trajectory; a checkpoint written at one
world size must resume at another.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unitscale.train.distributed import Dist, grad_correction, shard

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

STEPS = 6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    rng = torch.Generator().manual_seed(0)
    words = ["unit", "scaling", "keeps", "every", "tensor", "near", "one", "so", "fp8", "trains", "well"]
    picks = torch.randint(0, len(words), (6000,), generator=rng).tolist()
    path.write_text(" ".join(words[i] for i in picks))
    return path


def _train(out: Path, data: Path, *, ranks: int, parallel: str, scaling: str = "unit", steps: int = STEPS,
           precision: str = "fp32", extra: tuple[str, ...] = ()) -> dict:
    args = ["train", "--model", "gpt", "--scaling", scaling, "--precision", precision, "--data", str(data),
            "--steps", str(steps), "--batch-size", "4", "--seq-len", "16", "--warmup", "2",
            "--eval-every", "100", "--eval-windows", "4", "--checkpoint-every", "3", "--seed", "0",
            "--set", "d_model=32", "--set", "n_layers=2", "--set", "n_heads=2",
            "--out", str(out), "--quiet", "--parallel", parallel, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1 and parallel == "none":
        cmd = [sys.executable, "-m", "unitscale.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "unitscale.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, text) -> dict:
    return _train(tmp_path_factory.mktemp("single"), text, ranks=1, parallel="none")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, text, single, parallel: str) -> None:
    two = _train(tmp_path / parallel, text, ranks=2, parallel=parallel)
    assert two["status"] == single["status"] == "finished"
    assert two["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert two["valid_bpc"] == pytest.approx(single["valid_bpc"], rel=1e-5)
    # rank 0 alone writes: one metrics file, one checkpoint
    assert (tmp_path / parallel / "checkpoint.pt").exists()


@pytest.mark.slow
def test_standard_model_ddp_matches_one_process(tmp_path, text) -> None:
    one = _train(tmp_path / "one", text, ranks=1, parallel="none", scaling="standard")
    two = _train(tmp_path / "two", text, ranks=2, parallel="ddp", scaling="standard")
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


@pytest.mark.slow
def test_fp8_recipe_under_fsdp_matches_one_process(tmp_path, text) -> None:
    """Quantised recipes run per rank on the rank's rows: simulated FP8 under FSDP2 equals one process."""
    one = _train(tmp_path / "one", text, ranks=1, parallel="none", precision="fp8")
    two = _train(tmp_path / "two", text, ranks=2, parallel="fsdp", precision="fp8")
    assert two["recipe"] == one["recipe"] and "fp8_e4b" in one["recipe"]
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [((2, "fsdp"), (1, "none")), ((1, "none"), (2, "ddp"))])
def test_checkpoint_resumes_across_world_sizes(tmp_path, text, single, first, second) -> None:
    out = tmp_path / "run"
    part = _train(out, text, ranks=first[0], parallel=first[1], extra=("--stop-at", "3"))
    assert part["status"] == "stopped" and part["step"] == 3
    resumed = _train(out, text, ranks=second[0], parallel=second[1], extra=("--resume",))
    assert resumed["status"] == "finished" and resumed["step"] == STEPS
    assert resumed["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)


def test_grad_correction_rule() -> None:
    """Unit-scaled: the global row count is set on the model (the rule then gives the single-process
    factor) and the rank average becomes a sum (× W); standard: × 1, nothing set."""
    from unitscale.models import build

    unit = build("gpt", vocab_size=8, scaling="unit", d_model=8, n_heads=1, seq_len=4, n_layers=1)
    standard = build("gpt", vocab_size=8, scaling="standard", d_model=8, n_heads=1, seq_len=4, n_layers=1)
    assert grad_correction(unit, Dist("ddp", 0, 4), rows=64) == 4.0
    assert {m.grad_rows for m in unit.modules() if hasattr(m, "grad_rows")} == {64.0}
    assert grad_correction(standard, Dist("ddp", 0, 4), rows=64) == 1.0
    assert not any(hasattr(m, "grad_rows") for m in standard.modules())
    fresh = build("gpt", vocab_size=8, scaling="unit", d_model=8, n_heads=1, seq_len=4, n_layers=1)
    assert grad_correction(fresh, Dist(), rows=64) == 1.0
    assert {m.grad_rows for m in fresh.modules() if hasattr(m, "grad_rows")} == {None}
    with pytest.raises(ValueError, match="global row count"):
        grad_correction(fresh, Dist("ddp", 0, 2))


def test_grad_correction_reproduces_the_global_gradient() -> None:
    """Average of per-shard unit-scaled gradients, with the global row count set, × W equals the full-batch
    gradient (float64)."""
    from unitscale.models import build

    torch.manual_seed(0)
    model = build("gpt", vocab_size=11, scaling="unit", d_model=16, n_heads=2, seq_len=8, n_layers=1).double()
    idx = torch.randint(0, 11, (4, 8))
    model(idx, idx)[1].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    factor = grad_correction(model, Dist("ddp", 0, 2), rows=idx.numel())
    shards = []
    for rank in range(2):
        model.zero_grad()
        part = shard(idx, Dist("ddp", rank, 2))
        model(part, part)[1].backward()
        shards.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in full.items():
        averaged = (shards[0][name] + shards[1][name]) / 2
        torch.testing.assert_close(averaged * factor, g, rtol=1e-10, atol=1e-12)


def test_bad_inputs() -> None:
    from unitscale.train.distributed import setup

    with pytest.raises(ValueError, match="unknown parallel mode 'zero'"):
        setup("zero", torch.device("cpu"))
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        shard(torch.zeros(4, 2), Dist("ddp", 0, 3))


@pytest.mark.slow
def test_fsdp_with_forced_fp8_gemms_matches_an_unsharded_twin(tmp_path):
    # Issue 20: FP8 weight copies cached across calls went stale under FSDP2 (the all-gather writes into the
    # same parameter without a version bump). CPU runs _scaled_mm (torch >= 2.13), so gloo catches it too.
    from unitscale.precision.fp8 import fp8_supported

    if not fp8_supported("cpu"):
        pytest.skip("torch._scaled_mm does not run FP8 on this CPU build")
    script = Path(__file__).resolve().parent / "fsdp_fp8_twin.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()), str(script), "cpu", "pow2_amax"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK, worst") == 2, proc.stdout[-3000:]
