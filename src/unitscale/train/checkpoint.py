"""Checkpoints: the one safe loader for every file a user passes in, and atomic saves that keep the
previous checkpoint.

Loading uses ``torch.load(weights_only=True)`` only: tensors and plain containers, never arbitrary pickled
objects, so a crafted file cannot run code. unitscale has no option to load a file any other way; a file
that needs more is refused with a one-line message, as is a truncated or corrupt one.

Saving writes a temporary file beside the target (created with the user's umask), fsyncs it, moves the
current checkpoint to ``<stem>.prev<suffix>``, then renames the temporary file over the target (``os.replace``
is atomic on one file system). A crash at any point leaves a complete newest or a complete previous file;
``load_latest`` falls back to the previous one when the newest is unreadable, and ``clean_temporaries``
removes what a killed save left behind.
"""

from __future__ import annotations

import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint: corrupt, truncated, unsafe or of another kind."""


def previous_path(path: str | Path) -> Path:
    """Where ``save_atomic`` keeps the checkpoint it replaced: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _temporary_glob(path: Path) -> str:
    return f".{path.name}.*.tmp"


def _reason(err: BaseException) -> tuple[str, bool]:
    """(short reason, unsafe?) for a torch.load failure, without torch's advice to drop weights_only."""
    text = str(err)
    unsafe = re.search(r"GLOBAL (\S+)", text)
    if unsafe:
        return f"it references {unsafe.group(1)}, which only an unsafe pickle load could create", True
    if isinstance(err, EOFError) or not text:
        return "the file is empty or ends early", False
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n|$)", text)
    if detail is None:
        first = text.strip().splitlines()[-1] if "Weights only load failed" in text else text.strip()
        detail_text = first.split(". ")[0]
    else:
        detail_text = detail.group(1)
    return detail_text.rstrip("."), False


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """The object stored in ``path`` by ``torch.save``, on CPU, through the safe (weights_only) loader.

    FileNotFoundError when it is missing; CheckpointError (one line, naming the file) when it is truncated,
    corrupt, or holds anything but tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes say nothing to a user
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        reason, unsafe = _reason(err)
        if unsafe:
            raise CheckpointError(
                f"{what} {str(path)!r} was refused: {reason}; unitscale loads only tensors "
                "and plain data (torch.load weights_only=True)"
            ) from None
        raise CheckpointError(f"{what} {str(path)!r} is truncated or corrupt ({reason})") from None


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``save_atomic`` (tensors on CPU), through ``load_file``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (nothing to resume; drop --resume to start afresh)")
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a unitscale checkpoint of format {FORMAT_VERSION}")
    return state


def load_latest(path: str | Path) -> tuple[dict[str, Any], Path, str | None]:
    """(state, file it came from, problem) for the newest readable of ``path`` and its previous copy.

    ``problem`` is None when ``path`` itself loaded, else a sentence naming the bad file and the one used
    instead. When neither loads, CheckpointError names both.
    """
    path = Path(path)
    prev = previous_path(path)
    try:
        return load(path), path, None
    except (CheckpointError, FileNotFoundError) as err:
        if not prev.is_file():
            raise
        first = str(err)
    try:
        state = load(prev)
    except CheckpointError as err:
        raise CheckpointError(f"no usable checkpoint: {first}; and the previous one: {err}") from None
    return state, prev, f"{first}; using the previous checkpoint {prev} (step {state.get('step')}) instead"


def set_aside(path: str | Path) -> Path | None:
    """Rename an unreadable checkpoint to ``<name>.corrupt`` (kept for inspection, never loaded again), so
    the next save does not move it over the previous good one."""
    path = Path(path)
    if not path.exists():
        return None
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    return target


def clean_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of saves to ``path`` that a killed process left; returns them.

    Only safe while no other process saves to ``path`` (the run-directory lock guarantees that)."""
    path = Path(path)
    stale = sorted(path.parent.glob(_temporary_glob(path))) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_atomic(state: dict[str, Any], path: str | Path, *, keep_previous: bool = True) -> Path:
    """``torch.save(state)`` to ``path`` atomically (temp file + fsync + rename); returns ``path``.

    With ``keep_previous`` the checkpoint it replaces is kept as ``previous_path(path)``. The file gets the
    permissions of any new file (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
