"""The commands as a user runs them: unsafe files never execute, runs are never lost or shared, bad input
is one line naming the value, progress is readable in an 80-column terminal.

Most tests call ``unitscale.cli.main`` (the console script's entry point) in-process, since an interpreter
start costs seconds; a subprocess is used where the behaviour needs one: another process holding the run
directory, a pseudo-terminal, a traceback that only an uncaught error would print."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, cli, corpus, env
from unitscale.cli import main
from unitscale.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 20-step tiny run made through the Python API (cheap), for the commands that read one."""
    root = tmp_path_factory.mktemp("cli")
    data = corpus(root / "corpus.txt")
    out = root / "run"
    train(
        TrainConfig(
            model="conv",
            model_overrides={"d_model": 16, "n_layers": 1, "conv_groups": 1},
            seq_len=16,
            batch_size=4,
            eval_windows=4,
            warmup=5,
            steps=20,
            checkpoint_every=10,
            data=str(data),
            out_dir=str(out),
            quiet=True,
        )
    )
    return out


class _Payload:
    """Unpickling this creates ``path``: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"format": 1, "config": {}, "model": _Payload(marker)}, path)
    pickle.loads(pickle.dumps(_Payload(marker))).close()  # the payload works: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    return path


@pytest.mark.parametrize("command", ["analyse", "sample", "train --resume", "finetune --resume"])
def test_a_crafted_pickle_is_never_executed(tmp_path, command, capsys):
    marker = tmp_path / "executed"
    run = tmp_path / "run"
    run.mkdir()
    if command == "analyse":
        evil = _crafted(tmp_path / "evil.pt", marker)
        argv = ["analyse", "--checkpoint", evil, "--out", tmp_path / "a.png"]
    elif command == "sample":
        argv = ["sample", "--run", _crafted(tmp_path / "evil.pt", marker), "--prompt", "x"]
    elif command == "train --resume":
        _crafted(run / "checkpoint.pt", marker)
        argv = ["train", "--resume", "--out", run]
    else:
        (run / "standard-fp32").mkdir()
        _crafted(run / "standard-fp32" / "seed0.ckpt.pt", marker)
        argv = ["finetune", "--resume", "--out", run]
    rc = main([str(a) for a in argv])
    assert not marker.exists(), "the crafted file's code ran"
    line = capsys.readouterr().err.strip()
    assert rc == 2 and len(line.splitlines()) == 1 and "was refused" in line and "io.open" in line, line
    assert "weights_only=False" not in line


def _main(*argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_into_a_run_is_refused_then_overwritten_on_request(tmp_path, run_dir, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = (out / "checkpoint.pt").read_bytes()
    data = json.loads((out / "summary.json").read_text())["config"]["data"]
    rc, _, err = _main(
        "train", *TINY, "--steps", "12", "--data", data, "--out", out, "--quiet", capsys=capsys
    )
    assert rc == 2 and err.strip() == (
        f"unitscale train: error: {out} already holds a run (checkpoint.prev.pt, "
        "checkpoint.pt, summary.json); pass --resume to continue it or "
        "--overwrite to replace it, or choose another --out"
    )
    assert (out / "checkpoint.pt").read_bytes() == before
    rc, _, err = _main(
        "train", *TINY, "--steps", "12", "--data", data, "--out", out, "--quiet", "--overwrite", capsys=capsys
    )
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["step"] == 12


def test_a_second_run_on_the_same_directory_fails_at_once_naming_the_first(tmp_path, capsys):
    """Another process holds the run directory (as a running `unitscale train` does): the command fails at
    once, naming its pid, and writes nothing there."""
    import subprocess
    import sys

    data = corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    code = (
        "import sys, time; from unitscale.train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc, _, err = _main(
            "train", *TINY, "--steps", "12", "--data", data, "--out", out, "--quiet", capsys=capsys
        )
        assert rc == 2 and f"{out} is in use by another run (pid {holder.pid})" in err, err
        assert time.monotonic() - t0 < 60  # no waiting for the holder
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_resume_from_another_directory_with_relative_or_absolute_data(tmp_path, capsys, monkeypatch):
    data = corpus(tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _main(
        "train",
        *TINY,
        "--steps",
        "12",
        "--data",
        "corpus.txt",
        "--out",
        "run",
        "--quiet",
        "--stop-at",
        "3",
        capsys=capsys,
    )
    assert rc == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # no --data: the absolute path saved in the checkpoint; then the same file by a relative and an
    # absolute path
    rc, _, err = _main("train", "--resume", "--out", "../run", "--quiet", "--stop-at", "4", capsys=capsys)
    assert rc == 0, err
    rc, _, err = _main(
        "train",
        "--resume",
        "--out",
        "../run",
        "--data",
        "../corpus.txt",
        "--quiet",
        "--stop-at",
        "5",
        capsys=capsys,
    )
    assert rc == 0, err
    rc, out, err = _main(
        "train", "--resume", "--out", tmp_path / "run", "--data", data.resolve(), "--quiet", capsys=capsys
    )
    assert rc == 0 and "finished: step 12" in out, err
    data.write_text(data.read_text() + "changed")
    rc, _, err = _main(
        "train", "--resume", "--steps", "14", "--out", tmp_path / "run", "--quiet", capsys=capsys
    )
    assert rc == 2 and "--allow-data-change" in err and str(data) in err, err
    rc, _, err = _main(
        "train",
        "--resume",
        "--steps",
        "14",
        "--out",
        tmp_path / "run",
        "--quiet",
        "--allow-data-change",
        capsys=capsys,
    )
    assert rc == 0, err


@pytest.mark.parametrize("case", ["set-scaling", "set-vocab", "read-only-out", "binary-data"])
def test_bad_input_is_one_line_naming_the_value(tmp_path, case, capsys):
    data = corpus(tmp_path / "corpus.txt")
    argv = ["train", *TINY, "--steps", "12", "--data", data, "--out", tmp_path / "run", "--quiet"]
    if case == "set-scaling":
        argv += ["--set", "scaling=standard"]
        expect = "--set scaling='standard': scaling is set by --scaling"
    elif case == "set-vocab":
        argv += ["--set", "vocab_size=40"]
        expect = "--set vocab_size=40: vocab_size is set by the data's vocabulary"
    elif case == "read-only-out":
        # root ignores permission bits: a sysfs path is read-only even for root
        ro = Path("/sys/unitscale-test") if os.geteuid() == 0 else tmp_path / "ro"
        if os.geteuid() != 0:
            ro.mkdir(mode=0o555)
        argv[argv.index("--out") + 1] = ro / "run"
        expect = f"--out '{ro / 'run'}' is not writable"
    else:
        binary = tmp_path / "data.bin"
        binary.write_bytes(bytes(range(256)) * 40)
        argv[argv.index("--data") + 1] = binary
        expect = f"--data '{binary}' is not UTF-8 text (byte 0x80 at offset 128)"
    rc, _, err = _main(*argv, capsys=capsys)
    line = err.strip()
    assert rc == 2 and len(line.splitlines()) == 1 and expect in line, err
    assert "accepted" in line


def test_read_only_out_in_a_subprocess_prints_no_traceback(tmp_path):
    ro = Path("/sys/unitscale-test") if os.geteuid() == 0 else tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir(mode=0o555)
    for argv in (["formats", "--json", ro / "formats.json"],):  # train's case: test_bad_input_... above
        proc = cli(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and str(ro) in proc.stderr, proc.stderr


def test_warmup_longer_than_steps_warns_in_one_line(tmp_path, capsys):
    data = corpus(tmp_path / "corpus.txt")
    rc, _, err = _main(
        "train",
        *TINY,
        "--steps",
        "4",
        "--warmup",
        "10",
        "--data",
        data,
        "--out",
        tmp_path / "r",
        "--quiet",
        capsys=capsys,
    )
    assert rc == 0, err
    assert (
        "unitscale train: UserWarning: --warmup 10 is longer than --steps 4: the learning rate only "
        "reaches 0.4 of its peak"
    ) in err.splitlines()


def _in_terminal(argv: list, columns: int, cwd: Path) -> str:
    """Run ``unitscale ARGV`` on a pseudo-terminal ``columns`` wide; the screen text without escapes."""
    import pty
    import subprocess

    from cli_helpers import command

    leader, follower = pty.openpty()
    terminal = env(COLUMNS=str(columns), LINES="40", TERM="xterm", NO_COLOR="1")
    proc = subprocess.Popen(
        command(*argv), cwd=cwd, env=terminal, stdin=follower, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            block = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not block:
            break
        chunks.append(block)
    proc.wait(timeout=600)
    os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # colours (NO_COLOR should leave none)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", text)  # cursor moves and erases end a screen line


def test_progress_of_an_fp8_run_is_readable_at_80_columns(tmp_path):
    data = corpus(tmp_path / "corpus.txt")
    argv = [
        "train",
        "--model",
        "gpt",
        "--set",
        "d_model=16",
        "--set",
        "n_layers=1",
        "--set",
        "n_heads=2",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--eval-windows",
        "4",
        "--precision",
        "fp8",
        "--steps",
        "30",
        "--warmup",
        "3",
        "--monitor-every",
        "10",
        "--data",
        data,
        "--out",
        tmp_path / "r",
    ]
    screen = _in_terminal(argv, 80, tmp_path)
    lines = [line for line in screen.splitlines() if line.strip()]
    progress = [line for line in lines if "━" in line or line.strip().startswith(("loss ", "scales: "))]
    assert progress and all(len(line) <= 80 for line in progress), max(progress, key=len)
    bars = [line for line in lines if "30/30" in line]
    assert bars, screen[-2000:]
    assert "━" in bars[-1] and re.search(r"\d:\d\d:\d\d", bars[-1]), bars[-1]  # bar and ETA kept
    assert any(line.strip().startswith("loss ") and "valid BPC" in line for line in lines)
    assert any(line.strip().startswith("scales: ") for line in lines)  # the monitor's line, cut to fit


def test_demo_shows_steps_and_eta_in_a_terminal(tmp_path):
    data = corpus(tmp_path / "corpus.txt")
    screen = _in_terminal(
        ["demo", "--steps", "4", "--no-reference", "--data", data, "--out", tmp_path / "d"], 80, tmp_path
    )
    for name in ("gpt/standard/fp8", "gpt/unit/fp8"):
        done = [line for line in screen.splitlines() if name in line and "4/4" in line]
        assert done and re.search(r"\d:\d\d:\d\d", done[-1]), screen[-2000:]


def _greedy_reference(run: Path, prompt: str, length: int) -> str:
    """Greedy decoding written out here from the checkpoint and the model registry (not unitscale's
    sampler): argmax of the last position, the unknown id 0 excluded, context cut to seq_len."""
    from unitscale import models
    from unitscale.train.data import Vocab

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    cfg = state["config"]
    vocab = Vocab.from_dict(state["vocab"])
    model = models.build(
        cfg["model"], len(vocab), scaling=cfg["scaling"], seq_len=cfg["seq_len"], **cfg["model_overrides"]
    )
    model.load_state_dict(state["model"])
    model.eval()
    ids = vocab.encode(prompt).tolist()
    with torch.no_grad():
        for _ in range(length):
            logits, _ = model(torch.tensor([ids[-cfg["seq_len"] :]]))
            last = logits[0, -1].clone()
            last[0] = -float("inf")
            ids.append(int(last.argmax()))
    return prompt + vocab.decode(ids[len(prompt) :])


def test_sample_greedy_matches_an_independent_decode_and_sampling_is_seeded(run_dir, capsys):
    rc, out, err = _main(
        "sample",
        "--run",
        run_dir,
        "--prompt",
        "the quick",
        "--length",
        "40",
        "--temperature",
        "0",
        capsys=capsys,
    )
    assert rc == 0, err
    assert out.rstrip("\n") == _greedy_reference(run_dir, "the quick", 40)
    texts = []
    for seed in (1, 1, 2):
        rc, out, err = _main(
            "sample",
            "--run",
            run_dir / "checkpoint.pt",
            "--prompt",
            "the",
            "--length",
            "60",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            capsys=capsys,
        )
        assert rc == 0 and len(out.rstrip("\n")) == 63 and out.startswith("the"), err
        texts.append(out)
    assert texts[0] == texts[1] != texts[2]
    rc, _, err = _main("sample", "--run", run_dir, "--prompt", "", capsys=capsys)
    assert rc == 2 and err.strip() == (
        "unitscale sample: error: --prompt must not be empty: the model needs "
        "at least one character to continue"
    )
