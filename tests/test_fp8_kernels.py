"""The fused Triton cast+transpose kernel under the Triton CPU interpreter (TRITON_INTERPRET=1).

The interpreter's FP8 conversion is not round-to-nearest-even (and mangles NaN), so values here are already
representable in the target format (times the power-of-two scale): what is checked is indexing, masks on
shapes that are not multiples of the block, strides, both layouts, the scale and the saturating clamp.
Bit-exact rounding against torch's casts is tests/gpu/test_fp8_gpu.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is built (lazily, per interpreter mode)

from unitscale.precision.fp8_kernels import BLOCK_C, BLOCK_R, cast_transpose  # noqa: E402

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def representable(shape, dtype, scale, seed):
    """Random values on the FP8 grid of ``dtype`` (all magnitudes, both signs) times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype).float()
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes))  # drop NaN/inf codes
    return codes * scale


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (BLOCK_R, BLOCK_C), (BLOCK_R + 6, 2 * BLOCK_C + 2), (130, 3),
                                   (3, 200)])
@pytest.mark.parametrize("dtype", [E4, E5])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_layouts_and_masks(shape, dtype, src_dtype):
    scale = 2.0 ** -3
    t = representable(shape, dtype, scale, seed=sum(shape)).to(src_dtype)
    row, col = cast_transpose(t, torch.tensor([1 / scale]), dtype)
    ref = (t.float() / scale).to(dtype)  # exact: every value is on the grid
    assert row.shape == shape and col.shape == shape[::-1] and col.is_contiguous()
    assert torch.equal(bits(row), bits(ref))
    assert torch.equal(bits(col), bits(ref.t().contiguous()))


@pytest.mark.parametrize("round_to", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_path(round_to):
    # Values on the E4M3 grid are also on the bf16/fp16 grids: the pre-rounding must leave them alone.
    t = representable((65, 33), E4, 2.0 ** -4, seed=4)
    row, col = cast_transpose(t, torch.tensor([16.0]), E4, round_to=round_to)
    assert torch.equal(bits(row), bits((t * 16).to(E4)))
    assert torch.equal(bits(col), bits(row.t().contiguous()))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the fp16 overflow
def test_round_to_happens_before_the_scale():
    # 2^16 overflows fp16 (max 65504): rounded first it is inf, saturated to 448; unrounded, 2^16·2^-10 = 64.
    t = torch.full((3, 5), 2.0 ** 16)
    inv = torch.tensor([2.0 ** -10])
    assert cast_transpose(t, inv, E4, round_to=torch.float16)[0].float().unique().tolist() == [448.0]
    assert cast_transpose(t, inv, E4)[0].float().unique().tolist() == [64.0]


def test_strided_input():
    base = representable((40, 90), E4, 1.0, seed=1)
    t = base.t()  # [90, 40] with strides (1, 90)
    row, col = cast_transpose(t, torch.ones(1), E4)
    assert torch.equal(bits(row), bits(t.contiguous().to(E4)))
    assert torch.equal(bits(col), bits(base.to(E4)))


@pytest.mark.parametrize("dtype", [E4, E5])
def test_saturates_to_max(dtype):
    fmax = torch.finfo(dtype).max
    t = representable((33, 17), dtype, 1.0, seed=2)
    t[0, :6] = torch.tensor([2 * fmax, -2 * fmax, 1e30, -1e30, math.inf, -math.inf])
    row, col = cast_transpose(t, torch.ones(1), dtype)
    expected = t.clamp(-fmax, fmax).to(dtype)
    assert row.float()[0, :6].tolist() == [fmax, -fmax] * 3
    assert torch.equal(bits(row), bits(expected)) and torch.equal(bits(col), bits(expected.t().contiguous()))


def test_single_layout_requests():
    t = representable((70, 20), E5, 1.0, seed=3)
    row, col = cast_transpose(t, torch.ones(1), E5, write_col=False)
    assert col is None and torch.equal(bits(row), bits(t.to(E5)))
    row, col = cast_transpose(t, torch.ones(1), E5, write_row=False)
    assert row is None and torch.equal(bits(col), bits(t.to(E5).t().contiguous()))


def test_empty_input():
    row, col = cast_transpose(torch.empty(0, 5), torch.ones(1), E4)
    assert row.shape == (0, 5) and col.shape == (5, 0)


@pytest.mark.parametrize(
    "args,match",
    [((torch.ones(4, 4), torch.ones(1), torch.bfloat16), "dtype"),
     ((torch.ones(4, 4, 4), torch.ones(1), E4), "2-D"),
     ((torch.ones(4, 4, dtype=torch.float64), torch.ones(1), E4), "float64"),
     ((torch.ones(4, 4), torch.ones(2), E4), "inv_scale"),
     ((torch.ones(4, 4), torch.ones(1), E4, torch.float64), "round_to"),
     ((torch.ones(4, 4), torch.ones(1, dtype=torch.float64), E4), "inv_scale")],
)
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        cast_transpose(*args[:3], round_to=args[3] if len(args) > 3 else None)
