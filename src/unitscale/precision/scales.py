"""Per-weight power-of-two cast scales: the one rule every backend that casts weights calls.

A weight W is cast as q(W / s)·s with s a power of two, so the division and the dequantisation are exact and
the only error is q's rounding (docs/theory.md, Weight scales). The modes:

    static     s = a fixed power of two (1 unless the backend is given another): the paper's unscaled cast
    pow2_amax  s = 2^-k, k the largest integer with max|W|·2^k ≤ max of the format: W's largest value lands
               in the format's top binade, so nothing saturates and as little as possible is subnormal
    pow2_rms   s = 2^round(log2 rms(W)): W/s has RMS in [2^-½, 2^½], the centre of the format's range

Both data-dependent modes are computed on the device (no host sync) from the weight being cast, each time it
is cast: the weight is read for its cast anyway, and no activation statistics or scale history is involved.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

WeightScale = Literal["static", "pow2_amax", "pow2_rms"]
WEIGHT_SCALES: tuple[str, ...] = ("static", "pow2_amax", "pow2_rms")
_MIN_EXP, _MAX_EXP = -126, 127  # s stays a normal float32


def check_weight_scale(mode: str) -> str:
    """``mode`` if it is one of WEIGHT_SCALES, else ValueError naming the accepted ones."""
    if mode not in WEIGHT_SCALES:
        raise ValueError(f"unknown weight_scale {mode!r}; accepted: {', '.join(WEIGHT_SCALES)}")
    return mode


def _pow2(k: Tensor) -> Tensor:
    """2^k for an integer-valued float tensor k (1 where k is not finite), k clamped to float32's normals."""
    k = torch.where(torch.isfinite(k), k, torch.zeros_like(k)).clamp(_MIN_EXP, _MAX_EXP)
    return torch.ldexp(torch.ones_like(k), k)


def pow2_rms_scale(w: Tensor) -> Tensor:
    """s = 2^round(log2 rms(w)) as a float32 0-dim tensor on w's device; 1 if rms is 0 or not finite."""
    rms = w.detach().float().pow(2).mean().sqrt()
    return _pow2(torch.round(torch.log2(rms)))


def pow2_amax_scale(w: Tensor, fmt_max: float) -> Tensor:
    """s = 2^-k, k the largest integer with max|w|·2^k ≤ fmt_max; a float32 0-dim tensor on w's device.

    Exact: with max|w| = m·2^e and fmt_max = m_f·2^{e_f} (frexp, m in [½, 1)), k = e_f − e when m ≤ m_f,
    else e_f − e − 1; no logarithm whose rounding could push max|w|·2^k past fmt_max. 1 if max|w| is 0 or
    not finite.
    """
    amax = w.detach().abs().max().float()
    mant, exp = torch.frexp(amax)
    mant_f, exp_f = math.frexp(fmt_max)
    k = (exp_f - exp).float() - (mant > mant_f).float()
    ok = torch.isfinite(amax) & (amax > 0)
    return _pow2(torch.where(ok, -k, torch.zeros_like(k)))


def weight_scale(w: Tensor, mode: str, fmt_max: float, static: float = 1.0) -> Tensor:
    """The dequantisation scale s of ``w``'s cast under ``mode`` (module docstring); float32, 0-dim."""
    check_weight_scale(mode)
    if mode == "pow2_amax":
        return pow2_amax_scale(w, fmt_max)
    if mode == "pow2_rms":
        return pow2_rms_scale(w)
    return torch.full((), static, dtype=torch.float32, device=w.device)
