"""Fused FP8 cast + transpose (Triton; optional: every name here works only when ``triton`` imports).

One pass over a 2-D tensor ``t`` [R, C] writes both FP8 layouts the three GEMMs of a linear need:

    q   = cast(clamp(ρ(t) · s⁻¹, −max, max))      row-major [R, C]
    qᵀ  = the same values, transposed contiguous   row-major [C, R]  (= column-major [R, C])

with s a power-of-two dequantisation scale read from a one-element float32 tensor (static or computed on
the device, never synchronised to the host), max the FP8 format's largest finite value and ρ an optional
rounding to the compute dtype first (an fp32 master weight under bf16 autocast: the value the simulate
backend quantises). The clamp is explicit because not every torch/Triton version saturates on the cast; it is
written with ``tl.where`` (a comparison with NaN is false, so NaN passes through and stays NaN) rather than
``tl.clamp(..., propagate_nan=ALL)``: that clamp next to a transposed FP8 store is the pattern of a known
Triton miscompile that fills the transposed copy with NaN/Inf. Each input element is read once; each output
written once.

:func:`fp8_cast_pair` is the one entry point: the custom operator ``unitscale::fp8_cast_transpose``
(``torch.library.triton_op``), so ``torch.compile`` traces it without a graph break and Inductor emits
this kernel into the compiled code (not its own cast). On CUDA with Triton it launches the kernel;
elsewhere it runs :func:`cast_pair_torch`, the same maths in torch ops. ``TRITON_INTERPRET=1`` runs
:func:`cast_transpose` on CPU tensors (the interpreter's FP8 conversion is not round-to-nearest-even and
turns NaN into a finite code, so bit-exact rounding of arbitrary values and NaN are checked on GPU only).
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
    src,
    inv_scale_ptr,
    out_row,
    out_col,
    R,
    C,
    stride_r,
    stride_c,
    fp8_max,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROUND_TO: tl.constexpr,
    E4M3: tl.constexpr,
    WRITE_ROW: tl.constexpr,
    WRITE_COL: tl.constexpr,
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
    # Saturate with selects, not tl.clamp (see module docstring); NaN fails both tests and stays NaN.
    x = tl.where(x > fp8_max, fp8_max, x)
    x = tl.where(x < -fp8_max, -fp8_max, x)
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
    _check(t, inv_scale, dtype, round_to)
    R, C = t.shape
    row = torch.empty((R, C), dtype=dtype, device=t.device) if write_row else None
    col = torch.empty((C, R), dtype=dtype, device=t.device) if write_col else None
    if t.numel() == 0:
        return row, col
    # Unused outputs get their own one-byte dummy (never an alias of the other output: Inductor's
    # functionalisation of the kernel call must see two distinct buffers); constexpr flags drop their stores.
    dummy = torch.empty(1, dtype=dtype, device=t.device) if row is None or col is None else row
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    torch.library.wrap_triton(_kernel(_interpreting()))[grid](
        t,
        inv_scale,
        row if row is not None else dummy,
        col if col is not None else dummy,
        R,
        C,
        t.stride(0),
        t.stride(1),
        float(torch.finfo(dtype).max),
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        ROUND_TO=_ROUND_CODES[round_to],
        E4M3=dtype == torch.float8_e4m3fn,
        WRITE_ROW=write_row,
        WRITE_COL=write_col,
    )
    return row, col


def cast_pair_torch(
    t: Tensor,
    inv_scale: Tensor,
    dtype: torch.dtype,
    *,
    round_to: torch.dtype | None = None,
    write_row: bool = True,
    write_col: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`cast_transpose` in torch ops (any device): the CPU / no-Triton implementation of the op."""
    y = t.to(round_to) if round_to is not None else t
    y = y.float() * inv_scale.float().reshape(())  # fp32: a power-of-two rescale of fp16 must not overflow
    fmax = torch.finfo(dtype).max
    q = y.clamp(-fmax, fmax).to(dtype)  # explicit clamp: eager casts saturate only from torch 2.12 on
    return (q if write_row else None), (q.t().contiguous() if write_col else None)


def _check(t: Tensor, inv_scale: Tensor, dtype: torch.dtype, round_to: torch.dtype | None) -> None:
    """The argument rules of the cast, shared by every implementation."""
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


def _empty(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(0, dtype=dtype, device=device)


@torch.library.triton_op("unitscale::fp8_cast_transpose", mutates_args=())
def _fp8_cast_transpose_op(
    t: Tensor,
    inv_scale: Tensor,
    dtype: torch.dtype,
    round_to: torch.dtype | None,
    write_row: bool,
    write_col: bool,
) -> tuple[Tensor, Tensor]:
    """The registered op: (q, qᵀ), a layout not asked for returned as an empty tensor (ops return no None).

    Runs on real, fake and functional tensors alike (``triton_op`` uses it as the fake implementation and
    as the decomposition Inductor compiles), so it branches only on the device and the static flags.
    """
    if t.is_cuda and TRITON_AVAILABLE:
        row, col = cast_transpose(
            t, inv_scale, dtype, round_to=round_to, write_row=write_row, write_col=write_col
        )
    else:
        row, col = cast_pair_torch(
            t, inv_scale, dtype, round_to=round_to, write_row=write_row, write_col=write_col
        )
    return (_empty(dtype, t.device) if row is None else row), (
        _empty(dtype, t.device) if col is None else col
    )


def fp8_cast_pair(
    t: Tensor,
    inv_scale: Tensor,
    dtype: torch.dtype,
    *,
    round_to: torch.dtype | None = None,
    write_row: bool = True,
    write_col: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """(q [R, C], qᵀ [C, R] contiguous), q = fp8(clamp(ρ(t)·inv_scale, ±max)), None where not asked.

    Through the ``unitscale::fp8_cast_transpose`` op: the fused Triton kernel on CUDA (eager and compiled),
    torch ops elsewhere. ``round_to`` equal to t's dtype is dropped (no rounding to do).
    """
    if round_to == t.dtype:
        round_to = None
    _check(t, inv_scale, dtype, round_to)
    row, col = torch.ops.unitscale.fp8_cast_transpose(
        t, inv_scale.reshape(1), dtype, round_to, write_row, write_col
    )
    return (row if write_row else None), (col if write_col else None)
