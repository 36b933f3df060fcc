"""Running ``unitscale`` in a subprocess, as a user would, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A tiny char-LM run: one conv block of width 16 on 4 × 16 characters, a few ms per step on one thread.
TINY = [
    "--model",
    "conv",
    "--set",
    "d_model=16",
    "--set",
    "n_layers=1",
    "--set",
    "conv_groups=1",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-windows",
    "4",
    "--warmup",
    "10",
]


def env(**extra: str) -> dict[str, str]:
    """The test process's environment, one torch thread (tiny models, shared machine), plus ``extra``."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "unitscale.cli", *map(str, args)]


def cli(
    *args: str, cwd: str | Path | None = None, timeout: float = 300, **extra_env: str
) -> subprocess.CompletedProcess:
    """``unitscale ARGS`` to completion, output captured as text."""
    return subprocess.run(
        command(*args), cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def start(*args: str, cwd: str | Path | None = None) -> subprocess.Popen:
    """``unitscale ARGS`` in the background (stdout/stderr captured as text)."""
    return subprocess.Popen(
        command(*args), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def corpus(path: Path, repeats: int = 400) -> Path:
    path.write_text("the quick brown fox jumps over the lazy dog. " * repeats)
    return path
