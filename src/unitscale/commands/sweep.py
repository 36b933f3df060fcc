"""`unitscale sweep charlm`: the paper's char-LM grid, resumable."""

from __future__ import annotations

import argparse

NAME = "sweep"
HELP = "run (or resume) the paper's char-LM study: family × scaling × precision × optimiser × LR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unitscale.train import sweep

    p.add_argument("study", choices=["charlm"], help="which study (only the char-LM study so far)")
    p.add_argument("--out", default="runs/sweep", help="output directory (re-run to resume)")
    p.add_argument("--preset", default="cpu", choices=sorted(sweep.PRESETS), help="model size and budget")
    p.add_argument(
        "--families",
        nargs="+",
        default=list(sweep.FAMILIES),
        metavar="F",
        help=f"subset of {', '.join(sweep.FAMILIES)}",
    )
    p.add_argument("--scalings", nargs="+", default=list(sweep.SCALINGS), metavar="S")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=list(sweep.PRECISIONS),
        metavar="P",
        help=f"subset of {', '.join(sweep.PRECISIONS)}",
    )
    p.add_argument("--optimizers", nargs="+", default=list(sweep.OPTIMIZERS), metavar="O")
    p.add_argument("--data", default="wiki", help="'wiki' or a path to a plain text file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and figure")


def run(args: argparse.Namespace) -> int:
    from unitscale.train import sweep

    if args.report_only:
        path = sweep.report(args.out)
    else:
        path = sweep.run(
            args.out,
            args.preset,
            families=tuple(args.families),
            scalings=tuple(args.scalings),
            precisions=tuple(args.precisions),
            optimizers=tuple(args.optimizers),
            seed=args.seed,
            data=args.data,
            device=args.device,
        )
    print(path.read_text())
    print(f"report: {path}\nfigure: {path.parent / 'sweep.png'}")
    return 0
