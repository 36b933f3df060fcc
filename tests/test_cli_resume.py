"""Never lose a run: kill -9, SIGINT and SIGTERM at random points of a 300-step `unitscale train`, each
followed by `--resume`, end bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
import torch

from cli_helpers import TINY, cli, corpus, start
from unitscale.train.metrics import read_jsonl

STEPS = 300
RUN = [
    *TINY,
    "--steps",
    str(STEPS),
    "--checkpoint-every",
    "25",
    "--eval-every",
    "100",
    "--log-every",
    "1",
    "--quiet",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, shared by every interrupted chain."""
    root = tmp_path_factory.mktemp("resume")
    data = corpus(root / "corpus.txt")
    out = root / "reference"
    proc = cli("train", *RUN, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return data, out


def _final(out) -> tuple[dict, dict]:
    summary = json.loads((out / "summary.json").read_text())
    weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return summary, weights


def _wait_for_step(proc: subprocess.Popen, metrics, step: int) -> int:
    """Block until the run has logged training step >= ``step``; return the step seen."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1]}"
        seen = [r["step"] for r in read_jsonl(metrics) if r.get("event") == "train"]
        if seen and seen[-1] >= step:
            return seen[-1]
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in 600 s")


@pytest.mark.slow  # ~40 s on 2 idle cores (5 interpreter starts, 600 tiny steps); more on a loaded machine
@pytest.mark.parametrize("chain_seed", [0])
def test_kill_int_term_then_resume_reach_the_uninterrupted_run_bit_for_bit(tmp_path, reference, chain_seed):
    data, ref_out = reference
    rng = random.Random(chain_seed)
    signals = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM]
    rng.shuffle(signals)
    # One kill point in each third of the run, after the first checkpoint (step 25), drawn at random (fixed
    # seed: reproducible). Killed before its first checkpoint, a run has nothing to resume.
    points = [rng.randrange(30 + 85 * i, 95 + 85 * i) for i in range(3)]
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    for n, (sig, point) in enumerate(zip(signals, points)):
        proc = start("train", *RUN, "--data", data, "--out", out, *(["--resume"] if n else []))
        seen = _wait_for_step(proc, metrics, point)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            assert saved % 25 == 0 or saved == seen  # a periodic checkpoint (or the one of a signal)
        else:
            assert proc.returncode == 128 + sig, err
            assert saved >= seen and f"stopped by {signal.Signals(sig).name} after step {saved}" in err, err
            assert "--resume" in err
    proc = cli("train", *RUN, "--data", data, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    (got, got_w), (want, want_w) = _final(out), _final(ref_out)
    assert got["status"] == "finished" and got["step"] == STEPS
    for key in ("final_loss", "valid_bpc", "test_bpc"):
        assert got[key] == want[key], key
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    # the resumed metrics log is the uninterrupted one, apart from wall-clock fields
    strip = [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in read_jsonl(metrics)]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")}
        for r in read_jsonl(ref_out / "metrics.jsonl")
    ]
    assert not list(out.glob(".*.tmp"))
