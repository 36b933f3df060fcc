"""``unitscale plot-scales RUN_DIR``: the scale-health monitor's numbers over training steps."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "plot-scales"
HELP = ("plot RMS and overflow / subnormal / underflow fractions of every quantised tensor over training "
        "(the checks in RUN_DIR/metrics.jsonl), one line per layer group, the format's range as a band")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output directory of unitscale train")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/scales.png)")


def run(args: argparse.Namespace) -> int:
    from unitscale.monitor import TensorStats, plot_history, worst, worst_text
    from unitscale.train.metrics import read_jsonl

    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist (RUN_DIR must be an output directory of "
                                "unitscale train)")
    records = read_jsonl(metrics)
    fig = plot_history(records, title=f"scale health: {args.run_dir}")
    out = args.out or args.run_dir / "scales.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    checks = [r for r in records if r.get("event") == "scales"]
    last = checks[-1]
    worst_now = worst([TensorStats.from_dict(row) for row in last["tensors"]])
    warned = sum(r.get("event") == "scale_warning" for r in records)
    print(f"{out}: {len(checks)} checks (steps {checks[0]['step']}..{last['step']}), {warned} warnings; "
          f"worst at step {last['step']}: {worst_text(worst_now)}")
    return 0
