"""The two backward GEMMs of an INT4 linear (REFERENCE §5.2, eq. 4), exact, with LSS row compaction.

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

import torch
from torch import Tensor

from unitscale.precision.int4.config import Int4Config
from unitscale.precision.int4.gemm import _MAX_CODE, int_gemm
from unitscale.precision.int4.quantise import GradDigits
from unitscale.precision.int4.sampling import row_weights


def folded(digits: GradDigits, cfg: Int4Config) -> tuple[Tensor, Tensor, int]:
    """(G, σ, bound): ∇Y ≈ σ·G with G integer-valued, |G| ≤ bound (bit split: G = R·hi + lo, σ = σ_lo)."""
    if cfg.bit_split:
        radix, levels, _ = cfg.split
        hi, lo = digits.digits
        return hi * radix + lo, digits.scales[1], levels
    return digits.digits[0], digits.scales[0], cfg.grad_levels


def _kept(mask: Tensor) -> Tensor | None:
    """Indices of the True rows, or None when every row is kept (no compaction needed)."""
    idx = mask.nonzero().squeeze(1)
    return None if idx.numel() == mask.numel() else idx


def dgrad(digits: GradDigits, qw: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·diag(w_k)·(D_k Ŵ) in qw's dtype (the work dtype); see the module docstring."""
    work = qw.dtype
    weights = lss_weights(digits, None, cfg, gen)
    if weights is None and cfg.gemm == "reference":
        g, sigma, bound = folded(digits, cfg)
        return (
            _rows(g, g.ne(0).any(1), lambda a: int_gemm(a, qw, bound=bound * _MAX_CODE, out_dtype=work))
            * sigma
        )
    out = None
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        w = weights[k] if weights is not None else None
        mask = w.ne(0) if w is not None else d.ne(0).any(1)

        def gemm(a: Tensor, rows: Tensor | None, w=w) -> Tensor:
            prod = int_gemm(a, qw, cfg.gemm, out_dtype=work)
            if w is not None:  # output-row scale: the GEMM itself stays integer
                prod = prod * (w if rows is None else w[rows]).to(work)[:, None]
            return prod

        term = _rows(d, mask, gemm, pass_rows=True) * s
        out = term if out is None else out + term
    return out


def _rows(d: Tensor, mask: Tensor, gemm, pass_rows: bool = False) -> Tensor:
    """gemm on the kept rows of d only, scattered back into zero rows (row compaction)."""
    idx = _kept(mask)
    if idx is None:
        return gemm(d, None) if pass_rows else gemm(d)
    part = gemm(d.index_select(0, idx), idx) if pass_rows else gemm(d.index_select(0, idx))
    out = part.new_zeros((d.shape[0], part.shape[1]))
    return out.index_copy_(0, idx, part)


def wgrad(digits: GradDigits, qx: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·(diag(w'_k) D_k)ᵀ X̂ in qx's dtype (the work dtype); see the module docstring."""
    work = qx.dtype
    weights = lss_weights(digits, qx, cfg, gen)
    if weights is None and cfg.gemm == "reference":
        g, sigma, bound = folded(digits, cfg)
        idx = _kept(g.ne(0).any(1))
        if idx is not None:
            g, qx = g.index_select(0, idx), qx.index_select(0, idx)
        return int_gemm(g.t(), qx, bound=bound * _MAX_CODE, out_dtype=work) * sigma
    out = None
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        w = weights[k] if weights is not None else None
        idx = _kept(w.ne(0) if w is not None else d.ne(0).any(1))
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
