"""``unitscale formats``: the table of number formats, derived from (E, M, bias) (docs/theory.md, Format
table)."""

from __future__ import annotations

import argparse
import json
import math

from unitscale.formats import FORMATS, Format

NAME = "formats"
HELP = "Print the number formats: bits, exponent/mantissa, bias, range and special values."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")


def _pow2(v: float) -> str:
    exp = math.log2(v)
    return f"2^{int(exp)} ≈ {v:.3g}" if exp == int(exp) else f"{v:.5g}"


def describe(fmt: Format) -> dict[str, object]:
    """One row of the table as plain values."""
    row: dict[str, object] = {"name": fmt.name, "bits": fmt.bits}
    if fmt.is_float:
        row |= {
            "E": fmt.exponent_bits,
            "M": fmt.mantissa_bits,
            "bias": fmt.bias,
            "max": fmt.max,
            "min_normal": fmt.min_normal,
            "min_subnormal": fmt.min_subnormal,
            "max_exp": fmt.max_exp,
            "min_exp": fmt.min_exp,
            "epsilon": fmt.epsilon,
            "inf": fmt.has_inf,
            "nan": fmt.nan,
            "nan_codes": fmt.nan_codes,
            "negative_zero": fmt.negative_zero,
        }
    else:
        row |= {"qmin": fmt.qmin, "qmax": fmt.qmax, "signed": fmt.signed}
    row["torch_dtype"] = str(fmt.torch_dtype).removeprefix("torch.") if fmt.torch_dtype else None
    return row


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Number formats (constants derived from E, M, bias and the NaN/inf encoding)")
    for col in (
        "format",
        "bits",
        "E",
        "M",
        "bias",
        "max",
        "min normal",
        "min subnormal",
        "max exp",
        "min exp",
    ):
        table.add_column(col, justify="left" if col == "format" else "right", no_wrap=True)
    for col in ("inf", "NaN", "-0", "torch dtype"):
        table.add_column(col, no_wrap=True)
    rows = [describe(f) for f in FORMATS.values()]
    for fmt, r in zip(FORMATS.values(), rows):
        dtype = r["torch_dtype"] or "—"
        if fmt.is_float:
            nan = {"ieee": f"{fmt.nan_codes} codes", "all_ones": "S.1111.111", "negative_zero": "0x80 only"}
            table.add_row(
                fmt.name, str(fmt.bits), str(fmt.exponent_bits), str(fmt.mantissa_bits), str(fmt.bias),
                f"{fmt.max:.5g}", _pow2(fmt.min_normal), _pow2(fmt.min_subnormal),
                str(fmt.max_exp), str(fmt.min_exp), "yes" if fmt.has_inf else "no", nan[fmt.nan],
                "yes" if fmt.negative_zero else "no", dtype,
            )  # fmt: skip
        else:
            table.add_row(
                fmt.name, str(fmt.bits), "—", "—", "—", str(fmt.qmax), f"codes [{fmt.qmin}, {fmt.qmax}]",
                "needs a scale", "—", "—", "no", "no", "no", dtype,
            )  # fmt: skip
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a pipe or file: keep one line per format
    console.print(table)
    console.print("Aliases: e4m3 = fp8_e4b (OCP E4M3FN), e5m2 = fp8_e5b (OCP E5M2); (a) variants are fnuz.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
