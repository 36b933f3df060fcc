"""INT4 quantisers: LSQ for forward operands, stochastic rounding and bit splitting for output gradients.

LSQ (docs/theory.md, LSQ), per tensor, v = x/s:
    q = round(clamp(v, −Q_N, Q_P)),        dequantised x̂ = s·q
    δ(v) = −Q_N (v < −Q_N),  Q_P (v > Q_P),  round(v) − v otherwise
    ∂L/∂x = 1[−Q_N ≤ v ≤ Q_P] ⊙ ∂L/∂x̂          (straight-through estimator with clip mask)
    ∂L/∂s = g_s · Σ ∂L/∂x̂ ⊙ δ(v),   g_s = 1/√(numel·Q_P)
    first-call init s = 2·mean(|x|)/√Q_P.

Bit splitting (docs/theory.md, Bit splitting), M = max|∇Y| (a 0-d device tensor), t = ∇Y·T/M ∈ [−T, T],
radix R:
    hi = round(t/R),  lo = SR(t − R·hi),  ∇Y ≈ (R·hi + lo)·M/T.
R·hi is an integer, so R·hi + lo = SR(t) exactly: a two-digit encoding of a (2T+1)-level stochastically
rounded gradient, unbiased when nothing is clipped. R = 14, T = 98 keeps both digits in [−7, 7]. Without a
digit clamp the code computes SR(t) first and takes its digits hi = round(SR/R), lo = SR − R·hi (the same
encoding of the same value); with INT4-code's ±6 clamp it follows the formula above literally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

QRANGES = {"asym": (8, 7), "sym": (7, 7)}


def qbounds(qrange: str) -> tuple[int, int]:
    """(Q_N, Q_P) of a named range: "asym" = [−8, 7] (INT4-code), "sym" = [−7, 7] (paper text)."""
    try:
        return QRANGES[qrange]
    except KeyError:
        raise ValueError(f"unknown qrange {qrange!r}; accepted: {', '.join(map(repr, QRANGES))}") from None


def lsq_init_scale(x: Tensor, qp: int) -> Tensor:
    """Initial LSQ step s = 2·mean(|x|)/√Q_P (0-d tensor, x's dtype, no host sync)."""
    return 2.0 * x.detach().abs().mean() / math.sqrt(qp)


def lsq_codes(x: Tensor, s: Tensor, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    """(q, δ): integer codes round(clamp(x/s, −Q_N, Q_P)) (in x's dtype) and the LSQ residual δ(x/s).

    δ doubles as the clip mask: |δ| ≤ ½ exactly inside the range, δ ∈ {−Q_N, Q_P} outside. Non-finite
    inputs (NaN, ±inf) give NaN codes. Branch-free (no boolean tensors: they cost 4× an arithmetic op on
    CPU): with c = clamp(v), e = v − c is exactly 0 inside and |e| ≥ ulp(Q) outside, so
    min(1, |e|·2^100) is exactly the 0/1 "outside" indicator, and δ = q − c + c·outside.
    """
    v = x / s
    c = torch.clamp(v, -qn, qp)
    # + (v − v) turns ±inf into NaN: saturating an overflowed input would hide a divergence.
    q = torch.round(c) + (v - v)
    outside = (v - c).abs_().mul_(2.0**100).clamp_(max=1.0)
    return q, (q - c).addcmul_(c, outside)


def lsq_inside(delta: Tensor) -> Tensor:
    """Clip mask 1[−Q_N ≤ v ≤ Q_P] recovered from δ (|δ| ≤ ½ inside, |δ| ≥ 7 outside), as 0/1 in δ's dtype
    (min(1, max(0, 7 − |δ|)): exactly 1 inside, 0 outside; NaN stays NaN)."""
    return (7.0 - delta.abs()).clamp_(0.0, 1.0)


def lsq_grad_scale(numel: int, qp: int) -> float:
    """g_s = 1/√(numel·Q_P), the LSQ step-size gradient scale."""
    return 1.0 / math.sqrt(numel * qp)


class LSQ(torch.autograd.Function):
    """x̂ = s·round(clamp(x/s, −Q_N, Q_P)) with the LSQ backward (STE + clip mask, step-size gradient).

    ``LSQ.apply(x, s, qn, qp)``: s is a positive 0-d tensor. Gradient of s is g_s·Σ ∇x̂ ⊙ δ(x/s).
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:  # type: ignore[override]
        q, delta = lsq_codes(x, s, qn, qp)
        ctx.save_for_backward(delta)
        ctx.gs = lsq_grad_scale(x.numel(), qp)
        ctx.s_shape = s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (delta,) = ctx.saved_tensors
        gx = grad * lsq_inside(delta)
        gs = (grad * delta).sum().mul(ctx.gs).reshape(ctx.s_shape)
        return gx, gs, None, None


def stochastic_round(
    x: Tensor, *, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """SR(x) = ⌊x + u⌋, u ~ U[0, 1): rounds up with probability frac(x), so E[SR(x)] = x.

    ``noise`` supplies u explicitly (same shape as x, values in [0, 1)); otherwise it is drawn from
    ``generator`` on x's device.
    """
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match input shape {tuple(x.shape)}")
    return torch.floor(x + noise)


@dataclass(frozen=True)
class GradDigits:
    """A quantised gradient ∇Y ≈ Σ_k scales[k]·digits[k]; digits are integer-valued tensors shaped like ∇Y,
    scales 0-d device tensors (no host sync). ``amax`` = max|∇Y| (NaN when ∇Y is not finite)."""

    digits: tuple[Tensor, ...]
    scales: tuple[Tensor, ...]
    amax: Tensor

    def dequantise(self) -> Tensor:
        return sum(s * d for s, d in zip(self.scales, self.digits))  # type: ignore[return-value]


def _grad_grid(grad: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(t, M): t = ∇Y·T/M ∈ [−T, T]; all-zero ∇Y gives t = 0, non-finite ∇Y gives M = NaN."""
    amax = grad.abs().amax()
    # A non-finite gradient must not be hidden by the quantiser: NaN poisons every digit scale downstream.
    amax = torch.where(torch.isfinite(amax), amax, torch.full_like(amax, math.nan))
    # (∇Y·T)/M, not ∇Y·(T/M): a true division keeps integer-valued t exact; the clamp guards |t| ≤ T against
    # the last-ulp rounding of M·T/M so the digits can never leave their range.
    t = grad * levels / torch.where(amax > 0, amax, torch.ones_like(amax))
    return t.clamp(-levels, levels), amax


def bit_split(
    grad: Tensor,
    *,
    radix: int = 14,
    levels: int = 98,
    digit_max: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> GradDigits:
    """Two-digit INT4 encoding of ∇Y: (hi, lo) with ∇Y ≈ (R·M/T)·hi + (M/T)·lo, see module docstring.

    digit_max=None: no clamp (exact, unbiased; R=14, T=98 gives digits in [−7, 7], R=16, T=127 in [−8, 8]).
    digit_max=6 reproduces INT4-code's ±6 clamp (biased for |t| > 90 and near R·hi ± 7).
    """
    t, amax = _grad_grid(grad, levels)
    unit = amax / levels
    if digit_max is None:
        # SR first, then its exact base-R digits: R·hi + lo = SR(t) by construction, |lo| ≤ R/2 = 7 (R = 14).
        sr = stochastic_round(t, generator=generator, noise=noise)
        hi = torch.round(sr / radix)
        return GradDigits((hi, sr - radix * hi), (unit * radix, unit), amax)
    hi = torch.round(t / radix).clamp(-digit_max, digit_max)
    # t − R·hi is exact (Sterbenz: R·hi lies within a factor 2 of t whenever hi ≠ 0), so hi·R + lo = SR(t).
    lo = stochastic_round(t - radix * hi, generator=generator, noise=noise).clamp(-digit_max, digit_max)
    return GradDigits((hi, lo), (unit * radix, unit), amax)


def sr_levels(
    grad: Tensor, *, levels: int, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(SR(t), M/T) with t = ∇Y·T/M: the value R·hi + lo of the unclamped bit split (or the single digit)
    without forming the digits, for backends that multiply it exactly in one GEMM (``backward.py``)."""
    t, amax = _grad_grid(grad, levels)
    return stochastic_round(t, generator=generator, noise=noise), amax / levels


def single_digit(
    grad: Tensor, *, levels: int = 7, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> GradDigits:
    """One INT4 digit: SR(∇Y·L/M) ∈ [−L, L] with per-tensor max scale M/L (the "naive" LSQ+SR baseline)."""
    t, amax = _grad_grid(grad, levels)
    return GradDigits((stochastic_round(t, generator=generator, noise=noise),), (amax / levels,), amax)
