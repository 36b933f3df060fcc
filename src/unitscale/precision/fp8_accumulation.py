"""Error model of FP8 GEMMs on Hopper tensor cores: partial sums keep ~13 mantissa bits.

Hopper's FP8 tensor cores keep about 13 mantissa bits while accumulating, with or without fast
accumulation. Model a K-term dot product as s_j = fl(s_{j-1} + p_j) with |fl(z) − z| ≤ u|z|, u = 2^-13,
the rounding errors independent with mean 0 and the products p_i independent with mean 0 and variance σ².
Then E s_j² = jσ², Var(error) ≤ u²σ² Σ_j j = u²σ²K(K+1)/2 and rms(result) = σ√K, so

    rms(error) / rms(result) ≤ u·√((K+1)/2)        (1.4e-3 at K = 256, 3.9e-3 at K = 2048).

Round-to-nearest at 13 bits measures about a fifth of this bound (3e-4 at K = 256, 8e-4 at K = 2048); a
wrong scale, layout or rounding mode gives 3e-2 or more. The GPU tests and the device smoke check allow
3× the bound between Fp8Backend and the fp32-accumulating simulate backend on identical FP8 operands.
"""

from __future__ import annotations

import math

ACC_MANTISSA_BITS = 13


def accumulation_bound(k: int) -> float:
    """The model's bound on rms error / rms result of a K-term FP8 dot product (see module docstring)."""
    if k < 1:
        raise ValueError(f"accumulation_bound: K must be a positive integer, got {k!r}")
    return 2.0**-ACC_MANTISSA_BITS * math.sqrt((k + 1) / 2)


def accumulation_tolerance(k: int) -> float:
    """3 × :func:`accumulation_bound`: the allowed relative rms difference from an fp32-accumulated GEMM."""
    return 3 * accumulation_bound(k)
