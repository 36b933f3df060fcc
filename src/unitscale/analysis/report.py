"""``ScaleRecord`` (one tensor's statistics) and ``ScaleReport`` (all of them: table, JSON, plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from unitscale.analysis.stats import hist_quantile, safe_log2, to_host
from unitscale.formats import fractions_from_counts

Role = Literal["activation", "gradient", "weight", "weight_grad"]
Direction = Literal["forward", "backward"]
ROLES: tuple[str, ...] = ("activation", "gradient", "weight", "weight_grad")
SPREAD_QUANTILES = (0.01, 0.99)


@dataclass(frozen=True)
class ScaleRecord:
    """Statistics of one recorded tensor. ``name`` = ``f"{module} / {op}"``; ``site`` groups an op's
    forward output with its backward gradient. ``overflow`` / ``subnormal`` / ``underflow`` (flushed to zero,
    a part of ``subnormal``) are fractions of the finite non-zero values in the tracked format, as
    ``unitscale.formats.range_fractions`` defines them; ``nonfinite`` is a fraction of all elements."""

    name: str
    site: str
    module: str
    op: str
    role: Role
    direction: Direction
    shape: tuple[int, ...]
    dtype: str
    order: int
    numel: int
    rms: float
    mean: float
    absmax: float
    nonfinite: float
    overflow: float
    subnormal: float
    underflow: float
    spread: tuple[float, float]  # log2|x| at SPREAD_QUANTILES of the finite non-zero values
    hist: np.ndarray = field(repr=False, compare=False)

    @property
    def log2_rms(self) -> float:
        return safe_log2(self.rms)

    @property
    def log2_absmax(self) -> float:
        return safe_log2(self.absmax)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hist")
        d["shape"] = list(self.shape)
        d["spread"] = list(self.spread)
        d["log2_rms"] = self.log2_rms
        # JSON has no inf/nan: write them as null.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def build_records(entries: Sequence[dict[str, Any]]) -> list[ScaleRecord]:
    """Turn the tracker's entries (device statistics) into records, with one host copy per field."""
    host = to_host([e["stats"] for e in entries])
    records = []
    for i, e in enumerate(entries):
        numel = int(host["numel"][i])
        hist = host["hist"][i]
        frac = fractions_from_counts(host["range"][i])
        records.append(
            ScaleRecord(
                name=e["name"], site=e["site"], module=e["module"], op=e["op"], role=e["role"],
                direction=e["pass"], shape=e["shape"], dtype=e["dtype"], order=e["order"], numel=numel,
                rms=float(host["rms"][i]), mean=float(host["mean"][i]), absmax=float(host["absmax"][i]),
                nonfinite=float(host["nonfinite"][i]) / max(numel, 1),
                overflow=frac["overflow"], subnormal=frac["subnormal"], underflow=frac["underflow"],
                spread=tuple(hist_quantile(hist, q) for q in SPREAD_QUANTILES),
                hist=hist,
            )
        )
    return sorted(records, key=lambda r: r.order)


class ScaleReport:
    """Everything ``track_scales`` recorded. ``records`` are in execution order (backward after forward)."""

    def __init__(self, records: list[ScaleRecord], *, fmt: str, model: str = "") -> None:
        self.records = records
        self.fmt = fmt
        self.model = model

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> ScaleRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no record named {name!r}; e.g. {[r.name for r in self.records[:5]]}")

    def select(self, roles: Iterable[str] | None = None, pattern: str | None = None) -> list[ScaleRecord]:
        """Records whose role is in ``roles`` (default all) and whose name matches regex ``pattern``."""
        import re

        roles = tuple(ROLES if roles is None else roles)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles {bad}; accepted: {list(ROLES)}")
        rx = re.compile(pattern) if pattern else None
        return [r for r in self.records if r.role in roles and (rx is None or rx.search(r.name))]

    def sites(self) -> list[str]:
        """Distinct sites in the order their first record was made (forward order)."""
        return list(dict.fromkeys(r.site for r in self.records))

    # -- outputs ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "format": self.fmt,
            "spread_quantiles": list(SPREAD_QUANTILES),
            "records": [r.to_dict() for r in self.records],
        }

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        """JSON text of ``to_dict()`` (written to ``path`` too when given). Non-finite numbers become null."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    def table(self, roles: Iterable[str] | None = None, pattern: str | None = None) -> Any:
        """A ``rich.table.Table`` of the records (print it with ``rich.print``)."""
        from unitscale.analysis.text import records_table

        return records_table(self.select(roles, pattern), self.fmt, title=self.model)

    def plot(
        self,
        path: str | Path | None = None,
        fmt: str | None = None,
        *,
        roles: Iterable[str] | None = None,
        pattern: str | None = None,
        title: str | None = None,
    ) -> Any:
        """Scale plot (one row per site, forward | backward) against ``fmt``'s ranges (default: the
        tracked format); saved to ``path`` when given. Returns the matplotlib Figure."""
        from unitscale.analysis.plot import plot_records

        fig = plot_records(
            self.select(roles, pattern), fmt or self.fmt, title=title or f"{self.model} scales"
        )
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig

    def __repr__(self) -> str:
        return f"ScaleReport({len(self.records)} records, fmt={self.fmt!r}, model={self.model!r})"
