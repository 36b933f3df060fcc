"""The two backward GEMMs of an INT4 linear (Xi et al. eq. 4; docs/theory.md, Bit splitting), exact, with
LSS row compaction.

∇Y ≈ Σ_k σ_k·D_k (bit-split digits D_k, scales σ_k; σ_hi = R·σ_lo), LSS row weights w_k = m/p:
    dgrad  Σ_k σ_k·diag(w_k)·(D_k Ŵ)        wgrad  Σ_k σ_k·(diag(w_k) D_k)ᵀ X̂

"keep_nonzero" sampling (the default; every w = 1): on the "reference" backend the digits are folded,
R·hi + lo = SR(t) ∈ [−T, T], so each product is ONE exact integer GEMM (bound T·8, see ``gemm.py``) equal
to the exact sum of the two digit GEMMs; only the rounding of the final scaling differs (once, not twice).
The FP8 carrier keeps one GEMM per digit (the folded value is not E4M3-exact). Rows of ∇Y that are all zero
contribute nothing and are dropped before the GEMMs (compaction).

"bernoulli" sampling: rows with m = 0 are dropped (compaction: only the kept rows enter the GEMMs). dgrad
stays an integer GEMM with the 1/p weights applied to its output rows; wgrad's 1/p weights scale rows of the
reduction dimension, so that one product is a float GEMM on (m/p)·D_k in the work dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unitscale.precision.int4.config import Int4Config
from unitscale.precision.int4.gemm import _MAX_CODE, int_gemm
from unitscale.precision.int4.quantise import GradDigits, _grad_grid, bit_split, sr_levels
from unitscale.precision.int4.sampling import row_weights


@dataclass(frozen=True)
class Folded:
    """∇Y ≈ σ·G with G integer-valued, |G| ≤ bound; ``kept``: indices of the non-zero rows of G, or None
    when every row is non-zero (nothing to compact)."""

    g: Tensor
    sigma: Tensor
    bound: int
    kept: Tensor | None


def can_fold(cfg: Int4Config) -> bool:
    """Folding needs exact one-GEMM products of R·hi + lo (fp32, not E4M3) and unweighted rows."""
    return cfg.gemm == "reference" and cfg.sampling == "keep_nonzero"


def fold(grad: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Folded:
    """Quantise ∇Y [N, C] for the folded backward: G = SR(∇Y·T/M) = R·hi + lo, σ = M/T (see quantise.py)."""
    if cfg.bit_split:
        radix, levels, clamp = cfg.split
        if clamp is None:
            g, sigma = sr_levels(grad, levels=levels, generator=gen)
        else:  # INT4-code's clamped digits: fold them explicitly
            hi, lo = bit_split(grad, radix=radix, levels=levels, digit_max=clamp, generator=gen).digits
            g, sigma = hi * radix + lo, _grad_unit(grad, levels)
        bound = levels
    else:
        g, sigma = sr_levels(grad, levels=cfg.grad_levels, generator=gen)
        bound = cfg.grad_levels
    # A row is zero iff its max |G| is 0 (an arithmetic reduction: much cheaper than a boolean any()).
    return Folded(g, sigma, bound, _kept(g.abs().amax(1) > 0))


def _grad_unit(grad: Tensor, levels: int) -> Tensor:
    return _grad_grid(grad, levels)[1] / levels


def _kept(mask: Tensor) -> Tensor | None:
    """Indices of the True rows, or None when every row is kept (no compaction needed)."""
    idx = mask.nonzero().squeeze(1)
    return None if idx.numel() == mask.numel() else idx


def folded_dgrad(f: Folded, qw: Tensor) -> Tensor:
    """σ·(G Ŵ): one exact integer GEMM over the kept rows, zero rows scattered back."""
    bound = f.bound * _MAX_CODE
    if f.kept is None:
        return int_gemm(f.g, qw, bound=bound, out_dtype=qw.dtype) * f.sigma
    part = int_gemm(f.g.index_select(0, f.kept), qw, bound=bound, out_dtype=qw.dtype)
    # σ after the scatter: a NaN σ (non-finite ∇Y) must reach the dropped rows too.
    return part.new_zeros((f.g.shape[0], part.shape[1])).index_copy_(0, f.kept, part) * f.sigma


def folded_wgrad(f: Folded, qx: Tensor) -> Tensor:
    """σ·(Gᵀ X̂): one exact integer GEMM reducing over the kept rows only."""
    g, x = (f.g, qx) if f.kept is None else (f.g.index_select(0, f.kept), qx.index_select(0, f.kept))
    return int_gemm(g.t(), x, bound=f.bound * _MAX_CODE, out_dtype=qx.dtype) * f.sigma


def dgrad(digits: GradDigits, qw: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·diag(w_k)·(D_k Ŵ) in qw's dtype (the work dtype), one GEMM per digit over the kept rows."""
    work = qw.dtype
    weights = lss_weights(digits, None, cfg, gen)
    out = None
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        w = weights[k] if weights is not None else None
        idx = _kept(w != 0 if w is not None else d.abs().amax(1) > 0)
        prod = int_gemm(d if idx is None else d.index_select(0, idx), qw, cfg.gemm, out_dtype=work)
        if w is not None:  # output-row scale: the GEMM itself stays integer
            prod = prod * (w if idx is None else w.index_select(0, idx)).to(work)[:, None]
        if idx is not None:
            prod = prod.new_zeros((d.shape[0], prod.shape[1])).index_copy_(0, idx, prod)
        term = prod * s
        out = term if out is None else out + term
    return out


def wgrad(digits: GradDigits, qx: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·(diag(w'_k) D_k)ᵀ X̂ in qx's dtype (the work dtype), over the kept rows of each digit."""
    work = qx.dtype
    weights = lss_weights(digits, qx, cfg, gen)
    out = None
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        w = weights[k] if weights is not None else None
        idx = _kept(w != 0 if w is not None else d.abs().amax(1) > 0)
        dk, xk = (d, qx) if idx is None else (d.index_select(0, idx), qx.index_select(0, idx))
        if w is None:
            prod = int_gemm(dk.t(), xk, cfg.gemm, out_dtype=work)
        else:
            wk = w if idx is None else w.index_select(0, idx)
            prod = (dk * wk.to(work)[:, None]).t() @ xk
        term = prod * s
        out = term if out is None else out + term
    return out


def lss_weights(
    digits: GradDigits, qx: Tensor | None, cfg: Int4Config, gen: torch.Generator | None
) -> list[Tensor] | None:
    """Per-digit row weights m/p from one water-fill over the stacked rows ∇↕Y; None = keep every row.

    Scores c_i = ‖σ_k D_k,i‖ (dgrad) or ‖σ_k D_k,i‖·‖X̂_i‖ (wgrad), in float64.
    """
    if cfg.sampling == "keep_nonzero":
        return None
    norms = [d.double().norm(dim=1) * s.double().abs() for d, s in zip(digits.digits, digits.scales)]
    if qx is not None:
        xnorm = qx.double().norm(dim=1)
        norms = [n * xnorm for n in norms]
    scores = torch.nan_to_num(torch.cat(norms), nan=0.0, posinf=0.0)
    w = row_weights(scores, cfg.sampling, cfg.sample_ratio, generator=gen)
    return list(w.split([n.numel() for n in norms]))
