"""Per-tensor scale statistics, computed on the tensor's device without a host sync.

The one place both the offline analysis (``track_scales``) and the live monitor (``unitscale.monitor``)
compute a tensor's statistics. For a tensor x with n elements, of which F are finite (non-finite values
are counted, then excluded):

    rms    = sqrt(Σ_finite x² / F)  (float64 sums)    mean = Σ_finite x / F    absmax = max_finite |x|
    range  = ``unitscale.formats.range_counts(x, fmt)``: zero / underflow / subnormal / normal / overflow /
             non-finite counts (the single place the format rule lives); fractions of them come from
             ``unitscale.formats.fractions_from_counts``
    hist   = counts of floor(BINS_PER_OCTAVE · log2|x|) over finite non-zero x, plus a zero and a
             non-finite bin (the "spread" of the plots is read from it)

mean, absmax and hist are the analysis report's details; the live monitor needs only rms and range.

``tensor_stats`` returns 0-d / 1-d tensors; ``to_host`` packs many of them and copies once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unitscale.formats import range_counts

BINS_PER_OCTAVE = 4
# log2 range covered by the histogram: below the fp32 smallest subnormal (2^-149) to above its max (2^128).
HIST_LO, HIST_HI = -160, 144
N_OCTAVE_BINS = (HIST_HI - HIST_LO) * BINS_PER_OCTAVE
ZERO_BIN, NONFINITE_BIN = 0, N_OCTAVE_BINS + 1  # octave bins are 1..N_OCTAVE_BINS
N_BINS = N_OCTAVE_BINS + 2


def log2_histogram(x: Tensor) -> Tensor:
    """int64 counts: [zeros, quarter-octave bins of log2|x| from HIST_LO to HIST_HI, non-finite]."""
    a = x.detach().abs().float().reshape(-1)
    finite = torch.isfinite(a)
    code = torch.floor(torch.log2(a) * BINS_PER_OCTAVE) - HIST_LO * BINS_PER_OCTAVE + 1
    code = code.clamp(1, N_OCTAVE_BINS)
    code = torch.where(a == 0, torch.zeros_like(code), code)
    code = torch.where(finite, code, torch.full_like(code, NONFINITE_BIN)).long()
    # scatter_add_ with a fixed-size output keeps the shape static (bincount would sync on CUDA).
    counts = torch.zeros(N_BINS, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, code, torch.ones_like(code))


def tensor_stats(x: Tensor, fmt: Any, *, detail: bool = True) -> dict[str, Tensor]:
    """Scale statistics of ``x`` as device tensors (see module docstring); ``fmt`` is a float ``Format``.

    Keys: numel, nonfinite, rms, range; with ``detail`` (the analysis report) also mean, absmax and hist.
    The scale monitor leaves ``detail`` off: two passes over x besides the range counts."""
    with torch.no_grad():
        x = x.detach()
        xf = x if x.dtype == torch.float64 else x.float()
        counts = range_counts(x, fmt)
        xz = torch.nan_to_num(xf, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite values are excluded
        denom = (x.numel() - counts[5]).clamp(min=1).double()
        # float64 accumulation: squares of values beyond 2^64 would overflow float32.
        sumsq = torch.linalg.vector_norm(xz, dtype=torch.float64) ** 2
        out = {
            "numel": torch.tensor(x.numel(), dtype=torch.int64, device=x.device),
            "nonfinite": counts[5],
            "rms": (sumsq / denom).sqrt(),
            "range": counts,
        }
        if detail:
            out["mean"] = xz.sum(dtype=torch.float64) / denom
            empty = torch.zeros((), dtype=torch.float64, device=x.device)
            out["absmax"] = xz.abs().amax().double() if x.numel() else empty
            out["hist"] = log2_histogram(xf)
    return out


def to_host(stats: Sequence[Mapping[str, Tensor]]) -> dict[str, np.ndarray]:
    """Stack each field over many ``tensor_stats`` results on the host, with one device-to-host copy.

    Every record is packed into one float64 row (counts are exact in float64 up to 2^53), the rows are
    stacked and copied once, and integer fields come back as int64."""
    if not stats:
        return {}
    first = stats[0]
    keys = list(first)
    rows = [torch.cat([s[k].reshape(-1).to(torch.float64) for k in keys]) for s in stats]
    # Records may live on several devices (model parallel): then each row is copied on its own.
    if len({r.device for r in rows}) == 1:
        table = torch.stack(rows).cpu().numpy()
    else:
        table = torch.stack([r.cpu() for r in rows]).numpy()
    out: dict[str, np.ndarray] = {}
    col = 0
    for key in keys:
        width = first[key].numel()
        block = table[:, col : col + width].reshape(len(stats), *first[key].shape)
        out[key] = block if first[key].is_floating_point() else block.astype(np.int64)
        col += width
    return out


def safe_log2(v: float | None) -> float:
    """log2 v for a statistic: −inf for 0, NaN for None, NaN or a negative value."""
    if v is None or math.isnan(v) or v < 0:
        return math.nan
    return math.log2(v) if v > 0 else -math.inf


def hist_quantile(hist: np.ndarray, q: float) -> float:
    """log2 of the q-quantile of |x| over finite non-zero values, read from a ``log2_histogram``.

    Linear interpolation inside the quarter-octave bin; NaN when there is no finite non-zero value.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q={q} must lie in [0, 1]")
    counts = np.asarray(hist[1 : N_OCTAVE_BINS + 1], dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return math.nan
    cum = np.cumsum(counts)
    target = q * total
    # First non-empty bin whose cumulative count reaches the target (q = 0 must not land on empty bins).
    i = int(np.flatnonzero((cum >= target) & (counts > 0))[0])
    below = cum[i] - counts[i]
    inside = (target - below) / counts[i] if counts[i] else 0.0
    return HIST_LO + (i + float(np.clip(inside, 0.0, 1.0))) / BINS_PER_OCTAVE
