"""``unitscale ops-doc``: write (or check) the ops compendium table generated from ``unitscale.rules``.

Without ``--out`` it writes the repository's ``docs/ops.md``, so it must run in the repository's root;
anywhere else it asks for ``--out`` instead of creating a stray ``docs/`` folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "ops-doc"
HELP = "Write docs/ops.md, the unit-scaled ops compendium generated from the scale rules (--check: compare)."
DEFAULT = Path("docs/ops.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "--output", "-o", dest="output", type=Path,
                        help=f"file to write (default: {DEFAULT} when run in the unitscale repository's "
                             "root; required elsewhere)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the file is stale")
    parser.add_argument("--stdout", action="store_true", help="print the table instead of writing it")


def run(args: argparse.Namespace) -> int:
    from unitscale.rules import render_ops_markdown

    text = render_ops_markdown()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.output is None:
        if not _in_repository(Path.cwd()):
            raise ValueError(f"not in the unitscale repository's root (no pyproject.toml of unitscale in "
                             f"{Path.cwd()}), so no {DEFAULT} to write; accepted: --out FILE, or --stdout")
        args.output = DEFAULT
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
    args.output.parent.mkdir(parents=True, exist_ok=True)  # an explicit --out may name a new folder
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


def _in_repository(directory: Path) -> bool:
    """Whether ``directory`` is the root of the unitscale source tree (its pyproject.toml names it)."""
    project = directory / "pyproject.toml"
    return project.is_file() and 'name = "unitscale"' in project.read_text(encoding="utf-8")
