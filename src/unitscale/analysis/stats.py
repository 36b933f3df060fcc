"""Per-tensor scale statistics, computed on the tensor's device without a host sync.

For a tensor x with n elements, of which F are finite (non-finite values are counted, then excluded):

    rms    = sqrt(Σ_finite x² / F)          mean = Σ_finite x / F          absmax = max_finite |x|
    hist   = counts of floor(BINS_PER_OCTAVE · log2|x|) over finite non-zero x, plus a zero and a
             non-finite bin (the "spread" of the plots is read from it)
    range  = ``unitscale.formats.range_counts(x, fmt)`` (zero / underflow / subnormal / normal / overflow /
             non-finite counts, the single place the format rule lives), turned into fractions at the end
             by ``fractions_from_counts`` exactly as ``range_fractions`` does, without its per-tensor sync.

``tensor_stats`` returns 0-d / 1-d tensors; ``to_host`` stacks many of them and copies once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unitscale.formats import RANGE_KEYS, range_counts

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


def tensor_stats(x: Tensor, fmt: Any) -> dict[str, Tensor]:
    """Scale statistics of ``x`` as device tensors (see module docstring); ``fmt`` is a ``Format``."""
    with torch.no_grad():
        x = x.detach()
        xf = x if x.dtype == torch.float64 else x.float()
        finite = torch.isfinite(xf)
        n_finite = finite.sum()
        xz = torch.where(finite, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
        denom = n_finite.clamp(min=1).double()
        # float64 accumulation: squares of values beyond 2^64 would overflow float32.
        sumsq = torch.linalg.vector_norm(xz, dtype=torch.float64) ** 2
        out = {
            "numel": torch.tensor(x.numel(), dtype=torch.int64, device=x.device),
            "nonfinite": x.numel() - n_finite,
            "rms": (sumsq / denom).sqrt(),
            "mean": xz.sum(dtype=torch.float64) / denom,
            "absmax": (
                xz.abs().amax().double()
                if x.numel()
                else torch.zeros((), dtype=torch.float64, device=x.device)
            ),
            "hist": log2_histogram(xf),
        }
        out["range"] = range_counts(x, fmt)
    return out


def to_host(stats: Sequence[Mapping[str, Tensor]]) -> dict[str, np.ndarray]:
    """Stack each field over many ``tensor_stats`` results and copy it to the host (one copy per field)."""
    if not stats:
        return {}
    keys = list(stats[0])
    out: dict[str, np.ndarray] = {}
    for key in keys:
        # Records may live on several devices (model parallel); group the copy by device.
        values = [s[key] for s in stats]
        devices = {v.device for v in values}
        if len(devices) == 1:
            out[key] = torch.stack(values).cpu().numpy()
        else:
            out[key] = torch.stack([v.cpu() for v in values]).numpy()
    return out


def fractions_from_counts(counts: Sequence[int]) -> dict[str, float]:
    """``range_fractions``' result from a ``range_counts`` vector: fractions of the finite non-zero values.

    Keys ``RANGE_KEYS``: underflow (flushed to zero), subnormal (includes underflow), normal, overflow.
    Kept identical to ``unitscale.formats.range_fractions`` (tests compare the two on the same tensors).
    """
    zero, under, sub, normal, over, _ = (int(c) for c in counts)
    n = under + sub + normal + over
    values = {"underflow": under, "subnormal": under + sub, "normal": normal, "overflow": over}
    return {k: (values[k] / n if n else 0.0) for k in RANGE_KEYS}


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
