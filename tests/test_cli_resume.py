"""Never lose a run: kill -9, SIGINT and SIGTERM at random points of a 300-step `unitscale train`, each
followed by `--resume`, end bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, cli, corpus, env, start
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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (a child of the agent with RANK=rank)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {agent.pid}")


@pytest.mark.slow  # torchrun with two workers: ~15 s on 2 idle cores
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sigterm_to_one_rank_checkpoints_every_rank_together(tmp_path) -> None:
    """SIGTERM reaches rank 1 only: the stop is agreed by all-reduce, both ranks stop after the same step and
    the FSDP state is gathered collectively and saved (that such a checkpoint resumes exactly on any world
    size is tests/test_distributed.py::test_checkpoint_resumes_across_world_sizes)."""
    steps = 40
    text = corpus(tmp_path / "corpus.txt")
    common = [
        "--data",
        text,
        "--steps",
        steps,
        "--batch-size",
        4,
        "--seq-len",
        16,
        "--warmup",
        2,
        "--eval-every",
        100,
        "--eval-windows",
        4,
        "--checkpoint-every",
        100,
        "--log-every",
        1,
        "--seed",
        0,
        "--set",
        "d_model=32",
        "--set",
        "n_layers=2",
        "--set",
        "n_heads=2",
        "--quiet",
    ]
    out = tmp_path / "run"
    args = ["train", "--model", "gpt", *common, "--out", out, "--parallel", "fsdp"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_port()),
        "-m",
        "unitscale.cli",
        *map(str, args),
    ]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 300
    while not [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "train" and r["step"] >= 5]:
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
        time.sleep(0.05)
    os.kill(_worker(agent, 1), signal.SIGTERM)
    _, err = agent.communicate(timeout=300)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= saved < steps  # no periodic checkpoint before step 100: this one is the signal's
    assert f"stopped by SIGTERM after step {saved}" in err  # rank 1
    assert f"stopped by a signal to another rank after step {saved}" in err  # rank 0, the same step
    # the checkpoint holds the full (gathered) model and optimiser state, keyed by parameter name
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["model"]["tok.weight"].shape == (state["model"]["lm_head.weight"].shape[0], 32)
    assert set(state["optimizer"]["state"]) == set(state["model"])  # every parameter's Adam moments
