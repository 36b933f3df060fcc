"""The unit causal convolution (functional.causal_conv1d, nn.CausalConv1d): unit scale at init, the maths
against an explicit float64 sum over taps, causality, the plain form, export, bad input.

Reference scales (docs/theory.md, Causal convolution), written out here: fan-in = fan-out = k·C/G, so
α = β_x = (k·C/G)^-½ and β_W = (b·t)^-½ (gmean of α and β_x is the same number).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import unitscale.functional as U
import unitscale.nn as unn
from unitscale import models
from unitscale.export import export, unitscale_references


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[b, t, g·co + o] = Σ_j Σ_i w[g, j·ci + i, o] · x[b, t − k + 1 + j, g·ci + i] (x = 0 before t = 0)."""
    b, t, c = x.shape
    g, kc, co = w.shape
    ci = c // g
    k = kc // ci
    y = x.new_zeros(b, t, g * co)
    for j in range(k):
        shift = k - 1 - j
        xs = torch.cat([x.new_zeros(b, shift, c), x[:, : t - shift]], dim=1) if shift else x
        for gi in range(g):
            y[..., gi * co : (gi + 1) * co] += xs[..., gi * ci : (gi + 1) * ci] @ w[gi, j * ci : (j + 1) * ci]
    return y


def test_char_lm_conv_block_is_unit_at_init():
    """Regression (issue 20.4): k = 7, C = 128, G = 8. With fan-out C/G the output and input gradient had
    σ = 7^¼ = 1.63; with k·C/G both are 1. Tolerance ±0.05 (16·256 rows, fixed seed; the k − 1 = 6 short
    windows at the sequence start lower σ by < 1%)."""
    torch.manual_seed(0)
    model = models.build("conv", 16, d_model=128, conv_kernel=7, conv_groups=8, seq_len=256, n_layers=1)
    conv = model.blocks[0].body.double()
    x = torch.randn(16, 256, 128, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    y.backward(torch.randn_like(y))
    assert abs(y.std().item() - 1) < 0.05
    assert abs(x.grad.std().item() - 1) < 0.05
    assert abs(conv.weight.grad.std().item() - 1) < 0.05


@pytest.mark.parametrize(("c", "k", "g"), [(12, 3, 4), (8, 1, 1), (6, 5, 2)])
def test_matches_explicit_sum_with_closed_form_scales(c, k, g):
    torch.manual_seed(1)
    b, t = 3, 9
    conv = unn.CausalConv1d(c, k, g).double()
    x = torch.randn(b, t, c, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    grad = torch.randn(b, t, c, dtype=torch.float64)
    y = conv(x)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    plain = _reference(x_ref, w)
    plain.backward(grad)
    fan = k * c / g
    torch.testing.assert_close(y, plain * fan**-0.5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad * fan**-0.5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, w.grad * (b * t) ** -0.5, rtol=1e-12, atol=1e-12)


def test_causal_and_plain_form_and_export():
    torch.manual_seed(2)
    conv = unn.CausalConv1d(16, 7, 8).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 10:] += 1.0
    with torch.no_grad():
        y, y2 = conv(x), conv(changed)
        torch.testing.assert_close(y[:, :10], y2[:, :10], rtol=0, atol=0)
        assert (y[:, 10:] - y2[:, 10:]).abs().max() > 1e-3
        torch.testing.assert_close(conv.plain_forward(x), y, rtol=1e-12, atol=1e-12)
    gm = export(nn.Sequential(conv), x)
    assert unitscale_references(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=1e-12, atol=1e-12)
        longer = torch.randn(3, 33, 16, dtype=torch.float64)  # α does not depend on the length
        torch.testing.assert_close(gm(longer), conv(longer), rtol=1e-12, atol=1e-12)


def test_grad_rows_sets_the_weight_gradient_rows():
    torch.manual_seed(3)
    conv = unn.CausalConv1d(8, 3, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    conv(x).sum().backward()
    default = conv.weight.grad.clone()
    conv.weight.grad = None
    unn.set_grad_rows(conv, 40.0)
    conv(x).sum().backward()
    torch.testing.assert_close(conv.weight.grad, default * math.sqrt(10 / 40), rtol=1e-12, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="channels=10 is not divisible by groups=4"):
        unn.CausalConv1d(10, 3, 4)
    with pytest.raises(ValueError, match="kernel_size must be a positive integer, got 0"):
        unn.CausalConv1d(8, 0, 2)
    with pytest.raises(ValueError, match=r"expects input \(batch, length, channels\)"):
        U.causal_conv1d(torch.randn(4, 8), torch.randn(2, 12, 4))
    with pytest.raises(ValueError, match=r"weight \(3, 12, 4\) does not fit 8 input channels"):
        U.causal_conv1d(torch.randn(1, 4, 8), torch.randn(3, 12, 4))
