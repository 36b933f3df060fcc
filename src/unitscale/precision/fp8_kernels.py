"""Fused FP8 cast + transpose (Triton; optional: every name here works only when ``triton`` imports).

One pass over a 2-D tensor ``t`` [R, C] writes both FP8 layouts the three GEMMs of a linear need:

    q   = cast(clamp(ρ(t) · s⁻¹, −max, max))      row-major [R, C]
    qᵀ  = the same values, transposed contiguous   row-major [C, R]  (= column-major [R, C])

with s a power-of-two dequantisation scale read from a one-element float32 tensor (static or computed on
the device, never synchronised to the host), max the FP8 format's largest finite value and ρ an optional
rounding to the compute dtype first (an fp32 master weight under bf16 autocast: the value the simulate
backend quantises). The clamp is explicit because not every torch/Triton version saturates on the cast, and it
propagates NaN so a NaN input stays NaN. Each input element is read once; each output written once.

Under ``torch.compile`` the backend uses plain torch ops instead (Inductor fuses them into an equivalent
kernel), so nothing here needs to be traceable. ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (the
interpreter's FP8 conversion is not round-to-nearest-even, so bit-exact casts are checked on GPU only).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the torch-op path covers every device.
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
BLOCK_R = 64
BLOCK_C = 64
_ROUND_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # ROUND_TO constexpr


def _cast_transpose_body(
    src, inv_scale_ptr, out_row, out_col, R, C, stride_r, stride_c, fp8_max,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_TO: tl.constexpr, E4M3: tl.constexpr,
    WRITE_ROW: tl.constexpr, WRITE_COL: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    # int64 offsets: R·C may exceed 2^31 for the largest activations.
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(src + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if ROUND_TO == 1:
        x = x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    elif ROUND_TO == 2:
        x = x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    x = x * tl.load(inv_scale_ptr)
    x = tl.clamp(x, -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL)
    if E4M3:
        q = x.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        q = x.to(tl.float8e5, fp_downcast_rounding="rtne")
    if WRITE_ROW:
        tl.store(out_row + rows[:, None] * C + cols[None, :], q, mask=mask)
    if WRITE_COL:
        # Store the transposed tile so consecutive lanes write consecutive addresses of qᵀ.
        tl.store(out_col + cols[:, None] * R + rows[None, :], tl.trans(q), mask=tl.trans(mask))


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel; built lazily because Triton fixes interpreter vs compiled mode at decoration."""
    del interpret  # part of the cache key only
    return triton.jit(_cast_transpose_body)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def cast_transpose(
    t: Tensor,
    inv_scale: Tensor,
    dtype: torch.dtype,
    *,
    round_to: torch.dtype | None = None,
    write_row: bool = True,
    write_col: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """(q [R, C], qᵀ [C, R] contiguous) of the 2-D tensor ``t``, q = fp8(clamp(ρ(t)·inv_scale)).

    ``round_to``: ρ, a rounding to bfloat16 or float16 before the scale (None: none).

    ``inv_scale``: one-element float32 tensor on t's device (1/s). ``dtype``: float8_e4m3fn or float8_e5m2.
    A layout not asked for is returned as None.
    """
    if triton is None:
        raise RuntimeError("cast_transpose needs triton (pip install triton); use the torch path instead")
    if dtype not in FP8_DTYPES:
        raise ValueError(f"cast_transpose: dtype {dtype} not supported; accepted: {FP8_DTYPES}")
    if t.dim() != 2:
        raise ValueError(f"cast_transpose: need a 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cast_transpose: input dtype {t.dtype} not supported; accepted: fp32, bf16, fp16")
    if inv_scale.numel() != 1 or inv_scale.dtype != torch.float32 or inv_scale.device != t.device:
        raise ValueError("cast_transpose: inv_scale must be a one-element float32 tensor on t's device")
    if round_to not in _ROUND_CODES:
        raise ValueError(f"cast_transpose: round_to {round_to} not supported; accepted: bf16, fp16, fp32")
    R, C = t.shape
    row = torch.empty((R, C), dtype=dtype, device=t.device) if write_row else None
    col = torch.empty((C, R), dtype=dtype, device=t.device) if write_col else None
    if t.numel() == 0:
        return row, col
    # Unused outputs get a valid dummy pointer; the constexpr flags compile their stores away.
    dummy = row if row is not None else col
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _kernel(_interpreting())[grid](
        t, inv_scale, row if row is not None else dummy, col if col is not None else dummy,
        R, C, t.stride(0), t.stride(1), float(torch.finfo(dtype).max),
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, ROUND_TO=_ROUND_CODES[round_to],
        E4M3=dtype == torch.float8_e4m3fn, WRITE_ROW=write_row, WRITE_COL=write_col,
    )
    return row, col
