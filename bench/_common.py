"""Shared helpers of the benchmark scripts: CUDA check, timing, environment record, table, JSON writer.

Timings are medians of CUDA-event intervals after warm-up; compare only ratios taken in one run on one
device (absolute ceilings move with clocks and timing method). :func:`time_round_robin` interleaves the
variants (one sample of each in turn, rotating the order), so drifting clocks hit every variant alike.
"""

from __future__ import annotations

import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def require_cuda(script: str) -> None:
    """Exit (status 2) with a clear message where there is no CUDA device: no number is ever faked."""
    if not torch.cuda.is_available():
        print(
            f"{script}: needs a CUDA GPU (written for one H100); torch {torch.__version__} sees none. "
            "No numbers were produced.",
            file=sys.stderr,
        )
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


def require_module(name: str, why: str) -> Any:
    """Import ``name`` or exit (status 2) naming what is missing: a comparison row is never left out."""
    module, version = optional_module(name)
    if module is None:
        print(
            f"{name} is required ({why}) but is {version}. bench/device_run.sh installs the carried "
            "wheel from wheels/ (docs/fp8.md, the one prepared run).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return module


def count_fp8_gemms(fn: Callable[[], Any]) -> int:
    """How many FP8 GEMMs (``torch._scaled_mm``) one eager run of ``fn()`` makes.

    Counted twice, the larger count kept: Python-level calls of ``torch._scaled_mm`` (torchao calls it
    from inside a tensor subclass's ``__torch_dispatch__``, which a dispatch mode does not see) and
    ``aten._scaled_mm`` calls seen by a dispatch mode (callers that bypass the Python attribute).
    """
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            if func.overloadpacket is torch.ops.aten._scaled_mm:
                Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with mock.patch.object(torch, "_scaled_mm", wraps=torch._scaled_mm) as spy, Counter():
        fn()
    return max(spy.call_count, Counter.calls)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    steps: int,
    warmup: int,
    device: str = "cuda",
) -> dict[str, dict[str, Any]]:
    """Per-call milliseconds of each ``fns[name]()``, variants interleaved.

    After ``warmup`` calls of each, ``rounds`` rounds each take one sample per variant, the order rotated
    by one every round; a sample is ``steps`` back-to-back calls between one pair of CUDA events (wall
    clock around synchronisations on CPU), divided by ``steps``. Returns median / p10 / p90 and the samples.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cuda = device.startswith("cuda")
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                ms = (time.perf_counter() - t0) * 1e3
            samples[name].append(ms / steps)
    out = {}
    for name, times in samples.items():
        ordered = sorted(times)
        out[name] = {
            "median_ms": statistics.median(ordered),
            "p10_ms": ordered[int(0.1 * (len(ordered) - 1))],
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "samples_ms": times,
            "rounds": rounds,
            "steps_per_sample": steps,
        }
    return out


def speedups(stats: Mapping[str, Mapping[str, Any]], baselines: Sequence[str]) -> None:
    """Add ``speedup_vs_<baseline>`` = baseline time / variant time to every timed variant (in place)."""
    for base in baselines:
        ref = stats.get(base, {}).get("median_ms")
        for s in stats.values():
            if ref and "median_ms" in s:
                s[f"speedup_vs_{base}"] = ref / s["median_ms"]


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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
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
        env.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
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
    """Write ``payload`` to bench/results/<name>.json, or to ``name`` itself if it is a path (has a "/" or
    ends in .json; the device driver writes straight into $OUT), and return the path."""
    path = Path(name) if "/" in name or name.endswith(".json") else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
