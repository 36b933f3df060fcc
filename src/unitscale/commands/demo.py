"""`unitscale demo`: standard vs unit-scaled char-LM in simulated FP8 (with FP32 yardsticks), one plot."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "train a standard and a unit-scaled small char-LM side by side in simulated FP8 (CPU, minutes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument("--data", default="wiki", help="'wiki' (default) or a path to a plain text file")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the two FP32 reference runs (faster, but no yardstick; default: run them)")
    p.add_argument("--overwrite", action="store_true", help="replace a demo already in OUT (default off)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from unitscale.train.demo import report, run_demo

    console = Console()
    summaries = run_demo(args.out, steps=args.steps, data=args.data, seed=args.seed, reference=args.reference,
                         console=console, overwrite=args.overwrite)
    console.print(report(summaries))
    for name in ("standard-fp8", "unit-fp8"):
        console.print(f"final validation BPC, {name}: {summaries[name]['valid_bpc']}")
    console.print(f"curves: {args.out}/demo.png")
    return 0
