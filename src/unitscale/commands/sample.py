"""``unitscale sample``: generate text with a char-LM trained by ``unitscale train`` or ``demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "sample"
HELP = "continue a prompt with a trained char-LM (greedy or with a temperature, seedable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        type=Path,
        required=True,
        metavar="DIR",
        help="run directory of unitscale train (its newest checkpoint), or a checkpoint file "
        "(required, no default)",
    )
    parser.add_argument("--prompt", required=True, help="text to continue (required, no default)")
    parser.add_argument("--length", type=int, default=200, help="characters to generate")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="softmax temperature; 0 = greedy (always the most likely character)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")


def run(args: argparse.Namespace) -> int:
    from unitscale.train.restore import check_sampling, generate, load_trained

    check_sampling(args.prompt, args.length, args.temperature)  # before the model loads
    trained = load_trained(args.run)
    unknown = sum(1 for c in args.prompt if c not in trained.vocab.chars)
    if unknown:
        print(
            f"note: {unknown} prompt character(s) are not in the run's vocabulary (read as unknown)",
            file=sys.stderr,
        )
    print(generate(trained, args.prompt, args.length, temperature=args.temperature, seed=args.seed))
    return 0
