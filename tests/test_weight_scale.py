"""Per-weight power-of-two cast scales (precision.scales; issue 20, item 11): the rule against exact
arithmetic, the SNR it buys for non-unit weights against float64 maths and torch's float8 casts, and
identical casts in the simulate and fp8 backends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unitscale.precision import Recipe, apply, get_recipe
from unitscale.precision.fp8 import Dispatch, Fp8Backend
from unitscale.precision.scales import pow2_amax_scale, weight_scale
from unitscale.precision.simulate import Simulate

E4, E4_MAX = torch.float8_e4m3fn, 448.0


def snr64(x: torch.Tensor, q: torch.Tensor) -> float:
    """E[x²] / E[(x − q)²] in float64."""
    x, q = x.double(), q.double()
    return float(x.pow(2).mean() / (x - q).pow(2).mean())


def torch_cast64(w: torch.Tensor, k: int) -> torch.Tensor:
    """Reference scaled cast: torch's E4M3 RNE cast of w·2^k (float64 maths, clamped), times 2^-k."""
    y = (w.double() * 2.0**k).clamp(-E4_MAX, E4_MAX)
    return y.float().to(E4).double() * 2.0**-k


def largest_k(amax: float, fmt_max: float = E4_MAX) -> int:
    """Largest integer k with amax·2^k ≤ fmt_max, by exact float64 search (powers of two scale exactly)."""
    k = 0
    while amax * 2.0**k > fmt_max:
        k -= 1
    while amax * 2.0 ** (k + 1) <= fmt_max:
        k += 1
    return k


@pytest.mark.parametrize(
    "amax",
    [448.0, 448.0 * (1 + 2**-23), 448.0 * (1 - 2**-24), 0.09, 1.0, 1e-30, 3e30, 2.0**-20 * 448, 17.0, 449.0],
)
def test_pow2_amax_scale_is_the_largest_that_does_not_saturate(amax):
    w = torch.tensor([amax, -amax / 3, 0.0], dtype=torch.float32)
    amax32 = float(w.abs().max())
    s = float(pow2_amax_scale(w, E4_MAX))
    assert s == 2.0 ** -largest_k(amax32)
    assert amax32 / s <= E4_MAX < 2 * amax32 / s


def test_pow2_amax_scale_of_zero_and_nonfinite_is_one():
    assert float(pow2_amax_scale(torch.zeros(3, 3), E4_MAX)) == 1.0
    assert float(pow2_amax_scale(torch.tensor([1.0, math.inf]), E4_MAX)) == 1.0
    assert float(pow2_amax_scale(torch.tensor([1.0, math.nan]), E4_MAX)) == 1.0
    with pytest.raises(ValueError, match="accepted: static, pow2_amax, pow2_rms"):
        weight_scale(torch.ones(2), "amax", E4_MAX)


def test_snr_of_small_weights_in_e4m3_with_and_without_the_scale():
    # σ = 0.02 weights (standard init, init="keep" conversions). Unscaled, E4M3 puts most of them in its
    # subnormal range (below 2^-6) and flushes those under 2^-10 to 0: SNR ≈ 916 instead of the ≈ 1.42e3 of
    # a unit tensor (docs/theory.md, Signal-to-noise). The per-weight scale brings it back to the plateau.
    gen = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(2**20, generator=gen)
    amax = float(w.abs().max())
    k = largest_k(amax)
    ref_scaled, ref_unscaled = torch_cast64(w, k), torch_cast64(w, 0)
    with_scale = Simulate("e4m3", None, None, saturate=True, weight_scale="pow2_amax")
    scaled = with_scale.cast_forward(w, "weight")
    unscaled = Simulate("e4m3", None, None, saturate=True).cast_forward(w, "weight")
    assert torch.equal(scaled.double(), ref_scaled) and torch.equal(unscaled.double(), ref_unscaled)
    snr_scaled, snr_unscaled = snr64(w, scaled), snr64(w, unscaled)
    assert 850 < snr_unscaled < 1000  # measured 915.6 with this seed
    assert snr_scaled > 1380  # measured 1423.6: the unit-σ plateau
    assert float((unscaled == 0).double().mean()) > 0.03  # 3.9 % flushed to zero without the scale
    assert float((scaled == 0).double().mean()) < 1e-4
    # Unit tensors lose nothing by being scaled: within 1 % of the unscaled SNR at σ = 1.
    unit = torch.randn(2**20, generator=gen)
    s_unit = with_scale.cast_forward(unit, "weight")
    assert snr64(unit, s_unit) > 0.99 * snr64(unit, torch_cast64(unit, 0))


