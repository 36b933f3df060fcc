"""Scale analysis: record the RMS, range and format fractions of every tensor of one training step.

    report = unitscale.analysis.track_scales(model, inputs, fmt="e4m3")
    rich.print(report.table()); report.plot("scales.png"); report.to_json("scales.json")
"""

from __future__ import annotations

from unitscale.analysis.report import ScaleRecord, ScaleReport
from unitscale.analysis.track import OPS, track_scales

__all__ = ["OPS", "ScaleRecord", "ScaleReport", "track_scales"]
