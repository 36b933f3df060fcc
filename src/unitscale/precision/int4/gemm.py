"""Integer GEMMs of the INT4 path: a CPU/any-device reference and the Hopper FP8 carrier.

Both take integer-valued operands a [M, K], b [K, N] (forward codes in [−8, 7], gradient digits in [−8, 8])
and return the exact integer product as float64; scales are applied by the caller afterwards.

Reference backend — exactness. Operands are carried in float64 and multiplied with the ordinary float64
GEMM. Every product is an integer of magnitude ≤ 64 and every partial sum an integer ≤ 64·K; float64 holds
all integers up to 2^53 exactly, so for K ≤ 2^53/64 = 2^47 no rounding ever happens, whatever the summation
order or FMA use of the BLAS: the result equals int64 arithmetic bit for bit. float64 (not int64) is the
carrier because it is BLAS-fast and lets NaN propagate (a NaN input yields NaN outputs instead of garbage).

Hopper execution plan (docs/theory.md, Integer GEMMs in FP8). H100 has no INT4 tensor cores (s4 mma runs as a
~50 TOPS software routine), but FP8 E4M3 represents every integer in [−16, 16] exactly (3 mantissa bits cover
0…16 with the exponent doing the rest), so forward codes [−8, 7] and digits [−8, 8] cast to E4M3 without
error. Their products are integers ≤ 64 and the partial sums integers ≤ 64·K, exact in the FP32 accumulator
up to 2^24, i.e. K ≤ 262 144, provided the GEMM really accumulates in FP32: ``torch._scaled_mm(...,
use_fast_accum=False)``. With fast accumulation Hopper's reduced-precision FP8 accumulator was measured
wrong on every entry of the worst case (error 416 at K = 768), so it is never used here. Each INT4 GEMM is
then one ``_scaled_mm`` on E4M3 tensors (A row-major [M, K], B column-major, dims padded to multiples of
16) at the FP8 rate, and must match :func:`reference_gemm` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

GEMM_BACKENDS = ("reference", "fp8")
_MAX_CODE = 8  # largest |operand| on the INT4 path (codes [−8, 7], digits up to ±8)
REFERENCE_MAX_K = 2**53 // (_MAX_CODE * _MAX_CODE)
FP8_MAX_K = 2**24 // (_MAX_CODE * _MAX_CODE)


def _check(a: Tensor, b: Tensor, max_k: int, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: need a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] > max_k:
        raise ValueError(f"{name}: K = {a.shape[1]} exceeds the exact-accumulation limit {max_k}")


def reference_gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact a·b of integer-valued operands (|entries| ≤ 8), computed in float64 (see module docstring)."""
    _check(a, b, REFERENCE_MAX_K, "reference_gemm")
    return a.to(torch.float64) @ b.to(torch.float64)


def fp8_available() -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability ≥ 8.9) and torch._scaled_mm."""
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


def _pad16(t: Tensor, rows: bool, cols: bool) -> Tensor:
    r = (-t.shape[0]) % 16 if rows else 0
    c = (-t.shape[1]) % 16 if cols else 0
    return torch.nn.functional.pad(t, (0, c, 0, r)) if r or c else t


def fp8_gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact a·b of integer-valued operands as one E4M3 ``torch._scaled_mm`` with FP32 accumulation.

    Zero padding to multiples of 16 adds zero terms only. Returns float64 like :func:`reference_gemm`.
    """
    _check(a, b, FP8_MAX_K, "fp8_gemm")
    if not a.is_cuda or not fp8_available():
        raise RuntimeError("fp8_gemm needs a CUDA device with FP8 support (sm_89+); use gemm='reference'")
    m, n = a.shape[0], b.shape[1]
    e4m3 = torch.float8_e4m3fn
    a8 = _pad16(a, True, True).to(e4m3).contiguous()
    b8 = _pad16(b, True, True).t().contiguous().to(e4m3).t()  # column-major [K, N]
    one = torch.ones((), device=a.device, dtype=torch.float32)
    out = torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=False)
    return out[:m, :n].to(torch.float64)


def int_gemm(a: Tensor, b: Tensor, backend: str = "reference") -> Tensor:
    """Exact integer product a·b as float64 on the chosen backend ("reference" or "fp8")."""
    if backend == "reference":
        return reference_gemm(a, b)
    if backend == "fp8":
        return fp8_gemm(a, b)
    raise ValueError(
        f"unknown INT4 GEMM backend {backend!r}; accepted: {', '.join(map(repr, GEMM_BACKENDS))}"
    )
