"""Shared helpers of the benchmark scripts: CUDA check, timing, environment record, table, JSON writer.

Timings are medians of CUDA-event intervals after warm-up; compare only ratios taken in one run on one
device (docs/theory.md, Cost model: absolute ceilings move with clocks and timing method).
"""

from __future__ import annotations

import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def require_cuda(script: str) -> None:
    """Exit (status 2) with a clear message where there is no CUDA device: no number is ever faked."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU (written for one H100); torch {torch.__version__} sees none. "
              "No numbers were produced.", file=sys.stderr)
        raise SystemExit(2)


def optional_module(name: str) -> tuple[Any, str]:
    """(module, version) if ``name`` imports, else (None, "not installed" or the import error)."""
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        missing = getattr(err, "name", None) == name.split(".")[0]
        return None, "not installed" if missing else f"unusable: {err}"
    top = importlib.import_module(name.split(".")[0])
    return module, getattr(top, "__version__", "unknown")


def time_cuda(fn: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of ``fn()`` measured with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "iters": iters,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Device, software versions and the command line of this run."""
    env: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    for name in ("triton", "torchao"):
        env[name] = optional_module(name)[1]
    return env


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        lines.append("  ".join(padded))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to bench/results/<name>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
