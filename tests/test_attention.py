"""Attention edge cases: the probability scale per format, torch's mask convention on every path.

Oracles are independent of the code under test: torch's float64 ``F.scaled_dot_product_attention`` (whose
causal mask is top-left aligned, ``torch.ones(L, S).tril(0)``, and whose fully masked rows give 0), and
each format's own grid (``quantise`` / ``quantise_int``, torch's float dtypes where they exist).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unitscale.functional as U
from unitscale import precision, rules
from unitscale import standard as _standard
from unitscale.formats import FORMATS, Format, quantise, quantise_int
from unitscale.precision.backend import EXACT

# -- the probability scale c: P·c enters the PV matmul --------------------------------------------------


def _on_grid(value: float, fmt: Format) -> bool:
    """Whether ``value`` is a finite value of ``fmt`` (its own rounding returns it unchanged)."""
    x = torch.tensor([value], dtype=torch.float64)
    if fmt.is_float:
        q = quantise(x, fmt, saturate=False)
    else:
        q = quantise_int(x, fmt, 1.0).to(torch.float64)
    return bool(torch.isfinite(q).all()) and q.item() == value


@pytest.mark.parametrize("name", list(FORMATS))
def test_probability_one_times_the_scale_is_representable_in_every_format(name):
    """c = largest 2^k ≤ the format's max, at most 2^8: P = 1 (a causal row 0) enters the cast as c, which
    must be a finite value of the format and not saturate; 2c must not be (c is the largest) unless the
    2^8 cap decided."""
    fmt = FORMATS[name]
    c = rules.attention_probs_scale(fmt)
    assert math.log2(c) == int(math.log2(c)) and 1 <= c <= 2**8
    assert _on_grid(c, fmt), f"P·c = {c} is not a finite value of {name} (max {fmt.max})"
    assert c <= fmt.max
    assert c == 2**8 or not _on_grid(2 * c, fmt)
    if fmt.torch_dtype is not None and fmt.is_float:  # torch's own cast agrees
        assert torch.tensor([c]).to(fmt.torch_dtype).float().item() == c


def test_probability_scale_values():
    """The values the docs state (docs/theory.md, Attention probability scale)."""
    expected = {"fp8_e4b": 256, "fp8_e4a": 128, "fp8_e5b": 256, "fp8_e5a": 256, "fp16": 256, "bf16": 256,
                "fp32": 256, "int8": 64, "int4": 4}  # fmt: skip
    for name, c in expected.items():
        assert rules.attention_probs_scale(name) == c, name
    assert rules.attention_probs_scale(None) == 256  # no cast: the default
    assert rules.attention_probs_scale(torch.float8_e4m3fnuz) == 128  # a backend holding torch dtypes
    with pytest.raises(ValueError, match="unknown number format"):
        rules.attention_probs_scale("fp7")


def test_causal_row_zero_is_exact_under_the_fnuz_e4_recipe():
    """Row 0 of causal attention has P = (1, 0, …): under ``fp8-e4a`` (max 240) it must equal the fp32
    result. With c = 2^8, P·c = 256 saturated to 240 and the row came out × 0.9375."""
    backend = precision.backend_for(nn.Module(), precision.get_recipe("fp8-e4a"), kind="attention")
    assert backend is not None
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(2))
    v = quantise(torch.randn(2, 3, 16, 8, generator=g), "fp8_e4a")  # on the grid: V casts exactly
    y = U.scaled_dot_product_attention(q, k, v, is_causal=True, precision=backend)
    ref = U.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y[..., 0, :], ref[..., 0, :], rtol=1e-6, atol=0)


# -- masks: torch's convention on the fused and the unfused path ---------------------------------------

SHAPES = [(4, 8), (8, 4)]  # (queries, keys)
MASKS = ["causal", "bool", "float"]


def _mask_kwargs(kind: str, s_q: int, s_k: int) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "causal":
        return {"is_causal": True}
    keep = torch.rand(s_q, s_k, generator=g) > 0.4
    keep[1] = False  # a fully masked row: torch gives 0 output and 0 gradients there
    if kind == "bool":
        return {"attn_mask": keep}
    additive = torch.randn(s_q, s_k, dtype=torch.float64, generator=g)
    return {"attn_mask": additive.masked_fill(~keep, float("-inf"))}


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}k")
def test_masked_attention_matches_torch_sdpa(shape, kind, path):
    """y = f·SDPA(q, k, v) and ∂q, ∂k, ∂v = f·torch's, f = √(s/e), in float64, for query length ≠ key
    length (the unfused path used to align the causal mask bottom-right: outputs off by up to 3.3 at 4×8
    and NaN rows at 8×4)."""
    s_q, s_k = shape
    kwargs = _mask_kwargs(kind, s_q, s_k)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, n, 6, dtype=torch.float64, generator=g).requires_grad_() for n in (s_q, s_k, s_k)]
    dy = torch.randn(2, 3, s_q, 6, dtype=torch.float64, generator=g)
    backend = None if path == "fused" else EXACT
    y = U.scaled_dot_product_attention(*xs, precision=backend, **kwargs)
    grads = torch.autograd.grad(y, xs, dy)
    y0 = F.scaled_dot_product_attention(*xs, **kwargs)
    grads0 = torch.autograd.grad(y0, xs, dy)
    f = math.sqrt(s_k / math.e)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(y, f * y0, rtol=1e-12, atol=1e-12)
    for got, ref in zip(grads, grads0, strict=True):
        torch.testing.assert_close(got, f * ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}k")
def test_standard_attention_through_a_backend_matches_torch_sdpa(shape, kind):
    """The standard (not unit-scaled) twin's backend path uses the same mask: equal to torch's SDPA."""
    s_q, s_k = shape
    kwargs = _mask_kwargs(kind, s_q, s_k)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 2, n, 5, dtype=torch.float64, generator=g).requires_grad_() for n in (s_q, s_k, s_k)]
    y = _standard.scaled_dot_product_attention(*xs, precision=EXACT, **kwargs)
    y0 = F.scaled_dot_product_attention(*xs, **kwargs)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y0)
    for got, ref in zip(torch.autograd.grad(y, xs, dy), torch.autograd.grad(y0, xs, dy), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_masked_softmax_is_torch_sdpa_attention_weights():
    """softmax of the masked logits equals the weights torch's SDPA applies (V = identity recovers them)."""
    g = torch.Generator().manual_seed(3)
    for s_q, s_k in SHAPES:
        logits = torch.randn(s_q, s_k, dtype=torch.float64, generator=g)
        for kind in MASKS:
            kwargs = _mask_kwargs(kind, s_q, s_k)
            # q·kᵀ/√d = logits with d = s_k, k = √d·I, v = I
            weights = F.scaled_dot_product_attention(
                logits, math.sqrt(s_k) * torch.eye(s_k, dtype=torch.float64),
                torch.eye(s_k, dtype=torch.float64), **kwargs,
            )  # fmt: skip
            torch.testing.assert_close(U.masked_softmax(logits, **kwargs), weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [None, EXACT])
def test_mask_and_causal_together_are_refused_as_torch_does(backend):
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="attn_mask.*is_causal"):
        U.scaled_dot_product_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool), is_causal=True,
                                       precision=backend)  # fmt: skip
