"""What a finished run reports: the backends its matmuls ran on, and the summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


def backends_run(model: nn.Module, recipe: Any) -> dict[str, dict[str, int]]:
    """How many matmul-running modules of each kind run on each backend, read from the backend objects
    ``precision.apply`` installed (so a fp8 request that fell back to simulation says "simulate")."""
    from unitscale.precision import plan

    modules = dict(model.named_modules())
    counts: dict[str, dict[str, int]] = {}
    for row in plan(model, recipe):
        if row.kind == "unreachable":
            name = "none"
        else:
            name = getattr(getattr(modules[row.path], "precision", None), "name", "exact")
        kind = counts.setdefault(row.kind, {})
        kind[name] = kind.get(name, 0) + 1
    return counts


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A short rich table of the run's outcome."""
    from rich.console import Console
    from rich.table import Table

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)

    t = Table(title=f"run {out}", show_header=False)
    for key in (
        "status",
        "step",
        "final_loss",
        "valid_bpc",
        "test_bpc",
        "lr",
        "tokens_per_s",
        "wall_s",
        "params",
        "recipe",
        "data",
    ):
        t.add_row(key, fmt(summary.get(key)))
    backends = summary.get("backends") or {}
    t.add_row(
        "ran on",
        "; ".join(
            f"{kind}: " + ", ".join(f"{b} ×{n}" for b, n in sorted(c.items()))
            for kind, c in sorted(backends.items())
        ),
    )
    if summary.get("error"):
        t.add_row("error", summary["error"])
    t.add_row("files", f"{out}/metrics.jsonl, checkpoint.pt, loss.png, summary.json")
    Console().print(t)
