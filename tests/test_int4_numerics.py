"""Pure INT4 numerics against independent float64 / int64 / scipy / torch-autograd references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from unitscale.precision.int4 import (
    LSQ,
    Int4Config,
    bernoulli_weights,
    bit_split,
    block_hadamard,
    block_hadamard_inverse,
    hadamard,
    int_gemm,
    lsq_codes,
    qbounds,
    reference_gemm,
    row_weights,
    single_digit,
    stochastic_round,
    water_fill,
)

# Hadamard ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [1, 2, 4, 8, 32, 128, 1024])
def test_hadamard_matches_scipy_and_is_orthonormal(g):
    h = hadamard(g)
    ref = torch.from_numpy(scipy.linalg.hadamard(g).astype(np.float64)) / math.sqrt(g)
    assert torch.equal(h, ref) or torch.allclose(h, ref, rtol=0, atol=1e-15)
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h @ h.t(), torch.eye(g, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,g", [((7, 64), 32), ((2, 3, 96), 32), ((5, 64), 64), ((4, 16), 1)])
def test_block_hadamard_matches_explicit_block_diagonal_and_inverts(shape, g):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    d = shape[-1]
    hb = torch.from_numpy(scipy.linalg.block_diag(*[scipy.linalg.hadamard(g) / math.sqrt(g)] * (d // g)))
    y = block_hadamard(x, g)
    torch.testing.assert_close(y, x @ hb, rtol=0, atol=1e-12)
    torch.testing.assert_close(block_hadamard_inverse(y, g), x, rtol=0, atol=1e-12)


def test_rotation_preserves_the_product():
    gen = torch.Generator().manual_seed(1)
    x, w = (
        torch.randn(9, 128, generator=gen, dtype=torch.float64),
        torch.randn(5, 128, generator=gen, dtype=torch.float64),
    )
    torch.testing.assert_close(
        block_hadamard(x, 32) @ block_hadamard(w, 32).t(), x @ w.t(), rtol=0, atol=1e-11
    )


def test_rotation_spreads_an_outlier_feature():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[:, 3] *= 100
    ratio = lambda t: float(t.abs().max() / t.abs().mean())  # noqa: E731
    assert ratio(block_hadamard(x, 32)) < ratio(x) / 4


@pytest.mark.parametrize("bad", [3, 0, -4, 2.0, True])
def test_hadamard_rejects_non_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        hadamard(bad)


def test_block_hadamard_rejects_indivisible_dim():
    with pytest.raises(ValueError, match="48 is not a multiple of the Hadamard block size 32"):
        block_hadamard(torch.zeros(2, 48), 32)


# LSQ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qrange", ["asym", "sym"])
def test_lsq_codes_and_delta(qrange):
    qn, qp = qbounds(qrange)
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    s = torch.tensor(1.3, dtype=torch.float64)
    q, delta = lsq_codes(x, s, qn, qp)
    v = (x / s).numpy()
    assert np.array_equal(q.numpy(), np.round(np.clip(v, -qn, qp)))
    expect = np.where(v < -qn, -qn, np.where(v > qp, qp, np.round(v) - v))
    np.testing.assert_allclose(delta.numpy(), expect, rtol=0, atol=1e-15)
    assert q.min() == -qn and q.max() == qp


@pytest.mark.parametrize("qrange", ["asym", "sym"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lsq_gradients_match_autograd_surrogate_and_finite_differences(qrange, seed):
    qn, qp = qbounds(qrange)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64) * 3
    c = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    s0 = torch.tensor(0.7, dtype=torch.float64)
    gs = 1 / math.sqrt(x.numel() * qp)

    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    (LSQ.apply(xa, sa, qn, qp) * c).sum().backward()

    # Independent reference: LSQ's gradient is the derivative of the surrogate s·(clamp(x/s) + r), with the
    # rounding residual r held constant, and the step gradient scaled by g_s.
    r = (torch.round(torch.clamp(x / s0, -qn, qp)) - torch.clamp(x / s0, -qn, qp)).detach()

    def surrogate(xx, ss):
        return (ss * (torch.clamp(xx / ss, -qn, qp) + r) * c).sum()

    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    surrogate(xb, sb).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(sa.grad, sb.grad * gs, rtol=1e-12, atol=1e-12)

    eps = 1e-6  # central difference in float64; the surrogate is smooth away from the clip points
    fd = (surrogate(x, s0 + eps) - surrogate(x, s0 - eps)) / (2 * eps)
    torch.testing.assert_close(sa.grad, fd * gs, rtol=1e-6, atol=1e-9)
    # Hand-derived: g_s·Σ c ⊙ δ(x/s), and the clip-masked STE for x.
    _, delta = lsq_codes(x, s0, qn, qp)
    torch.testing.assert_close(sa.grad, (c * delta).sum() * gs, rtol=1e-12, atol=1e-12)
    v = x / s0
    torch.testing.assert_close(xa.grad, torch.where((v >= -qn) & (v <= qp), c, 0.0), rtol=0, atol=0)


def test_qbounds_rejects_unknown():
    with pytest.raises(ValueError, match="unknown qrange 'int3'; accepted: 'asym', 'sym'"):
        qbounds("int3")


# Stochastic rounding and bit splitting -------------------------------------------------------------------


def test_stochastic_round_is_unbiased_and_reproducible():
    x = torch.tensor([-2.75, -0.5, 0.1, 3.0, 6.9], dtype=torch.float64)
    n = 200_000
    draws = stochastic_round(x.expand(n, -1), generator=torch.Generator().manual_seed(3))
    frac = x - torch.floor(x)
    assert set(torch.unique(draws - torch.floor(x)).tolist()) <= {0.0, 1.0}
    tol = 5 * torch.sqrt(frac * (1 - frac) / n) + 1e-12  # 5σ of the sample mean
    assert torch.all((draws.mean(0) - x).abs() <= tol)
    again = stochastic_round(x.expand(n, -1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws, again)


def _grad(seed, shape=(48, 20), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=dtype)
    g[::7] *= 30  # a few large rows, as in real gradients
    return g


@pytest.mark.parametrize("mode", ["exact", "r16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bit_split_is_an_exact_two_digit_encoding_of_sr(mode, seed):
    radix, levels, clamp = Int4Config(split_mode=mode).split
    g = _grad(seed)
    u = torch.rand(g.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    out = bit_split(g, radix=radix, levels=levels, digit_max=clamp, noise=u)
    hi, lo = (d.to(torch.int64) for d in out.digits)
    assert torch.equal(hi.double(), out.digits[0]) and torch.equal(lo.double(), out.digits[1])
    t = g.numpy() * levels / np.abs(g.numpy()).max()
    sr = np.floor(t + u.numpy()).astype(np.int64)
    assert np.array_equal((radix * hi + lo).numpy(), sr)
    dmax = 7 if mode == "exact" else 8
    assert hi.abs().max() <= dmax and lo.abs().max() <= dmax
    assert float(out.amax) == float(g.abs().max())
    torch.testing.assert_close(out.scales[0], out.amax * radix / levels, rtol=0, atol=0)
    torch.testing.assert_close(out.dequantise(), torch.from_numpy(sr) * out.amax / levels, rtol=1e-15, atol=0)


def test_bit_split_reference_clamps_digits_to_six():
    g = torch.linspace(-1, 1, 999, dtype=torch.float64)
    out = bit_split(g, digit_max=6, generator=torch.Generator().manual_seed(0))
    assert out.digits[0].abs().max() == 6 and out.digits[1].abs().max() == 6


@pytest.mark.parametrize("mode", ["exact", "r16"])
def test_bit_split_is_unbiased(mode):
    radix, levels, clamp = Int4Config(split_mode=mode).split
    g = _grad(5, shape=(6, 40))
    n = 20_000
    # Expanded copies share max|∇Y| and draw independent noise: n independent quantisations at once.
    out = bit_split(
        g.expand(n, -1, -1),
        radix=radix,
        levels=levels,
        digit_max=clamp,
        generator=torch.Generator().manual_seed(4),
    )
    mean = out.dequantise().mean(0)
    unit = float(g.abs().max()) / levels
    frac = (g / unit) - torch.floor(g / unit)
    tol = 5 * unit * torch.sqrt(frac * (1 - frac) / n) + 1e-12  # 5σ of the mean of n SR draws
    assert torch.all((mean - g).abs() <= tol), float(((mean - g).abs() / tol).max())


def test_reference_bit_split_is_biased_beyond_ninety():
    g = torch.tensor([95.0, -98.0, 3.0], dtype=torch.float64)  # t = 95, −98: clipped at ±90 by the ±6 clamp
    out = bit_split(g.expand(1000, -1), digit_max=6, generator=torch.Generator().manual_seed(0))
    mean = out.dequantise().mean(0)
    assert float(mean[0]) == 90.0 and float(mean[1]) == -90.0


def test_single_digit_is_unbiased_and_in_range():
    g = _grad(6, shape=(5, 30))
    n = 20_000
    out = single_digit(g.expand(n, -1, -1), levels=7, generator=torch.Generator().manual_seed(5))
    assert out.digits[0].abs().max() <= 7
    unit = float(g.abs().max()) / 7
    frac = (g / unit) - torch.floor(g / unit)
    tol = 5 * unit * torch.sqrt(frac * (1 - frac) / n) + 1e-12
    assert torch.all((out.dequantise().mean(0) - g).abs() <= tol)


@pytest.mark.parametrize("split", [bit_split, single_digit])
def test_gradient_quantisers_on_zero_and_non_finite(split):
    zero = split(torch.zeros(4, 8, dtype=torch.float64))
    assert all(torch.equal(d, torch.zeros(4, 8, dtype=torch.float64)) for d in zero.digits)
    assert torch.equal(zero.dequantise(), torch.zeros(4, 8, dtype=torch.float64))
    for bad in (math.nan, math.inf, -math.inf):
        g = torch.ones(4, 8, dtype=torch.float64)
        g[1, 2] = bad
        assert torch.isnan(split(g).dequantise()).all()


# Leverage-score sampling ---------------------------------------------------------------------------------


def _water_fill_reference(c: np.ndarray, budget: float) -> np.ndarray:
    """The textbook iteration (REFERENCE §5.2): p ∝ c, clamp p > 1 to 1, rescale the rest, repeat."""
    p = np.zeros_like(c)
    clamped = np.zeros(c.shape, bool)
    for _ in range(c.size + 1):
        free = ~clamped & (c > 0)
        p[free] = c[free] * (budget - clamped.sum()) / c[free].sum()
        over = free & (p > 1)
        if not over.any():
            break
        clamped |= over
        p[clamped] = 1.0
    return p


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_water_fill_matches_iterative_reference(seed, ratio, dtype):
    rng = np.random.default_rng(seed)
    c = rng.lognormal(0, 2.0, size=200)  # heavy tail: several rows clamp at p = 1
    c[rng.random(200) < 0.2] = 0.0
    budget = ratio * c.size
    p = water_fill(torch.from_numpy(c).to(dtype), budget).double().numpy()
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert p.max() <= 1 + tol and p.min() >= 0
    assert abs(p.sum() - min(budget, (c > 0).sum())) <= tol * c.size
    assert np.all(p[c == 0] == 0)
    np.testing.assert_allclose(
        p, _water_fill_reference(c, min(budget, (c > 0).sum())), rtol=10 * tol, atol=tol
    )


def test_water_fill_with_budget_above_nonzero_count_keeps_every_nonzero_row():
    c = torch.tensor([0.0, 3.0, 0.0, 1e-6, 2.0])
    assert torch.equal(water_fill(c, 4.0), torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(row_weights(c, "keep_nonzero", 1.0), torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_water_fill_rejects_bad_budget(bad):
    with pytest.raises(ValueError, match="budget must be positive"):
        water_fill(torch.ones(4), bad)


def test_row_weights_rejects_unknown_mode():
    with pytest.raises(
        ValueError, match="unknown sampling mode 'topk'; accepted: 'keep_nonzero', 'bernoulli'"
    ):
        row_weights(torch.ones(4), "topk", 0.5)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_lss_estimator_is_unbiased(ratio):
    gen = torch.Generator().manual_seed(7)
    n, c_dim, d_dim, draws = 64, 6, 5, 4000
    a = (
        torch.randn(n, c_dim, generator=gen, dtype=torch.float64)
        * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** 3
    )
    a[::9] = 0.0
    b = torch.randn(n, d_dim, generator=gen, dtype=torch.float64)
    full = a.t() @ b
    p = water_fill(a.norm(dim=1) * b.norm(dim=1), ratio * n)
    assert abs(float(p.sum()) - ratio * n) < 1e-9 and float(p.max()) <= 1.0
    w = bernoulli_weights(p.expand(draws, -1), generator=gen)  # independent masks per draw
    est = torch.einsum("ri,ic,id->rcd", w, a, b)
    mean, std = est.mean(0), est.std(0)
    z = (mean - full).abs() / (std / math.sqrt(draws)).clamp_min(1e-300)
    exact = std == 0  # entries fed only by rows with p = 1 (or zero rows) are exact in every draw
    assert float(z[~exact].max()) < 5.0
    torch.testing.assert_close(mean[exact], full[exact], rtol=1e-12, atol=1e-12)
    kept = (w > 0).double().sum(1)
    assert abs(float(kept.mean()) - ratio * n) < 5 * math.sqrt(float((p * (1 - p)).sum()) / draws)


# Integer GEMM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(17, 64, 9), (32, 768, 48), (5, 4096, 3)])
def test_reference_gemm_equals_int64(m, k, n):
    gen = torch.Generator().manual_seed(m + k)
    a = torch.randint(-8, 8, (m, k), generator=gen)
    b = torch.randint(-8, 9, (k, n), generator=gen)
    out = reference_gemm(a.double(), b.float())
    assert out.dtype == torch.float64
    assert torch.equal(out.to(torch.int64), a @ b) and torch.equal(out, (a @ b).double())


@pytest.mark.parametrize("value,k", [(7, 16384), (-8, 65536), (-8, 1 << 20)])
def test_reference_gemm_worst_case_large_k(value, k):
    a = torch.full((4, k), value, dtype=torch.int64)
    b = torch.full((k, 3), value, dtype=torch.int64)
    b[:, 1] = -value
    out = int_gemm(a.double(), b.double(), "reference")
    assert torch.equal(out.to(torch.int64), a @ b)
    assert float(out[0, 0]) == value * value * k  # e.g. 802 816 for 7·7 at K = 16384, 2^26 for −8·−8 at 2^20


def test_int_gemm_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown INT4 GEMM backend 'int8'; accepted: 'reference', 'fp8'"):
        int_gemm(torch.zeros(2, 2), torch.zeros(2, 2), "int8")
    with pytest.raises(ValueError, match="need a \\[M, K\\] and b \\[K, N\\]"):
        reference_gemm(torch.zeros(2, 3), torch.zeros(2, 3))


def test_reference_gemm_propagates_nan():
    a = torch.ones(3, 4, dtype=torch.float64)
    a[1, 2] = math.nan
    out = reference_gemm(a, torch.ones(4, 2, dtype=torch.float64))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# Config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 24}, "block_size must be a power of two in 1..1024, got 24"),
        ({"block_size": 2048}, "block_size must be a power of two"),
        ({"qrange": "int8"}, "unknown qrange 'int8'; accepted: 'asym', 'sym'"),
        ({"split_mode": "r12"}, "unknown split_mode 'r12'; accepted: 'exact', 'reference', 'r16'"),
        ({"sampling": "topk"}, "unknown sampling 'topk'; accepted: 'keep_nonzero', 'bernoulli'"),
        ({"gemm": "cutlass"}, "unknown gemm 'cutlass'; accepted: 'reference', 'fp8'"),
        ({"sampling": "bernoulli", "sample_ratio": 0.0}, "sample_ratio must be in \\(0, 1\\], got 0.0"),
        ({"sample_ratio": 0.5}, "sample_ratio=0.5 needs sampling='bernoulli'"),
        ({"grad_levels": 9}, "grad_levels must be an integer in 1..8"),
        ({"lsq_cold_start_steps": -1}, "lsq_cold_start_steps must be an int >= 0"),
        ({"hadamard": "yes"}, "hadamard must be True or False"),
        ({"seed": 1.5}, "seed must be an int or None"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Int4Config(**kwargs)


def test_presets():
    hq = Int4Config.hq_lss()
    assert (hq.block_size, hq.hadamard, hq.qbounds, hq.bit_split, hq.split) == (
        32,
        True,
        (8, 7),
        True,
        (14, 98, None),
    )
    assert hq.sampling == "keep_nonzero" and hq.sample_ratio == 1.0 and hq.gemm == "reference"
    naive = Int4Config.naive()
    assert not naive.hadamard and not naive.bit_split and naive.grad_levels == 7
    assert Int4Config.hq_lss(sampling="bernoulli", sample_ratio=0.5).sample_ratio == 0.5
    with pytest.raises(AttributeError):
        hq.block_size = 64  # type: ignore[misc]
