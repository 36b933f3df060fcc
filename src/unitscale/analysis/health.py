"""Scale health of one tensor in the format it is cast to: :class:`TensorStats` and the comfort rule.

Per tensor t about to be cast to format F, from :func:`unitscale.analysis.stats.tensor_stats` (the
statistics the offline analysis records too; the range rule is ``formats.range_counts``, the fractions
``formats.fractions_from_counts``):

    rms        √(mean t²) over all elements (zeros included); NaN when any element is non-finite
    overflow   fraction of finite non-zero |t| > max_F   (clamped to ±max by a saturating cast)
    subnormal  fraction of finite non-zero |t| < min_normal_F   (includes ``underflow``)
    underflow  fraction of finite non-zero |t| ≤ min_subnormal_F / 2   (rounds to zero)
    nonfinite  fraction of all elements that are ±inf or NaN

**Comfortable range** (:class:`ComfortRule`, defaults): a tensor is comfortable in F iff it has no non-finite
value, overflow ≤ 1e-4, underflow ≤ 1 %, and — when it has any non-zero value —

    log2 rms ∈ [log2 min_normal_F + 3, log2 max_F − 3]     (E4M3: [−3, 5.8]; E5M2: [−11, 12.8])

i.e. RMS at least three binades (×8) inside the normal range at both ends. Why three: above, a tensor with
Laplace tails (heavier than Gaussian, typical of gradients) and RMS σ = max/8 puts P(|x| > 8σ) = e^(−8√2)
≈ 1.2e-5 beyond max, under the overflow limit; below, a Gaussian with σ = 8·min_normal flushes
P(|x| < min_subnormal/2) ≈ 0.6 % in E4M3 (under the underflow limit), while its SNR is still on the
plateau (docs/theory.md, Signal-to-noise: within 10× of peak down to σ = 2⁻⁷), so the warning comes
binades before precision is lost — drift shows before a NaN. Unit-scaled tensors (σ ≈ 1) sit in the
middle of both FP8 bands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from unitscale.analysis.history import upgrade_row
from unitscale.formats import Format, fractions_from_counts, get_format


@dataclass(frozen=True)
class TensorStats:
    """Range statistics of one tensor at one check (fractions as in the module docstring)."""

    module: str
    tensor: str
    role: str  # "weight" | "activation" | "grad"
    format: str
    rms: float
    overflow: float
    subnormal: float
    underflow: float
    nonfinite: float
    nonzero: int  # finite non-zero values (the denominator of the fractions)

    @property
    def name(self) -> str:
        return f"{self.module or '<model>'}:{self.tensor}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> TensorStats:
        """From a ``to_dict()`` row of a metrics log, older rows (``saturated``, ``flushed``) included."""
        row = upgrade_row(row)
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def stats_from_counts(
    module: str, tensor: str, role: str, fmt: str | Format, counts: Sequence[float], rms: float
) -> TensorStats:
    """TensorStats from a :func:`formats.range_counts` vector and the RMS of the finite values (the
    ``range`` and ``rms`` of :func:`unitscale.analysis.stats.tensor_stats`); pure.

    The element count is the sum of the counts; rms becomes NaN when any element is non-finite.
    """
    counts = [int(c) for c in counts]
    if len(counts) != 6:
        raise ValueError(f"counts must be the 6 range_counts buckets, got {len(counts)} values")
    numel, nonfinite = sum(counts), counts[5]
    frac = fractions_from_counts(counts)
    return TensorStats(
        module,
        tensor,
        role,
        get_format(fmt).name,
        math.nan if nonfinite else float(rms),
        frac["overflow"],
        frac["subnormal"],
        frac["underflow"],
        nonfinite / numel if numel else 0.0,
        sum(counts[1:5]),
    )


@dataclass(frozen=True)
class ComfortRule:
    """When a tensor is comfortable in its format (see the module docstring for the justification).

    margin_log2: binades the RMS must keep inside [min_normal, max] at each end; max_overflow /
    max_underflow: the largest acceptable fractions (of finite non-zero values).
    """

    margin_log2: float = 3.0
    max_overflow: float = 1e-4
    max_underflow: float = 0.01

    def __post_init__(self) -> None:
        for name in ("margin_log2", "max_overflow", "max_underflow"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"ComfortRule.{name} must be a finite number >= 0, got {v!r}")

    def band(self, fmt: str | Format) -> tuple[float, float]:
        """[lo, hi] in log2 RMS: [log2 min_normal + margin, log2 max − margin]."""
        f = get_format(fmt)
        return math.log2(f.min_normal) + self.margin_log2, math.log2(f.max) - self.margin_log2

    def assess(self, s: TensorStats) -> tuple[float, str]:
        """(score, reason): score = the largest of each criterion's value over its limit (RMS: 2^binades
        outside the band), so score > 1 exactly when the tensor is uncomfortable; reason "" when it is not."""
        if s.nonfinite > 0 or math.isnan(s.rms):
            return math.inf, f"{s.nonfinite:.2%} non-finite values"
        lo, hi = self.band(s.format)
        fmt = get_format(s.format)
        terms: list[tuple[float, str]] = [
            (
                _ratio(s.overflow, self.max_overflow),
                f"{s.overflow:.2e} overflow beyond ±{fmt.max:g} (limit {self.max_overflow:g})",
            ),
            (
                _ratio(s.underflow, self.max_underflow),
                f"{s.underflow:.2%} underflow to zero (limit {self.max_underflow:.2%})",
            ),
        ]
        if s.nonzero > 0:
            log2_rms = math.log2(s.rms) if s.rms > 0 else -math.inf
            side = "below" if log2_rms < lo else "above"
            terms.append(
                (
                    2.0 ** max(lo - log2_rms, log2_rms - hi),
                    f"RMS 2^{log2_rms:.2f} {side} the comfortable band [2^{lo:.2f}, 2^{hi:.2f}]",
                )
            )
        score, reason = max(terms, key=lambda t: t[0])
        return score, (f"{reason} of {s.format}" if score > 1 else "")


def _ratio(value: float, limit: float) -> float:
    if limit == 0:
        return math.inf if value > 0 else 0.0
    return value / limit


Assessed = tuple[TensorStats, float, str]  # (stats, score, reason)


def worst(stats: Sequence[TensorStats], rule: ComfortRule | None = None) -> Assessed | None:
    """The tensor with the highest comfort score (None for no tensors)."""
    rule = rule or ComfortRule()
    return worst_of([(s, *rule.assess(s)) for s in stats])


def worst_of(assessed: Sequence[Assessed]) -> Assessed | None:
    """The highest-scoring (stats, score, reason) triple (None for none)."""
    return max(assessed, key=lambda a: a[1]) if assessed else None


def worst_text(assessed: Assessed | None) -> str:
    """One line for the progress bar: the worst offender and why, or "ok" and the tensor nearest the edge."""
    if assessed is None:
        return "-"
    s, score, reason = assessed
    return f"{s.name}: {reason}" if score > 1 else f"ok (nearest the edge: {s.name})"
