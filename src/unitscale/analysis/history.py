"""Scale statistics over training: the scale monitor's checks (``"scales"`` records of a run's
metrics.jsonl) grouped by layer and role, ready to plot (``unitscale.analysis.plot.plot_history``).

Each check row holds one tensor's ``rms`` and its ``overflow`` / ``subnormal`` / ``underflow`` fractions
(``unitscale.formats.fractions_from_counts``). Rows written before those names were adopted used
``saturated`` for overflow and ``flushed`` for underflow; :func:`upgrade_row` reads them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unitscale.analysis.stats import safe_log2

FRACTIONS: tuple[str, ...] = ("overflow", "subnormal", "underflow")
METRICS: tuple[str, ...] = ("rms", *FRACTIONS)
LEGACY_KEYS: dict[str, str] = {"saturated": "overflow", "flushed": "underflow"}
_LAYER = re.compile(r"^(.*?\.\d+)(?:[.#]|$)")


def layer_group(path: str) -> str:
    """The repeated block a module path or analysis site belongs to (``blocks.3`` for
    ``blocks.3.body.qkv`` or ``blocks.3.mlp / linear``), else its first name (``lm_head``); ``<model>``
    for the root."""
    module = path.split(" / ")[0]
    m = _LAYER.match(module)
    return m.group(1) if m else (module.split(".")[0].split("#")[0] or "<model>")


def upgrade_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A check row with the current key names (``saturated`` → ``overflow``, ``flushed`` → ``underflow``)."""
    return {LEGACY_KEYS.get(k, k): v for k, v in row.items()}


@dataclass
class GroupSeries:
    """One layer group's tensors of one role over the checks: per step, log2 RMS (geometric mean, min and
    max over the tensors) and each fraction's maximum (the group's worst tensor)."""

    steps: list[int]
    log2_rms: list[float]
    log2_rms_min: list[float]
    log2_rms_max: list[float]
    fractions: dict[str, list[float]]


def scale_history(
    records: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, GroupSeries]], dict[str, list[str]]]:
    """({role: {group: series}}, {role: formats seen}) from metrics records (``"scales"`` events only)."""
    acc: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    formats: dict[str, list[str]] = {}
    for rec in records:
        if rec.get("event") != "scales":
            continue
        for raw in rec.get("tensors", []):
            row = upgrade_row(raw)
            role = row["role"]
            acc.setdefault(role, {}).setdefault(layer_group(row["module"]), {}).setdefault(
                rec["step"], []
            ).append(row)
            if row["format"] not in formats.setdefault(role, []):
                formats[role].append(row["format"])
    out: dict[str, dict[str, GroupSeries]] = {}
    for role, groups in acc.items():
        out[role] = {}
        for group, by_step in groups.items():
            steps = sorted(by_step)
            finite = [[v for r in by_step[s] if math.isfinite(v := safe_log2(r.get("rms")))] for s in steps]
            out[role][group] = GroupSeries(
                steps=steps,
                log2_rms=[sum(v) / len(v) if v else math.nan for v in finite],
                log2_rms_min=[min(v) if v else math.nan for v in finite],
                log2_rms_max=[max(v) if v else math.nan for v in finite],
                fractions={k: [max((r.get(k) or 0.0) for r in by_step[s]) for s in steps] for k in FRACTIONS},
            )
    return out, formats
