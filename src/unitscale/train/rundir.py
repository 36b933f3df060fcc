"""A run directory: one writer at a time, never overwritten by accident, stopped cleanly by a signal.

``RunLock`` holds an exclusive ``flock`` on ``<dir>/.lock`` and writes its pid there: a second run on the
same directory fails at once and names the holder. The kernel drops the lock when its process dies, even by
kill -9, so a lock file left by a dead process is simply taken over. ``claim`` refuses to start a new run
where one already is unless the user says ``--resume`` or ``--overwrite``. ``StopSignals`` turns SIGINT and
SIGTERM into a request that the training loop honours at the next step boundary, after a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """The run directory is in use, holds another run, or cannot be written."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().split()
    except OSError:
        text = []
    pid = text[0] if text else "unknown"
    host = f" on {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
    return f"pid {pid}{host}"


class RunLock:
    """Exclusive lock on a run directory for this process's lifetime (context manager)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl  # POSIX; the lock dies with its process, so no lock is ever stale

        writable(self.directory)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"{self.directory} is in use by another run ({_holder(self.path)}); wait for "
                "it to finish, stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; the file stays (unlinking it would let two later runs lock two different files)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writable(directory: str | Path, flag: str = "--out") -> Path:
    """Create ``directory`` if needed and check a file can be made in it; RunDirError names the flag."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunDirError(
            f"{flag} {str(directory)!r} is not writable ({reason}); accepted: a directory "
            "this user can create files in"
        ) from None
    return directory


def existing(directory: Path, markers: Iterable[str]) -> list[Path]:
    """The files in ``directory`` matching the glob ``markers`` (the traces of a run)."""
    return sorted({p for m in markers for p in directory.glob(m)}) if directory.is_dir() else []


def claim(
    directory: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    markers: Iterable[str],
    files: Iterable[str] | None = None,
) -> None:
    """Refuse a fresh run in a directory that holds one (files matching ``markers``) unless ``overwrite``,
    which deletes the run's ``files`` (default: the markers); ``resume`` continues the run that is there."""
    directory = Path(directory)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    found = existing(directory, markers)
    if resume or not found:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirError(
            f"{directory} already holds a run ({names}); pass --resume to continue it or "
            "--overwrite to replace it, or choose another --out"
        )
    for p in existing(directory, markers if files is None else files):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


class StopSignals:
    """SIGINT/SIGTERM set ``signum`` instead of killing the process (main thread only; elsewhere a no-op).

    After a first SIGINT, a second one raises KeyboardInterrupt at once (abort without waiting for the
    checkpoint; the previous checkpoint stays intact because saves are atomic).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving its checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
