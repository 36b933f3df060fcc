"""The one prepared GPU run (issue 17): every FP8/INT4 measurement in priority order under one deadline.

    bash bench/device_run.sh                 # on the device machine: installs the carried torchao wheel
    python bench/device_run.py --dry --out /tmp/out     # CPU, toy sizes, seconds: checks the script itself
    python bench/device_run.py --phases train_step pytest_gpu --deadline 240   # a rerun of some phases

Each phase is one subprocess with its own cap (and never past the deadline); as soon as it ends the driver
writes ``<out>/<phase>.json`` = {phase, status, rc, seconds, command, output tail, result: the phase's own
JSON}, so a run cut short still returns every finished phase. Phases (priority order): smoke (Triton casts
bit-exact vs torch, fp8 vs simulate, compile without graph breaks, GEMM counts), linear_headline
(16384×4096→4096), linear_shapes (the other shapes), train_step (GPT tokens/s + peak memory: BF16 standard,
unit BF16, unit FP8, torchao tensorwise), pytest_gpu (``pytest tests/gpu -m "slow or not slow"``),
int4_linear (bench/int4_linear.py, skipped with a message if absent), monitor_overhead. ``<out>`` also gets
device_run.log; nothing else (the device returns at most 8 files). bench/report.py turns the JSON into
bench/results tables. Outside --dry, torchao must import (bench/device_run.sh installs it) or nothing runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# every timed phase in --dry: one warm-up, one timed step, two rounds (it only has to run)
DRY_TIMING = ["--rounds", "2", "--steps", "1", "--warmup", "1"]
LINEAR_HEADLINE = "16384x4096x4096"
LINEAR_SHAPES = ("16384x4096x14336", "8192x8192x8192", "4096x2048x2048", "2048x1024x1024")
MARGIN_S = 5  # left for writing the last JSON and the log before the deadline


@dataclass(frozen=True)
class Phase:
    name: str
    cap_s: int
    argv: Callable[[argparse.Namespace, Path], list[str] | str]  # a command, or why the phase is skipped
    writes_json: bool = True  # the command writes its own JSON to the given path
    env: tuple[tuple[str, str], ...] = ()


def _linear(shapes: tuple[str, ...]) -> Callable[[argparse.Namespace, Path], list[str]]:
    def argv(args: argparse.Namespace, out: Path) -> list[str]:
        if args.dry:
            variants = ["bf16", "ours", "ours+rule", *_torchao_variants(args, ["torchao-tensorwise"])]
            return [
                PY,
                "bench/linear.py",
                "--device",
                "cpu",
                "--no-compile",
                "--shapes",
                "64x64x32",
                "--variants",
                *variants,
                *DRY_TIMING,
                "--out",
                str(out),
            ]
        return [
            PY,
            "bench/linear.py",
            "--shapes",
            *shapes,
            "--variants",
            "bf16",
            "torchao-tensorwise",
            "torchao-rowwise",
            "ours",
            "ours+rule",
            "--warmup",
            "3",
            "--rounds",
            "10",
            "--steps",
            "5",
            "--out",
            str(out),
        ]

    return argv


def _torchao_variants(args: argparse.Namespace, names: list[str]) -> list[str]:
    """torchao variants: always on the device (required); in the dry run only where torchao imports."""
    return names if not args.dry or importlib.util.find_spec("torchao") else []


def _train_step(args: argparse.Namespace, out: Path) -> list[str]:
    variants = ["bf16-standard", "bf16-unit", "fp8-unit", *_torchao_variants(args, ["torchao-tensorwise"])]
    if args.dry:
        return [
            PY,
            "bench/train_step.py",
            "--device",
            "cpu",
            "--no-compile",
            "--d-model",
            "64",
            "--layers",
            "1",
            "--heads",
            "2",
            "--seq",
            "32",
            "--vocab",
            "128",
            "--batch",
            "2",
            "--dispatch",
            "always",
            "--variants",
            *variants,
            *DRY_TIMING,
            "--out",
            str(out),
        ]
    return [PY, "bench/train_step.py", "--variants", *variants, "--out", str(out)]


def _pytest(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [PY, "-m", "pytest", "tests/gpu", "-m", "slow or not slow", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "150"]
    return cmd


def _int4(args: argparse.Namespace, out: Path) -> list[str] | str:
    if not (ROOT / "bench" / "int4_linear.py").exists():
        return "skipped: bench/int4_linear.py is not in this checkout (the INT4 benchmark is not merged yet)"
    if args.dry:
        return [PY, "bench/int4_linear.py", "--dry", "--out", str(out)]
    return [PY, "bench/int4_linear.py", "--out", str(out)]


def _monitor(args: argparse.Namespace, out: Path) -> list[str]:
    if args.dry:
        return [
            PY,
            "bench/monitor_overhead.py",
            "--device",
            "cpu",
            "--step-reps",
            "3",
            "--block-reps",
            "0",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    return [PY, "bench/monitor_overhead.py", "--device", "cuda", "--block-reps", "3", "--out", str(out)]


PHASES = (
    Phase(
        "smoke",
        80,
        lambda a, o: [PY, "bench/smoke.py", *(["--dry"] if a.dry else []), "--out", str(o)],
        env=(("TRITON_INTERPRET", "dry"),),
    ),
    Phase("linear_headline", 70, _linear((LINEAR_HEADLINE,))),
    Phase("linear_shapes", 100, _linear(LINEAR_SHAPES)),
    Phase("train_step", 170, _train_step),
    Phase("pytest_gpu", 110, _pytest, writes_json=False),
    Phase("int4_linear", 60, _int4),
    Phase("monitor_overhead", 45, _monitor),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:]


def _pytest_summary(text: str) -> dict:
    """Counts from pytest's last line ("3 passed, 1 failed, 2 skipped in 9.1s")."""
    counts = {}
    last = next(
        (
            ln
            for ln in reversed(text.splitlines())
            if " in " in ln and ("passed" in ln or "failed" in ln or "skipped" in ln or "error" in ln)
        ),
        "",
    )
    for part in last.strip("= ").split(" in ")[0].split(","):
        words = part.split()
        if len(words) == 2 and words[0].isdigit():
            counts[words[1]] = int(words[0])
    return counts


