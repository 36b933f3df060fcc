"""α and β are applied before a half-precision product is rounded (issue 20, item 7).

With fp16 compute, 4096 rows and a ×2048 loss scale, a unit-scaled weight gradient is β_w·∂Yᵀx with
β_w = 4096^-½: its true maximum is ≈ 8.4e3 < 65504, but the unscaled product ∂Yᵀx reaches ≈ 5.4e5 and
overflowed when it was rounded to fp16 before the scale. Every backend path is checked against float64.
"""

from __future__ import annotations

import pytest
import torch

import unitscale.functional as U
from unitscale.precision.backend import EXACT
from unitscale.precision.fp8 import Dispatch, Fp8Backend
from unitscale.precision.simulate import Simulate

FP16_MAX = 65504.0
ROWS, K, N, LOSS_SCALE = 4096, 64, 64, 2048.0
BACKENDS = {
    "exact": EXACT,
    "simulate-fp16": Simulate("fp16", "fp16", "fp16"),
    "simulate-fp8": Simulate("e4m3", "e4m3", "e5m2", saturate=True, weight_scale="pow2_amax"),
    "fp8": Fp8Backend(dispatch=Dispatch.always()),
}


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Finite, and within rtol of ref's max (fp16 rounding of the result, FP32 summation order)."""
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} non-finite values"
    err = float((got.detach().double() - ref).abs().max())
    assert err <= rtol * float(ref.abs().max()), err


def _operands():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, K, generator=gen).half()
    w = torch.randn(N, K, generator=gen).half()
    b = torch.randn(N, generator=gen).half()
    g = (LOSS_SCALE * torch.randn(ROWS, N, generator=gen)).half()
    return x, w, b, g


@pytest.mark.parametrize("name", list(BACKENDS))
def test_fp16_weight_and_bias_gradients_under_a_loss_scale_stay_finite(name):
    backend = BACKENDS[name]
    x, w, b, g = _operands()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = U.linear(xr, wr, br, precision=backend)
    assert y.dtype == torch.float16
    y.backward(g)
    # float64 reference of the same maths from the operands the backend multiplies (its casts of g and x).
    cast_g = backend.cast_backward(g) if name != "fp8" else _fp8(g, torch.float8_e5m2)
    cast_x = backend.cast_forward(x, "activation") if name != "fp8" else _fp8(x, torch.float8_e4m3fn)
    beta = ROWS**-0.5
    ref_w = beta * cast_g.double().t() @ cast_x.double()
    ref_b = beta * g.double().sum(0)
    unscaled = cast_g.double().t() @ cast_x.double()
    assert float(unscaled.abs().max()) > FP16_MAX  # the unscaled product overflows
    assert float(ref_w.abs().max()) < FP16_MAX / 4 and float(ref_b.abs().max()) < FP16_MAX
    assert float(g.double().sum(0).abs().max()) > FP16_MAX  # and so does the unscaled bias sum
    _close(wr.grad, ref_w, 2e-3)
    _close(br.grad, ref_b, 2e-3)
    assert torch.isfinite(xr.grad).all()


def _fp8(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return t.float().clamp(-fmax, fmax).to(dtype).double()


@pytest.mark.parametrize("name", ["exact", "simulate-fp16"])
@pytest.mark.parametrize("right_batched", [False, True], ids=["2d-right", "batched-right"])
def test_fp16_matmul_scales_before_rounding(name, right_batched):
    # y = α·a@b with a large a: α·a@b ≈ 8e3 while a@b ≈ 5e5; ∂b = β_b·aᵀ∂y likewise.
    backend = BACKENDS[name]
    gen = torch.Generator().manual_seed(1)
    a = (LOSS_SCALE * torch.randn(2, 128, 4096, generator=gen)).half()
    b = torch.randn(*((2,) if right_batched else ()), 4096, 32, generator=gen).half()
    g = torch.randn(2, 128, 32, generator=gen).half()
    alpha, beta_a, beta_b = 4096**-0.5, 32**-0.5, 256**-0.5
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = backend.matmul(ar, br, alpha=alpha, beta_a=beta_a, beta_b=beta_b)
    y.backward(g)
    a64, b64, g64 = a.double(), b.double(), g.double()
    assert float((a64 @ b64).abs().max()) > FP16_MAX
    _close(y, alpha * (a64 @ b64), 2e-3)
    _close(ar.grad, beta_a * (g64 @ b64.transpose(-1, -2)), 2e-3)
    ref_b = beta_b * (a64.transpose(-1, -2) @ g64)
    _close(br.grad, ref_b if right_batched else ref_b.sum(0), 2e-3)