@pytest.mark.parametrize("sigma", [2.0**-14, 0.02, 1.0, 37.0, 3000.0])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["pow2_amax", "pow2_rms"])
def test_simulate_and_fp8_backends_cast_weights_identically(sigma, compute, mode):
    gen = torch.Generator().manual_seed(3)
    w = (sigma * torch.randn(48, 64, generator=gen)).to(compute)
    sim = Simulate("e4m3", "e4m3", "e5m2", saturate=True, weight_scale=mode).cast_forward(w, "weight")
    w8, w8t, s_w = Fp8Backend(weight_scale=mode).weight_fp8(w, E4, compute)
    assert torch.equal(sim.double(), w8.double() * float(s_w))
    assert torch.equal(w8.t(), w8t)


def test_linear_outputs_match_across_backends_with_the_weight_scale():
    # The whole linear (forward and both gradients) under the scaled weight cast: fp8 GEMMs on CPU vs the
    # simulate backend, equal up to FP32 summation order, and closer to float64 than the unscaled casts.
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 64, generator=gen), 0.02 * torch.randn(32, 64, generator=gen)
    g = torch.randn(64, 32, generator=gen)
    backends = {
        "fp8": Fp8Backend(dispatch=Dispatch.always(), weight_scale="pow2_amax"),
        "sim": Simulate("e4m3", "e4m3", "e5m2", saturate=True, weight_scale="pow2_amax"),
        "paper": Simulate("e4m3", "e4m3", "e5m2", saturate=True),
    }
    outs = {}
    for name, be in backends.items():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = be.linear(xr, wr)
        y.backward(g)
        outs[name] = (y.detach(), xr.grad, wr.grad)
    for a, b in zip(outs["fp8"], outs["sim"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    exact_y = torch_cast64(x, 0) @ w.double().t()  # x's E4M3 rounding is the same in both: only W's differs
    assert snr64(exact_y, outs["sim"][0]) > 1.3 * snr64(exact_y, outs["paper"][0])


def test_recipes_scale_weights_except_the_paper_ones():
    for name in ("fp8", "fp8-e4a", "fp8-loss-scaled", "fp8-hw", "fp8-critical-bf16"):
        assert get_recipe(name).weight_scale == "pow2_amax", name
    for name in ("fp8-paper", "fp8-paper-e4a", "fp8-paper-loss-scaled"):
        r = get_recipe(name)
        assert r.weight_scale == "static" and r.weight_format is not None, name
    assert get_recipe("fp8-paper-e4a").weight_format == "fp8_e4a"
    assert get_recipe("fp8-paper-loss-scaled").loss_scale == 2048.0
    assert Recipe.fp8_paper().name == "fp8-paper"
    assert get_recipe("fp32").weight_scale == "static" and get_recipe("fp16-sim").weight_scale == "static"
    with pytest.raises(ValueError, match="unknown weight_scale 'rms'"):
        Recipe(weight_scale="rms")
    # apply hands the recipe's rule to the backend: a σ = 0.02 linear keeps its small weights.
    lin = nn.Linear(64, 64)
    nn.init.normal_(lin.weight, std=0.02)
    w = lin.weight.detach()
    scaled = apply(nn.Sequential(lin), "fp8")[0].precision.cast_forward(w, "weight")
    paper = apply(nn.Sequential(nn.Linear(64, 64)), "fp8-paper")[0].precision.cast_forward(w, "weight")
    assert snr64(w, scaled) > 1.3 * snr64(w, paper)


@pytest.mark.parametrize("backend_name", ["simulate", "fp8"])
def test_monitor_sees_the_scaled_weight_the_cast_rounds(backend_name):
    # σ = 0.02 weights cast with their power-of-two scale: the monitor must report W/s (RMS ≈ 0.02·2^k, no
    # subnormals), not W, in both backends (one rule: precision.scales).
    from unitscale.monitor import ScaleMonitor
    from unitscale.nn import Linear

    torch.manual_seed(0)
    layer = Linear(64, 32)
    nn.init.normal_(layer.weight, std=0.02)
    layer.precision = (
        Simulate("e4m3", "e4m3", "e5m2", saturate=True, weight_scale="pow2_amax")
        if backend_name == "simulate"
        else Fp8Backend(dispatch=Dispatch.always(), weight_scale="pow2_amax")
    )
    k = largest_k(float(layer.weight.abs().max()))
    monitor = ScaleMonitor(layer, every=1)
    with monitor.step(1):
        layer(torch.randn(16, 64)).sum().backward()
    stats = {s.tensor: s for s in monitor.last}["weight"]
    expected = float(layer.weight.detach().double().pow(2).mean().sqrt()) * 2.0**k
    assert stats.rms == pytest.approx(expected, rel=1e-5)
    assert stats.subnormal < 0.01  # unscaled, 57 % of these weights would be subnormal in E4M3
