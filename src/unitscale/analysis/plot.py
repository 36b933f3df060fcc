"""Scale plot in the style of the unit-scaling paper: one row per site, log2 RMS against a format's ranges.

Each record is drawn on the row of its site: a dot at log2 RMS, a bar over the central 98 % of log2|x|
(finite non-zero values) and a tick at log2 absmax. Forward tensors (activations, weights) on the left,
backward tensors (gradients, weight gradients) on the right, with the format's normal range and
subnormal range as bands behind them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from unitscale.formats import get_format

COLOURS = {
    "activation": "tab:blue", "weight": "tab:green", "gradient": "tab:red", "weight_grad": "tab:purple",
}
ROW_HEIGHT_IN = 0.19
_LAYER = re.compile(r"^(.*?\.\d+)(?:[.#]|$)")


def _group(site: str) -> str:
    """The repeated block a site belongs to (``layers.3`` for ``layers.3.mlp.fc1``), else its first name."""
    m = _LAYER.match(site.split(" / ")[0])
    return m.group(1) if m else site.split(".")[0].split(" / ")[0]


def _finite(vals: Sequence[float]) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


def plot_records(records: Sequence[Any], fmt: str, title: str = "") -> Any:
    """Figure with two panels (forward | backward) sharing one row per site; see module docstring."""
    f = get_format(fmt)
    lo_sub, lo_norm, hi_max = math.log2(f.min_subnormal), math.log2(f.min_normal), math.log2(f.max)
    sites = list(dict.fromkeys(r.site for r in records))
    row = {s: i for i, s in enumerate(sites)}
    n = max(len(sites), 1)
    # A bare Figure (no pyplot): no global state, no GUI backend, safe in scripts and servers.
    fig = Figure(figsize=(17, 2.4 + ROW_HEIGHT_IN * n))
    axes = fig.subplots(1, 2, sharey=True, gridspec_kw={"wspace": 0.04})
    data = _finite([v for r in records for v in (*r.spread, r.log2_rms, r.log2_absmax)])
    d_lo, d_hi = (min(data), max(data)) if data else (-8.0, 8.0)
    # Show the format's ranges, but do not let a wide format (fp32) squash the data into one column.
    x_lo = max(min(d_lo, lo_sub) - 1.5, d_lo - 10)
    x_hi = min(max(d_hi, hi_max) + 1.5, d_hi + 10)
    for ax, direction in zip(axes, ("forward", "backward")):
        ax.axvspan(lo_norm, hi_max, color="tab:green", alpha=0.10, lw=0)
        ax.axvspan(lo_sub, lo_norm, color="tab:orange", alpha=0.18, lw=0)
        ax.axvspan(x_lo - 100, lo_sub, color="0.6", alpha=0.18, lw=0)
        ax.axvspan(hi_max, x_hi + 100, color="tab:red", alpha=0.12, lw=0)
        ax.axvline(0, color="0.3", lw=0.8, ls="--")
        _draw_group_lines(ax, sites)
        mine = [r for r in records if r.direction == direction]
        per_site: dict[str, int] = {}
        for r in mine:
            per_site[r.site] = per_site.get(r.site, 0) + 1
        seen: dict[str, int] = {}
        for r in mine:
            k = seen.get(r.site, 0)
            seen[r.site] = k + 1
            m = per_site[r.site]
            y = row[r.site] + (0 if m == 1 else (k - (m - 1) / 2) * 0.5 / (m - 1))
            _draw_record(ax, r, y, x_lo)
        ax.set_xlim(x_lo, x_hi)
        ax.set_xlabel("log2 |value|  (dot: RMS, bar: 1–99 % of |x|, tick: absmax)", fontsize=10)
        ax.set_title(
            "forward: activations and weights" if direction == "forward" else "backward: gradients",
            fontsize=12,
        )
        ax.grid(axis="x", color="0.85", lw=0.5)
        ax.set_axisbelow(True)
        ax.tick_params(axis="x", labelsize=9, top=True, labeltop=True)
    axes[0].set_yticks(range(len(sites)))
    axes[0].set_yticklabels(sites, fontsize=8)
    axes[0].set_ylim(n - 0.5, -0.5)
    handles = [
        Line2D([], [], marker="o", ls="-", color=c, label=k.replace("_", " ")) for k, c in COLOURS.items()
    ]
    handles += [
        Patch(color="tab:green", alpha=0.25, label=f"{f.name} normal range"),
        Patch(color="tab:orange", alpha=0.35, label=f"{f.name} subnormal range"),
        Patch(color="0.6", alpha=0.35, label="flushed to zero"),
        Patch(color="tab:red", alpha=0.25, label="overflow"),
        Line2D([], [], marker="x", ls="", color="black", label="non-finite / zero RMS"),
    ]
    # Title and legend take a fixed height in inches above the panels, whatever the number of rows.
    height = fig.get_figheight()
    fig.subplots_adjust(top=1 - 1.5 / height, bottom=0.7 / height, left=0.2, right=0.98)
    fig.suptitle(title, fontsize=14, y=1 - 0.12 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.45 / height))
    return fig


def _draw_record(ax: Any, r: Any, y: float, x_lo: float) -> None:
    c = COLOURS[r.role]
    lo, hi = r.spread
    if math.isfinite(lo) and math.isfinite(hi):
        ax.plot([lo, hi], [y, y], color=c, lw=1.6, alpha=0.7, solid_capstyle="butt")
    if math.isfinite(r.log2_absmax):
        ax.plot([r.log2_absmax], [y], marker="|", ms=7, color=c)
    if math.isfinite(r.log2_rms) and r.nonfinite == 0:
        ax.plot([r.log2_rms], [y], marker="o", ms=4.5, color=c)
    else:
        ax.plot([x_lo + 0.3], [y], marker="x", ms=6, color="black")


def _draw_group_lines(ax: Any, sites: Sequence[str]) -> None:
    prev = None
    for i, s in enumerate(sites):
        g = _group(s)
        if prev is not None and g != prev:
            ax.axhline(i - 0.5, color="0.55", lw=0.6)
        prev = g
