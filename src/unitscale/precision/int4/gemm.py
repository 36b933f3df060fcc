"""Integer GEMMs of the INT4 path, exact: fp32 in provably exact chunks (any device) and the FP8 carrier.

Every operand is integer-valued: forward codes in [−8, 7], gradient digits in [−8, 8], or (CPU fold of the
two bit-split digits, see ``backward.py``) R·hi + lo in [−T, T]. Callers pass ``bound`` = max|a|·max|b|.

Exact fp32 accumulation. Every product a_ik·b_kj is an integer of magnitude ≤ bound, so every partial sum
of a length-k dot product, in any summation order, tree or FMA use, is an integer of magnitude ≤ k·bound.
float32 holds every integer of magnitude ≤ 2^24 exactly, so with k·bound ≤ 2^24 no operation rounds: the
float32 GEMM equals int64 arithmetic bit for bit. Longer K is split into chunks of ⌊2^24/bound⌋ (262 144
for codes × codes) whose exact float32 results are summed in float64 (exact below 2^53). The same holds
when a backend rounds fp32 operands to bf16/tf32 (integers ≤ 256 are exact there) with fp32 accumulation.
:func:`reference_gemm` keeps the plain float64 GEMM as the independent reference.

Hopper FP8 carrier (docs/theory.md, Integer GEMMs in FP8). H100 has no INT4 tensor cores, but E4M3
represents every integer in
[−16, 16] exactly (3 mantissa bits cover 0…16 with the exponent doing the rest), so codes and digits cast
to E4M3 without error; ``torch._scaled_mm(..., use_fast_accum=False)`` accumulates in FP32, exact under the
chunk rule above. Fast accumulation was measured wrong on Hopper (error 416 at K = 768): never used. The
folded digit R·hi + lo is *not* E4M3-exact (98 → 96), so the FP8 path keeps one GEMM per digit.
"""

from __future__ import annotations

import torch
from torch import Tensor

GEMM_BACKENDS = ("reference", "fp8")
_MAX_CODE = 8  # largest |operand| of an INT4 code or digit (codes [−8, 7], digits up to ±8)
CODE_BOUND = _MAX_CODE * _MAX_CODE  # max |product| of two INT4 operands
FP32_EXACT = 2**24  # every integer of magnitude ≤ 2^24 is a float32
REFERENCE_MAX_K = 2**53 // CODE_BOUND
E4M3_EXACT_MAX = 16  # every integer in [−16, 16] is an E4M3 value


def exact_chunk(bound: int) -> int:
    """Longest K whose fp32 dot products of integer operands with |a·b| ≤ bound provably never round."""
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ValueError(f"bound must be a positive int (max |a|·max |b|), got {bound!r}")
    return max(1, FP32_EXACT // bound)


def _check(a: Tensor, b: Tensor, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: need a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")


def reference_gemm(a: Tensor, b: Tensor) -> Tensor:
    """a·b of integer operands (|entries| ≤ 8) in float64: exact for K ≤ 2^47 (the independent reference)."""
    _check(a, b, "reference_gemm")
    if a.shape[1] > REFERENCE_MAX_K:
        raise ValueError(
            f"reference_gemm: K = {a.shape[1]} exceeds the exact-accumulation limit {REFERENCE_MAX_K}"
        )
    return a.to(torch.float64) @ b.to(torch.float64)


def _chunked(a: Tensor, b: Tensor, bound: int, out_dtype: torch.dtype, mm, align: int = 1) -> Tensor:
    """Σ over K-chunks of mm(a_c, b_c) (each exact in fp32), summed in float64 when there are several."""
    k, step = a.shape[1], max(align, exact_chunk(bound) // align * align)
    if k <= step:
        return mm(a, b).to(out_dtype)
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float64, device=a.device)
    for lo in range(0, k, step):
        out += mm(a[:, lo : lo + step], b[lo : lo + step])
    return out.to(out_dtype)


def exact_gemm(
    a: Tensor, b: Tensor, *, bound: int = CODE_BOUND, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Exact a·b of integer operands with |a_ik·b_kj| ≤ bound, accumulated in fp32 chunks (module docstring).

    The result is exact in float64; ``out_dtype=float32`` rounds it once (never, while |a·b| ≤ 2^24).
    """
    _check(a, b, "exact_gemm")
    f32 = torch.float32
    return _chunked(a.to(f32), b.to(f32), bound, out_dtype, torch.mm)


def fp8_available() -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability ≥ 8.9) and torch._scaled_mm."""
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


def to_e4m3(t: Tensor) -> Tensor:
    """Cast integer-valued codes/digits (|t| ≤ 16) to E4M3: exact, see module docstring."""
    return t.to(torch.float8_e4m3fn)


def _pad16(t: Tensor) -> Tensor:
    r, c = (-t.shape[0]) % 16, (-t.shape[1]) % 16
    return torch.nn.functional.pad(t, (0, c, 0, r)) if r or c else t


def scaled_mm_gemm(
    a: Tensor, b: Tensor, *, bound: int = CODE_BOUND, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Exact a·b on the FP8 carrier: E4M3 operands, ``torch._scaled_mm`` with FP32 accumulation, K-chunked.

    Any device torch._scaled_mm supports (CPU too, for tests); zero padding to multiples of 16 adds zero
    terms only. Operands must be integers in [−16, 16].
    """
    _check(a, b, "scaled_mm_gemm")
    m, n = a.shape[0], b.shape[1]
    a8 = to_e4m3(_pad16(a.float())).contiguous()
    b8 = to_e4m3(_pad16(b.float())).t().contiguous().t()  # column-major [K, N]
    one = torch.ones((), device=a.device, dtype=torch.float32)

    def mm(x: Tensor, y: Tensor) -> Tensor:
        return torch._scaled_mm(
            x.contiguous(),
            y.t().contiguous().t(),
            scale_a=one,
            scale_b=one,
            out_dtype=torch.float32,
            use_fast_accum=False,
        )

    return _chunked(a8, b8, bound, out_dtype, mm, align=16)[:m, :n]


def fp8_gemm(
    a: Tensor, b: Tensor, *, bound: int = CODE_BOUND, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """:func:`scaled_mm_gemm` behind the device check: only on CUDA with FP8 tensor cores (sm_89+)."""
    if not a.is_cuda or not fp8_available():
        raise RuntimeError("fp8_gemm needs a CUDA device with FP8 support (sm_89+); use gemm='reference'")
    return scaled_mm_gemm(a, b, bound=bound, out_dtype=out_dtype)


def int_gemm(
    a: Tensor,
    b: Tensor,
    backend: str = "reference",
    *,
    bound: int = CODE_BOUND,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Exact integer product a·b on the chosen backend: "reference" (fp32 chunks, any device) or "fp8"."""
    if backend == "reference":
        return exact_gemm(a, b, bound=bound, out_dtype=out_dtype)
    if backend == "fp8":
        return fp8_gemm(a, b, bound=bound, out_dtype=out_dtype)
    raise ValueError(
        f"unknown INT4 GEMM backend {backend!r}; accepted: {', '.join(map(repr, GEMM_BACKENDS))}"
    )
