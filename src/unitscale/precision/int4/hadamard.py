"""Block-diagonal Hadamard transform along the last (reduction) dimension (docs/theory.md, Hadamard
quantiser).

H_0 = [1],  H_k = (1/√2)·[[H_{k−1}, H_{k−1}], [H_{k−1}, −H_{k−1}]]  (normalised Sylvester, g = 2^k).
H_k is symmetric and orthonormal, so H_k⁻¹ = H_kᵀ = H_k and the block transform is its own inverse.
Applied on the right of both GEMM operands, XH·(WH)ᵀ = X·H·Hᵀ·Wᵀ = XWᵀ: the forward needs no inverse;
the rotation only spreads outlier features over each block of g consecutive features before quantisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unitscale.eager_cache import eager_cache


def _check_block(g: int) -> int:
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g & (g - 1):
        raise ValueError(f"Hadamard block size must be a power of two (1, 2, 4, ..., 1024, ...), got {g!r}")
    return g


@eager_cache(maxsize=64)
def _hadamard_cached(g: int, dtype: torch.dtype, device: str) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    # Normalise once in float64: entries are ±2^(-k/2), exact in float64 for even k and correctly rounded
    # otherwise, and the same values in every dtype after the cast.
    return (h / math.sqrt(g)).to(dtype=dtype, device=device)


def hadamard(g: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """The normalised Sylvester Hadamard matrix H of size g×g (g a power of two); H = Hᵀ, H·H = I."""
    return _hadamard_cached(_check_block(g), dtype, str(torch.device(device))).clone()


def block_hadamard(x: Tensor, g: int) -> Tensor:
    """x·BlockDiag(H_g, …, H_g) along the last dim D (D % g == 0), in x's dtype; g = 1 is the identity.

    Because H_g is symmetric orthonormal this is also the inverse transform and the ·Hᵀ of the backward.
    """
    _check_block(g)
    d = x.shape[-1]
    if d % g:
        raise ValueError(f"last dimension {d} is not a multiple of the Hadamard block size {g}")
    if g == 1:
        return x
    h = _hadamard_cached(g, x.dtype, str(x.device))
    return (x.reshape(*x.shape[:-1], d // g, g) @ h).reshape(x.shape)


def block_hadamard_inverse(x: Tensor, g: int) -> Tensor:
    """Inverse of :func:`block_hadamard`: (xH)Hᵀ = x. H is symmetric orthonormal, so this is the same map."""
    return block_hadamard(x, g)


def block_sizes(d: int, max_block: int = 1024) -> list[int]:
    """Candidate blocks for the per-layer search (INT4-paper App. A.5): powers of two g ≤ max_block, g | d."""
    return [1 << k for k in range(max_block.bit_length()) if (1 << k) <= max_block and d % (1 << k) == 0]
