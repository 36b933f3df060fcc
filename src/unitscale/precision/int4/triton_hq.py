"""Fused Triton kernel: block Hadamard + LSQ quantise (+ INT4 pack) in one pass over X (docs/theory.md,
Hadamard quantiser).

One program loads a [BM, G] tile of x (G = the Hadamard block, one block of the reduction dim), computes
v = (tile·H_G)/s with an IEEE fp32 ``tl.dot`` (no TF32), and writes, without re-reading x:
    q = round_half_even(clamp(v, −Q_N, Q_P)) (+ (v − v): ±inf → NaN, as ``lsq_codes``)
    δ = q − v inside the range, −Q_N / Q_P outside (the LSQ residual and clip mask of ``lsq_codes``)
    packed (optional) = (q_{2j} & 0xF) | (q_{2j+1} & 0xF) << 4, two's-complement nibbles, uint8 [M, D/2].
The same maths as ``lsq_codes(block_hadamard(x, G), s)``; the rounding is written out (floor(c + ½), minus
one on odd ties) so that it is round-half-even, like ``torch.round``, in compiled code and the interpreter.
On CPU it runs under ``TRITON_INTERPRET=1`` (tests); the layer uses it on CUDA only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unitscale.precision.int4.hadamard import hadamard

try:  # Triton is optional: without it the layer uses the torch ops.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def triton_available() -> bool:
    """True when Triton imports (the kernel also needs CUDA or TRITON_INTERPRET=1 to run)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _hq_kernel(
        x_ptr, h_ptr, s_ptr, q_ptr, d_ptr, p_ptr, M, D,
        G: tl.constexpr, BM: tl.constexpr, QN: tl.constexpr, QP: tl.constexpr,
        ROTATE: tl.constexpr, PACK: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * G + tl.arange(0, G)
        inb = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if ROTATE:
            h = tl.load(h_ptr + tl.arange(0, G)[:, None] * G + tl.arange(0, G)[None, :])
            x = tl.dot(x, h, input_precision="ieee")
        v = x / tl.load(s_ptr)
        # min/max, not tl.clamp: NaN must stay NaN (it is turned into a NaN code below either way).
        c = tl.minimum(tl.maximum(v, -QN), QP)
        r = tl.floor(c + 0.5)
        odd_tie = ((r - c) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
        q = tl.where(odd_tie, r - 1.0, r) + (v - v)
        delta = tl.where(v < -QN, -QN * 1.0, tl.where(v > QP, QP * 1.0, q - v))
        tl.store(q_ptr + offs, q, mask=inb)
        tl.store(d_ptr + offs, delta, mask=inb)
        if PACK:
            nib = q.to(tl.int32) & 0xF
            lo, hi = tl.split(tl.reshape(nib, (BM, G // 2, 2)))
            prow = tl.program_id(0) * BM + tl.arange(0, BM)
            pcol = tl.program_id(1) * (G // 2) + tl.arange(0, G // 2)
            pin = (prow[:, None] < M) & (pcol[None, :] < D // 2)
            tl.store(
                p_ptr + prow[:, None] * (D // 2) + pcol[None, :], (lo | (hi << 4)).to(tl.uint8), mask=pin
            )


def hadamard_quantise(
    x: Tensor, s: Tensor, g: int, qn: int, qp: int, *, rotate: bool = True, pack: bool = False, bm: int = 32
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(q, δ, packed) of ``lsq_codes(block_hadamard(x, g), s, qn, qp)`` in one fused pass (module docstring).

    x: 2-D contiguous, D % g == 0, g a power of two ≥ 16 when rotating (tl.dot's minimum); q, δ float32;
    packed uint8 [M, D/2] when ``pack`` (finite inputs only: a NaN code has no nibble).
    """
    if triton is None:
        raise RuntimeError("hadamard_quantise needs Triton (pip install triton)")
    if x.dim() != 2 or x.shape[1] % g or (rotate and g < 16) or g & (g - 1):
        raise ValueError(f"need x [M, D] with D % g == 0 and g a power of two (≥ 16 to rotate), got "
                         f"{tuple(x.shape)} and g={g}")  # fmt: skip
    x = x.contiguous()
    m, d = x.shape
    q = torch.empty((m, d), dtype=torch.float32, device=x.device)
    delta = torch.empty_like(q)
    packed = torch.empty((m, d // 2), dtype=torch.uint8, device=x.device) if pack else q
    h = hadamard(g, dtype=torch.float32, device=x.device)
    s32 = s.detach().to(device=x.device, dtype=torch.float32).reshape(1)
    grid = (triton.cdiv(m, bm), d // g)
    _hq_kernel[grid](x, h, s32, q, delta, packed, m, d, G=g, BM=bm, QN=qn, QP=qp, ROTATE=rotate, PACK=pack)
    return q, delta, packed if pack else None


def unpack_int4(packed: Tensor) -> Tensor:
    """int8 codes [M, 2·D'] from two's-complement nibbles (low nibble = even column)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    return ((codes ^ 8) - 8).to(torch.int8)
