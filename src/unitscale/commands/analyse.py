"""``unitscale analyse``: scale plot, table and JSON of one training step of a model at initialisation or
from a checkpoint written by ``unitscale train`` or ``demo`` (its model, options, recipe and vocabulary are
read from the checkpoint, through the safe loader)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

NAME = "analyse"
HELP = "record every tensor's scale over one training step; plot it against a number format's range"

_SCALINGS = ("unit", "standard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unitscale.models import MODEL_NAMES

    parser.add_argument("--model", default="gpt", help=f"one of {', '.join(MODEL_NAMES)} (default gpt)")
    parser.add_argument("--scaling", default="unit", choices=_SCALINGS)
    parser.add_argument("--checkpoint", type=Path,
                        help="analyse this checkpoint of unitscale train/demo (or a run directory's newest) "
                             "instead of a fresh model; its model options override --model, --scaling, --set "
                             "(default: a fresh model)")
    parser.add_argument("--format", default="e4m3", help="number format whose ranges are used (default e4m3)")
    parser.add_argument("--out", type=Path, default=Path("scales.png"), help="plot file (default scales.png)")
    parser.add_argument("--json", type=Path, help="also write all records as JSON here (default: no JSON)")
    parser.add_argument("--table", action="store_true", help="print the full table (default: a summary)")
    parser.add_argument("--pattern", help="only tensors whose name matches this regex (default: all)")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--layers", type=int, help="number of layers, model option n_layers (default: the "
                        "model's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other model option, e.g. --set d_model=256 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    if args.layers is not None:
        out["n_layers"] = args.layers
    from unitscale.train.loop import check_model_options

    check_model_options(out, {"scaling": "--scaling", "vocab_size": "--vocab-size", "seq_len": "--seq-len"})
    return out


def _from_checkpoint(path: Path) -> tuple[Any, int, str]:
    """(model, vocab size, label) from a ``unitscale train``/``demo`` checkpoint (file or run directory)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    from unitscale.train.restore import load_trained

    run = load_trained(path)
    c = run.config
    label = f"{run.path.name} step {run.step} ({c.model}, {c.scaling}, {c.precision})"
    return run.model, len(run.vocab), label


def _summary(report: Any) -> str:
    finite = [r for r in report.records if math.isfinite(r.log2_rms)]
    outside = [r for r in finite if abs(r.log2_rms) > 3]
    worst_over = max(report.records, key=lambda r: r.overflow, default=None)
    worst_flush = max(report.records, key=lambda r: r.underflow, default=None)
    lo, hi = (min(r.log2_rms for r in finite), max(r.log2_rms for r in finite)) if finite else (0, 0)
    lines = [f"{len(report)} tensors recorded; {len(outside)} with RMS outside 2^-3 … 2^3 "
             f"(log2 RMS range {lo:+.1f} … {hi:+.1f})"]
    if worst_over is not None:
        lines.append(f"largest overflow in {report.fmt}: {100 * worst_over.overflow:.3g}% "
                     f"({worst_over.name})")
        lines.append(f"largest flush-to-zero in {report.fmt}: {100 * worst_flush.underflow:.3g}% "
                     f"({worst_flush.name})")
    nonfinite = [r.name for r in report.records if r.nonfinite]
    if nonfinite:
        lines.append(f"NON-FINITE values in {len(nonfinite)} tensors, first: {nonfinite[0]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from unitscale.analysis import track_scales
    from unitscale.formats import get_format
    from unitscale.train.rundir import writable

    get_format(args.format)  # fail fast, before building anything
    writable(args.out.parent, "--out")
    if args.json is not None:
        writable(args.json.parent, "--json")
    for name in ("batch_size", "seq_len", "vocab_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be a positive integer, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    if args.checkpoint is not None:
        model, vocab, label = _from_checkpoint(args.checkpoint)
    else:
        overrides = _overrides(args)
        overrides.setdefault("seq_len", args.seq_len)
        from unitscale import models  # after the argument checks: building imports the whole model stack

        model = models.build(args.model, args.vocab_size, scaling=args.scaling, **overrides)
        vocab, label = args.vocab_size, f"{args.model} ({args.scaling} scaling, init)"
    seq_len = min(args.seq_len, getattr(getattr(model, "cfg", None), "seq_len", args.seq_len))
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(0, vocab, (args.batch_size, seq_len + 1), generator=gen)
    model.train()
    report = track_scales(model, (idx[:, :-1], idx[:, 1:]), fmt=args.format, seed=args.seed)
    report.model = label
    console = Console(width=max(Console().width, 160))
    if args.table:
        console.print(report.table(pattern=args.pattern))
    console.print(_summary(report))
    fig = report.plot(args.out, pattern=args.pattern, title=f"{label}: scales against {report.fmt}")
    del fig
    console.print(f"plot written to {args.out}")
    if args.json is not None:
        report.to_json(args.json)
        console.print(f"records written to {args.json}")
    return 0
