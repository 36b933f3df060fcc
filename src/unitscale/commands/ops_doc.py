"""``unitscale ops-doc``: write (or check) the ops compendium table generated from ``unitscale.rules``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "ops-doc"
HELP = "Write docs/ops.md, the unit-scaled ops compendium generated from the scale rules (--check: compare)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, default=Path("docs/ops.md"), help="file to write")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the file is stale")
    parser.add_argument("--stdout", action="store_true", help="print the table instead of writing it")


def run(args: argparse.Namespace) -> int:
    from unitscale.rules import render_ops_markdown

    text = render_ops_markdown()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        if not args.output.is_file():
            raise FileNotFoundError(f"{args.output} does not exist; run `unitscale ops-doc -o {args.output}`")
        if args.output.read_text(encoding="utf-8") != text:
            print(
                f"{args.output} is stale; regenerate it with `unitscale ops-doc -o {args.output}`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0
