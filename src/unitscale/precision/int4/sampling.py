"""Leverage-score sampling (LSS) of gradient rows for the backward GEMMs (docs/theory.md, Leverage-score
sampling).

A product A·B = Σ_i a_iᵀ b_i over rows i is estimated by Σ_i (m_i/p_i)·a_iᵀ b_i with m_i ~ Bernoulli(p_i):
unbiased for any p_i > 0 on rows with non-zero terms. The variance Σ_i (1/p_i − 1)‖a_i‖²‖b_i‖² under
Σ p_i = B, p_i ≤ 1 is minimised by p_i = min(1, λ·c_i), c_i = ‖a_i‖·‖b_i‖ (the leverage score), λ chosen so
that Σ p_i = B ("water-filling"). Everything stays on the device: one sort and one cumulative sum.
"""

from __future__ import annotations

import torch
from torch import Tensor


def water_fill(scores: Tensor, budget: float) -> Tensor:
    """p_i = min(1, λ·c_i) with Σ p_i = min(budget, #{c_i > 0}) and p_i ≤ 1; zero scores get p = 0.

    Sorted descending, with k rows clamped to 1 and S_k = Σ_{j≥k} c_(j): λ_k = (B − k)/S_k, and k is the
    smallest index with c_(k)·λ_k ≤ 1 (the largest unclamped row stays ≤ 1). Such a k < B always exists.
    """
    if scores.dim() != 1:
        raise ValueError(f"water_fill expects a 1-D score vector, got shape {tuple(scores.shape)}")
    if not budget > 0:
        raise ValueError(f"sampling budget must be positive, got {budget!r}")
    c = scores.clamp_min(0)
    n = c.numel()
    keep_all = (c > 0).to(c.dtype)
    if budget >= n:
        return keep_all
    c_sorted, order = torch.sort(c, descending=True)
    rest = c_sorted.flip(0).cumsum(0).flip(0)  # S_k
    k = torch.arange(n, device=c.device, dtype=c.dtype)
    ok = c_sorted * (budget - k) <= rest
    k_star = torch.argmax(ok.to(torch.uint8))  # first True
    lam = (budget - k_star.to(c.dtype)) / rest[k_star].clamp_min(torch.finfo(c.dtype).tiny)
    p = torch.clamp(lam * c, max=1.0)
    # Fewer non-zero rows than the budget: keep each of them with p = 1 (selected on the device, no sync).
    return torch.where((c > 0).sum() <= budget, keep_all, p)


def bernoulli_weights(
    p: Tensor, *, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """Row weights m_i/p_i with m_i ~ Bernoulli(p_i) (m_i = 1[u_i < p_i]); 0 where p_i = 0 or dropped."""
    if noise is None:
        noise = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    kept = noise < p
    return torch.where(kept, 1.0 / torch.where(kept, p, torch.ones_like(p)), torch.zeros_like(p))


def keep_nonzero_weights(scores: Tensor) -> Tensor:
    """Default mode (INT4-code's CUDA path): p_i = 1 for every row with c_i > 0, zero rows dropped.

    The weights are 0/1 and the dropped rows are zero rows, so the product is exactly the unsampled one.
    """
    return (scores > 0).to(scores.dtype)


def row_weights(
    scores: Tensor, mode: str, ratio: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Weights m_i/p_i for the rows with leverage ``scores``: ``mode`` "keep_nonzero" or "bernoulli" with
    budget Σp = ratio·(number of rows)."""
    if mode == "keep_nonzero":
        return keep_nonzero_weights(scores)
    if mode == "bernoulli":
        return bernoulli_weights(water_fill(scores, ratio * scores.numel()), generator=generator)
    raise ValueError(f"unknown sampling mode {mode!r}; accepted: 'keep_nonzero', 'bernoulli'")
