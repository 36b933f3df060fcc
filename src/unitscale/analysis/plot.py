"""Scale plots in the style of the unit-scaling paper, against a format's normal and subnormal ranges.

``plot_records``: one row per site of a ``track_scales`` report. Each record is drawn on the row of its
site: a dot at log2 RMS, a bar over the central 98 % of log2|x| (finite non-zero values) and a tick at
log2 absmax. Forward tensors (activations, weights) on the left, backward tensors (gradients, weight
gradients) on the right, with the format's ranges as bands behind them.

``plot_history``: the scale monitor's checks over training (``unitscale.analysis.history``), one line per
layer group, log2 RMS and the overflow / subnormal / underflow fractions against the same bands and the
comfort rule (``unitscale.analysis.health``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from unitscale.analysis.health import ComfortRule
from unitscale.analysis.history import FRACTIONS, METRICS, layer_group, scale_history
from unitscale.formats import Format, get_format

COLOURS = {
    "activation": "tab:blue", "weight": "tab:green", "gradient": "tab:red", "weight_grad": "tab:purple",
}
ROW_HEIGHT_IN = 0.19
# Band colours (and alpha) of a format's ranges, shared by both plots and their legends.
NORMAL_BAND = ("tab:green", 0.10)
SUBNORMAL_BAND = ("tab:orange", 0.18)
UNDERFLOW_BAND = ("0.6", 0.18)
OVERFLOW_BAND = ("tab:red", 0.12)


def draw_format_ranges(ax: Any, fmt: Format, *, vertical: bool = True, lo: float | None = None,
                       hi: float | None = None) -> None:
    """Bands of ``fmt``'s ranges in log2 |value| on ``ax``: normal and subnormal, plus underflow down to
    ``lo`` and overflow up to ``hi`` when given. ``vertical``: the value axis is x (the bands are
    vertical)."""
    span = ax.axvspan if vertical else ax.axhspan
    lo_sub, lo_norm, hi_max = math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), math.log2(fmt.max)
    bands = [((lo_norm, hi_max), NORMAL_BAND), ((lo_sub, lo_norm), SUBNORMAL_BAND)]
    if lo is not None:
        bands.append(((lo, lo_sub), UNDERFLOW_BAND))
    if hi is not None:
        bands.append(((hi_max, hi), OVERFLOW_BAND))
    for (a, b), (colour, alpha) in bands:
        span(a, b, color=colour, alpha=alpha, lw=0)


def format_legend(fmt: Format) -> list[Patch]:
    """Legend entries for the bands of :func:`draw_format_ranges`."""
    return [
        Patch(color=NORMAL_BAND[0], alpha=0.25, label=f"{fmt.name} normal range"),
        Patch(color=SUBNORMAL_BAND[0], alpha=0.35, label=f"{fmt.name} subnormal range"),
        Patch(color=UNDERFLOW_BAND[0], alpha=0.35, label="underflow (flushed to zero)"),
        Patch(color=OVERFLOW_BAND[0], alpha=0.25, label="overflow"),
    ]


def _finite(vals: Sequence[float]) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


def plot_records(records: Sequence[Any], fmt: str, title: str = "") -> Any:
    """Figure with two panels (forward | backward) sharing one row per site; see module docstring."""
    f = get_format(fmt)
    lo_sub, hi_max = math.log2(f.min_subnormal), math.log2(f.max)
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
        draw_format_ranges(ax, f, lo=x_lo - 100, hi=x_hi + 100)
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
        *format_legend(f),
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
        g = layer_group(s)
        if prev is not None and g != prev:
            ax.axhline(i - 0.5, color="0.55", lw=0.6)
        prev = g


def plot_history(records: Sequence[Mapping[str, Any]], *, rule: ComfortRule | None = None,
                 title: str = "") -> Figure:
    """A Figure of the scale monitor's checks over training: rows log2 RMS, then the overflow / subnormal /
    underflow fractions; columns weight / activation / grad; one line per layer group (RMS: geometric mean
    with the group's min-max envelope; fractions: the group's worst tensor). Bands: the format's ranges and
    ``rule``'s comfortable RMS band; dashed lines: its overflow and underflow limits. ValueError when the
    records hold no check."""
    from matplotlib import colormaps

    history, formats = scale_history(records)
    order = ("weight", "activation", "grad")
    roles = [r for r in order if r in history] + sorted(set(history) - set(order))
    if not roles:
        raise ValueError("no scale-health checks in these records (train with monitor_every > 0; the "
                         "monitor records only modules that run the simulate or fp8 backend)")
    rule = rule or ComfortRule()
    limits = {"overflow": rule.max_overflow, "underflow": rule.max_underflow}
    fig = Figure(figsize=(5.2 * len(roles) + 2.2, 11))
    axes = fig.subplots(len(METRICS), len(roles), sharex=True, squeeze=False)
    groups = list(dict.fromkeys(g for r in roles for g in history[r]))
    cmap = colormaps["viridis"]
    colour = {g: cmap(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}
    for j, role in enumerate(roles):
        fmt = get_format(formats[role][0])
        others = f" (+ {', '.join(formats[role][1:])})" if len(formats[role]) > 1 else ""
        ax = axes[0][j]
        draw_format_ranges(ax, fmt, vertical=False)
        ax.axhspan(*rule.band(fmt), color=NORMAL_BAND[0], alpha=NORMAL_BAND[1], lw=0)
        ax.set_title(f"{role}: {fmt.name}{others}", fontsize=11)
        for group, s in history[role].items():
            ax.plot(s.steps, s.log2_rms, color=colour[group], lw=1.3, marker=".", label=group)
            ax.fill_between(s.steps, s.log2_rms_min, s.log2_rms_max, color=colour[group], alpha=0.12, lw=0)
            for i, key in enumerate(FRACTIONS, start=1):
                axes[i][j].plot(s.steps, s.fractions[key], color=colour[group], lw=1.3, marker=".")
        for i, key in enumerate(FRACTIONS, start=1):
            a = axes[i][j]
            a.set_yscale("symlog", linthresh=1e-6)
            a.set_ylim(0, 1.2)
            if key in limits:
                a.axhspan(limits[key], 1.2, color=OVERFLOW_BAND[0], alpha=0.08, lw=0)
                a.axhline(limits[key], color=OVERFLOW_BAND[0], lw=0.8, ls="--")
    labels = {"rms": "log2 RMS", "overflow": "fraction overflow", "subnormal": "fraction subnormal",
              "underflow": "fraction underflow (to 0)"}
    for i, key in enumerate(METRICS):
        axes[i][0].set_ylabel(labels[key])
        for a in axes[i]:
            a.grid(color="0.88", lw=0.5)
    for a in axes[-1]:
        a.set_xlabel("step")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False, title="layer group")
    fig.suptitle(title or "scale health over training (band: comfortable RMS; dashed: limits)", fontsize=12)
    fig.subplots_adjust(left=0.07, right=1 - 1.9 / fig.get_figwidth(), top=0.93, bottom=0.05, hspace=0.12)
    return fig
