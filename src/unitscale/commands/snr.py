"""``unitscale snr``: quantisation signal-to-noise of every format (US-paper Fig. 2; docs/theory.md,
Signal-to-noise).

Prints SNR = E[x²]/E[(x - Q(x))²] for x ~ N(0, σ²) at one σ; ``--plot`` draws SNR against log2 σ (why unit
scale sits on every float format's plateau) and the bulk SNR with Kσ outliers (why FP8 tolerates outliers
and absmax INT8 does not).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from unitscale.formats import FORMATS, snr

NAME = "snr"
HELP = "Quantisation SNR of each format for Gaussian data; --plot draws SNR vs sigma and vs outliers."

INT8_STEP = 2.0**-4


@dataclass(frozen=True)
class Curve:
    """One quantiser: a format plus how its scale is chosen."""

    label: str
    fmt: str
    scaling: str | None = None
    step: float | None = None
    style: str = "-"

    def snr(self, sigma: float, n: int, **kw: float) -> float:
        return snr(self.fmt, sigma, n=n, scaling=self.scaling, step=self.step, **kw)


TABLE = [Curve(name, name) for name, f in FORMATS.items() if f.is_float] + [
    Curve("int8, step 2^-4", "int8", step=INT8_STEP),
    Curve("int8, absmax", "int8", scaling="absmax"),
    Curve("int4, absmax", "int4", scaling="absmax"),
]
SIGMA_CURVES = [
    Curve("fp16", "fp16"),
    Curve("bf16", "bf16"),
    Curve("fp8 E4 (a) e4m3fnuz", "fp8_e4a", style="--"),
    Curve("fp8 E4 (b) e4m3fn", "fp8_e4b"),
    Curve("fp8 E5 (a) e5m2fnuz", "fp8_e5a", style="--"),
    Curve("fp8 E5 (b) e5m2", "fp8_e5b"),
    Curve("int8, fixed step 2^-4", "int8", step=INT8_STEP, style="-."),
    Curve("int8, absmax scale", "int8", scaling="absmax", style=":"),
]
OUTLIER_CURVES = [
    Curve("int8, absmax scale", "int8", scaling="absmax", style=":"),
    Curve("fp8 e4m3fn, absmax scale", "fp8_e4b", scaling="absmax", style="-"),
    Curve("fp8 e4m3fn, no scale", "fp8_e4b", style="--"),
]
LOG2_SIGMAS = list(range(-20, 21))
OUTLIER_KS = [10.0 ** (k / 4) for k in range(0, 21)]  # 1 … 1e5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sigma", type=float, default=1.0, help="σ of the Gaussian data (default 1)")
    parser.add_argument("--samples", type=int, default=2**20, help="samples for the table (default 2^20)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw SNR vs log2 σ and vs outlier size to FILE")
    parser.add_argument(
        "--plot-samples", type=int, default=2**16, help="samples per point of the plot (default 2^16)"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="write the numbers (and the curves with --plot) as JSON"
    )


def _db(v: float) -> float:
    return 10 * math.log10(v) if v > 0 else -math.inf


def _finite_or_none(obj: object) -> object:
    """JSON has no inf: an exact quantiser's infinite SNR is written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def sweep(n: int) -> dict[str, object]:
    """SNR (dB) per σ-curve over LOG2_SIGMAS and per outlier-curve over OUTLIER_KS."""
    return {
        "samples": n,
        "log2_sigma": LOG2_SIGMAS,
        "sigma_db": {c.label: [_db(c.snr(2.0**s, n)) for s in LOG2_SIGMAS] for c in SIGMA_CURVES},
        "outlier_k": OUTLIER_KS,
        "outlier_db": {c.label: [_db(c.snr(1.0, n, outliers=k)) for k in OUTLIER_KS] for c in OUTLIER_CURVES},
    }


def plot(data: dict, path: str) -> None:
    """Two panels: SNR vs log2 σ (markers at σ = 1) and bulk SNR vs outlier scale K."""
    from matplotlib.figure import Figure  # Figure + savefig uses the Agg canvas; no pyplot state

    fig = Figure(figsize=(15, 6.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.35, 1])
    colors = {c.label: f"C{i}" for i, c in enumerate(SIGMA_CURVES)}
    colors["fp8 e4m3fn, absmax scale"] = colors["fp8 E4 (b) e4m3fn"]
    colors["fp8 e4m3fn, no scale"] = "black"
    at_one = data["log2_sigma"].index(0)
    for c in SIGMA_CURVES:
        ys = data["sigma_db"][c.label]
        left.plot(data["log2_sigma"], ys, c.style, color=colors[c.label], label=c.label, lw=1.8)
        left.plot([0], [ys[at_one]], "o", color=colors[c.label], ms=6)
    left.axvline(0, color="0.4", lw=1, ls=":")
    left.annotate("σ = 1 (unit scaling)", (0, 2), xytext=(0.6, 2), fontsize=9, color="0.3")
    left.set(xlabel="log₂ σ of the data (x ~ N(0, σ²))", ylabel="SNR (dB)", xlim=(-20, 20), ylim=(-2, 80))
    left.set_xticks(range(-20, 21, 4))
    left.set_title("SNR vs scale: float formats are flat over many octaves, fixed-step INT8 over ~1")
    left.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8.5, ncol=2, framealpha=0.9)

    for c in OUTLIER_CURVES:
        right.plot(data["outlier_k"], data["outlier_db"][c.label], c.style, color=colors[c.label], lw=1.8,
                   marker="o", ms=3, label=c.label)  # fmt: skip
    right.set_xscale("log")
    right.set(
        xlabel=f"outlier scale K (16 of {data['samples']} values scaled by K)",
        ylabel="SNR of the bulk (dB)",
        ylim=(-2, 45),
    )
    right.set_title("Outliers: absmax INT8 loses the bulk as 1/K², E4M3 keeps it")
    right.grid(alpha=0.3, which="both")
    right.legend(loc="lower left", fontsize=8.5, framealpha=0.9)
    fig.suptitle(
        "Why FP8 tolerates outliers and INT8 does not: a float format has the same relative precision in "
        "every binade,\nso an outlier only uses headroom; an integer grid's step is set by its largest value",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.samples < 2 or args.plot_samples < 64:
        raise ValueError(
            f"need --samples >= 2 and --plot-samples >= 64, got {args.samples}, {args.plot_samples}"
        )
    table = Table(title="Quantisation SNR = E(x²) / E((x - Q(x))²)")
    for col in ("format", "SNR", "dB"):
        table.add_column(col, justify="left" if col == "format" else "right")
    results = {}
    for c in TABLE:
        value = c.snr(args.sigma, args.samples)
        results[c.label] = {"snr": value, "db": _db(value)}
        table.add_row(c.label, f"{value:.3g}", f"{_db(value):.1f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a pipe or file: do not wrap the title
    console.print(f"x ~ N(0, σ²) with σ = {args.sigma:g}, {args.samples} samples; Q = RNE with clamping")
    console.print(table)
    out: dict[str, object] = {"sigma": args.sigma, "samples": args.samples, "snr": results}
    if args.plot:
        out["curves"] = data = sweep(args.plot_samples)
        plot(data, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_finite_or_none(out), f, indent=2)
        print(f"wrote {args.json}")
    return 0