def run_phase(phase: Phase, args: argparse.Namespace, out_dir: Path, remaining: float, log) -> dict:
    path = out_dir / f"{phase.name}.json"
    cmd = phase.argv(args, path)
    record: dict = {"phase": phase.name, "dry": args.dry, "cap_s": phase.cap_s}
    if isinstance(cmd, str):
        record.update(status="skipped", reason=cmd)
        return record
    limit = max(1.0, min(phase.cap_s * (1 if not args.dry else 3), remaining))
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    for key, when in phase.env:
        if when == "dry" and args.dry:
            env[key] = "1"
    record.update(command=" ".join(cmd), limit_s=round(limit, 1))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        output, rc = proc.stdout + proc.stderr, proc.returncode
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as err:
        output = (
            (err.stdout or b"").decode(errors="replace")
            if isinstance(err.stdout, bytes)
            else (err.stdout or "")
        )
        output += (
            (err.stderr or b"").decode(errors="replace")
            if isinstance(err.stderr, bytes)
            else (err.stderr or "")
        )
        rc, status = None, "timeout"
    record.update(status=status, rc=rc, seconds=round(time.monotonic() - t0, 1), output_tail=_tail(output))
    log.write(f"\n===== {phase.name}: {status} (rc {rc}, {record['seconds']} s) =====\n{output}\n")
    log.flush()
    if phase.writes_json:
        try:
            record["result"] = json.loads(path.read_text())
        except (OSError, ValueError):
            record["result"] = None
            if status == "ok":
                record["status"] = "failed"
                record["reason"] = f"exited 0 but wrote no JSON at {path}"
    if phase.name == "pytest_gpu":
        record["result"] = _pytest_summary(output)
        if status == "ok" and not record["result"].get("passed"):
            record["status"] = "failed" if not args.dry else "ok"  # dry: everything skips on CPU
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the phase JSONs ($OUT on the device)")
    parser.add_argument("--dry", action="store_true", help="CPU, toy sizes: checks the script in seconds")
    parser.add_argument("--deadline", type=float, default=460, help="seconds for all phases together")
    parser.add_argument("--phases", nargs="+", choices=PHASE_NAMES, default=list(PHASE_NAMES))
    args = parser.parse_args(argv)
    start = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.dry:
        import torch

        if not torch.cuda.is_available():
            print("device_run: no CUDA device; use --dry on CPU", file=sys.stderr)
            return 2
        if importlib.util.find_spec("torchao") is None:
            print(
                "device_run: torchao is not installed; bench/device_run.sh installs the carried wheel "
                "(wheels/torchao-0.18.0-*.whl, carry wheels/). Nothing was run.",
                file=sys.stderr,
            )
            return 3
    summary = []
    with open(out_dir / "device_run.log", "w") as log:
        for phase in PHASES:
            if phase.name not in args.phases:
                continue
            remaining = args.deadline - (time.monotonic() - start) - MARGIN_S
            if remaining < 5:
                record = {"phase": phase.name, "status": "not run", "reason": "deadline reached"}
            else:
                record = run_phase(phase, args, out_dir, remaining, log)
            (out_dir / f"{phase.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
            line = f"{phase.name:<17} {record['status']:<8} {record.get('seconds', '')} s"
            if record["status"] not in ("ok", "skipped"):
                line += "  " + (record.get("reason") or record.get("output_tail", "")[-300:]).replace(
                    "\n", " | "
                )
            print(line, flush=True)
            summary.append(record)
        log.write(f"\ntotal {time.monotonic() - start:.1f} s\n")
    print(
        f"device_run: {time.monotonic() - start:.0f} s, "
        f"{sum(r['status'] == 'ok' for r in summary)}/{len(summary)} phases ok; JSON in {out_dir}"
    )
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
