"""scale.scaled() and scale.resolve() against hand-computed values (REFERENCE §1.2, §1.3)."""

from __future__ import annotations

import math

import pytest
import torch

from unitscale.scale import check_constraint, resolve, scaled


@pytest.mark.parametrize("fwd, bwd", [(1.0, 1.0), (0.5, 3.0), (2.0, 2.0), (1.0, 1e-3), (7.5, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scaled_forward_and_backward(fwd, bwd, dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 32, dtype=dtype, requires_grad=True)
    g = torch.randn(64, 32, dtype=dtype)
    y = scaled(x, fwd, bwd)
    assert y.dtype == dtype
    torch.testing.assert_close(y, x.detach() * fwd, rtol=0, atol=0)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * bwd, rtol=0, atol=0)
    assert torch.isfinite(x.grad).all()


def test_scaled_is_not_the_chain_rule():
    x = torch.ones(3, requires_grad=True)
    (scaled(x, 4.0, 0.25) * 2).sum().backward()
    assert x.grad.tolist() == [0.5, 0.5, 0.5]  # chain rule would give 8


def test_scaled_unit_is_identity_object():
    x = torch.randn(3)
    assert scaled(x) is x


@pytest.mark.parametrize("fwd, bwd", [(0.0, 1.0), (1.0, -2.0), (math.inf, 1.0), (1.0, math.nan)])
def test_scaled_rejects_bad_scales(fwd, bwd):
    with pytest.raises(ValueError, match="finite positive"):
        scaled(torch.ones(2), fwd, bwd)


def test_resolve_gmean_linear_1024_4096():
    m, n = 1024, 4096
    alpha, betas = resolve(m**-0.5, {"input": n**-0.5, "weight": 0.01}, ["input"], "gmean")
    assert alpha == pytest.approx((m * n) ** -0.25, rel=1e-12)
    assert alpha == pytest.approx(1 / 45.254833995939, rel=1e-12)  # REFERENCE §1.6 worked example
    assert betas == {"input": pytest.approx((m * n) ** -0.25, rel=1e-12), "weight": 0.01}


def test_resolve_to_output_and_none():
    m, n = 1024, 4096
    alpha, betas = resolve(m**-0.5, {"input": n**-0.5}, ["input"], "to_output")
    assert alpha == betas["input"] == m**-0.5
    # The constrained gradient is off by √(fan_out/fan_in) = 2 relative to its ideal n^-½.
    assert betas["input"] / n**-0.5 == pytest.approx(2.0, rel=1e-12)
    alpha, betas = resolve(m**-0.5, {"input": n**-0.5}, ["input"], None)
    assert (alpha, betas["input"]) == (m**-0.5, n**-0.5)


def test_resolve_three_way_group():
    b, m, n = 4096, 64, 256
    alpha, betas = resolve(m**-0.5, {"left": n**-0.5, "right": b**-0.5}, ["left", "right"])
    expected = (b * m * n) ** (-1 / 6)
    assert alpha == pytest.approx(expected, rel=1e-12)
    assert betas["left"] == pytest.approx(expected, rel=1e-12)
    assert betas["right"] == pytest.approx(expected, rel=1e-12)


def test_resolve_no_constrained_inputs_keeps_ideal():
    assert resolve(0.5, {"w": 0.25}, [], "gmean") == (0.5, {"w": 0.25})


def test_resolve_errors():
    with pytest.raises(ValueError, match="'geo'"):
        resolve(1.0, {"x": 1.0}, ["x"], "geo")
    with pytest.raises(ValueError, match="'y'"):
        resolve(1.0, {"x": 1.0}, ["y"])
    with pytest.raises(ValueError, match="accepted"):
        check_constraint("mean")
    assert check_constraint(None) is None
