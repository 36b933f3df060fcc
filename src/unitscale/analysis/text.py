"""Text rendering of scale records (a rich table)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

# |log2 rms| beyond this is flagged: the unit-scaling guide treats σ within ~1/10 … 10 as healthy.
WARN_LOG2 = 3.0


def _pct(v: float) -> str:
    if v == 0:
        return "0"
    return f"{100 * v:.3g}%"


def _log2_cell(v: float) -> str:
    if math.isnan(v):
        return "[red]nan[/red]"
    if math.isinf(v):
        return "[red]-inf[/red]"
    text = f"{v:+.2f}"
    return f"[yellow]{text}[/yellow]" if abs(v) > WARN_LOG2 else text


def records_table(records: Sequence[Any], fmt: str, title: str = "") -> Table:
    """One row per record: name, pass, shape, log2 RMS, RMS, absmax, format fractions, non-finite."""
    frac_keys = ["overflow", "subnormal", "underflow"]
    table = Table(title=f"{title} — fractions for {fmt}".strip(" —"), show_lines=False, header_style="bold")
    for col, justify in [("tensor", "left"), ("pass", "left"), ("shape", "left"), ("log2 rms", "right"),
                         ("rms", "right"), ("absmax", "right")]:
        table.add_column(col, justify=justify, no_wrap=col != "tensor")
    for key in frac_keys:
        table.add_column(key, justify="right")
    table.add_column("non-finite", justify="right")
    for r in records:
        values = [getattr(r, k) for k in frac_keys]
        fracs = [f"[red]{_pct(v)}[/red]" if v > 0.01 else _pct(v) for v in values]
        nonfinite = f"[red]{_pct(r.nonfinite)}[/red]" if r.nonfinite else "0"
        table.add_row(
            r.name, "fwd" if r.direction == "forward" else "bwd", "×".join(map(str, r.shape)) or "scalar",
            _log2_cell(r.log2_rms), f"{r.rms:.3g}", f"{r.absmax:.3g}", *fracs, nonfinite,
        )
    return table
