"""INT4 fully quantised training as a matmul backend (Xi et al., arXiv 2306.11987; docs/theory.md, INT4
training).

Forward: block Hadamard (g = 32) + LSQ codes in [−8, 7]; backward: forward codes reused, ∇Y bit-split
into two INT4 digits, optional leverage-score sampling; every GEMM exact on integers (``gemm.py``: float64
reference anywhere, E4M3 ``torch._scaled_mm`` on Hopper — see its docstring for why that is exact).
"""

from unitscale.precision.int4.config import SAMPLING_MODES, SPLIT_MODES, Int4Config
from unitscale.precision.int4.gemm import GEMM_BACKENDS, fp8_available, fp8_gemm, int_gemm, reference_gemm
from unitscale.precision.int4.hadamard import block_hadamard, block_hadamard_inverse, block_sizes, hadamard
from unitscale.precision.int4.linear import Int4Linear, int4_backend_for
from unitscale.precision.int4.quantise import (
    LSQ,
    QRANGES,
    GradDigits,
    bit_split,
    lsq_codes,
    lsq_grad_scale,
    lsq_init_scale,
    qbounds,
    single_digit,
    stochastic_round,
)
from unitscale.precision.int4.sampling import bernoulli_weights, keep_nonzero_weights, row_weights, water_fill

__all__ = [
    "GEMM_BACKENDS",
    "LSQ",
    "QRANGES",
    "SAMPLING_MODES",
    "SPLIT_MODES",
    "GradDigits",
    "Int4Config",
    "Int4Linear",
    "bernoulli_weights",
    "bit_split",
    "block_hadamard",
    "block_hadamard_inverse",
    "block_sizes",
    "fp8_available",
    "fp8_gemm",
    "hadamard",
    "int4_backend_for",
    "int_gemm",
    "keep_nonzero_weights",
    "lsq_codes",
    "lsq_grad_scale",
    "lsq_init_scale",
    "qbounds",
    "reference_gemm",
    "row_weights",
    "single_digit",
    "stochastic_round",
    "water_fill",
]
