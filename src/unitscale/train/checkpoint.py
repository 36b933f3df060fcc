"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename over the target.

A reader (or a crash) sees either the previous complete checkpoint or the new complete one, never a
partial file: ``os.replace`` is atomic on POSIX and Windows when both paths are on one file system.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(state)`` to ``path`` atomically (temp file + fsync + rename); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``save_atomic`` (tensors loaded on CPU; plain data only, weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (nothing to resume; drop --resume to start afresh)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a unitscale checkpoint of format {FORMAT_VERSION}")
    return state
