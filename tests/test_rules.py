"""Scale rules (REFERENCE §2): derived constants against the table, closed forms and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

from unitscale import rules

TABLE = {  # REFERENCE §2: alpha, beta at mult = 1
    "relu": (1.713, 1.414),
    "gelu": (1.701, 1.481),
    "gelu_tanh": (1.701, 1.481),  # "tanh form has the same α"
    "silu": (1.787, 1.623),
    "tanh": (1.593, 1.467),
    "sigmoid": (4.801, 4.723),
}
GMEAN = {"relu": 1.556, "gelu": 1.587, "silu": 1.703, "tanh": 1.529, "sigmoid": 4.762}


@pytest.mark.parametrize("name", list(TABLE))
def test_activation_constants_match_reference_table(name):
    alpha, beta = rules.activation_constants(name)
    assert round(alpha, 3) == TABLE[name][0]
    assert round(beta, 3) == TABLE[name][1]
    assert math.isfinite(alpha) and math.isfinite(beta)


@pytest.mark.parametrize("name", list(GMEAN))
def test_activation_gmean_matches_reference_table(name):
    alpha, betas = rules.activation_rule(name).resolve("gmean")
    assert round(alpha, 3) == GMEAN[name]
    assert betas["input"] == alpha


def test_relu_closed_form():
    alpha, beta = rules.activation_constants("relu")
    assert alpha == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-12)
    assert beta == pytest.approx(math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_relu_is_mult_invariant(mult):
    assert rules.activation_constants("relu", mult) == pytest.approx(
        rules.activation_constants("relu"), rel=1e-12
    )


@pytest.mark.parametrize(
    "name, limit",  # small mult: f(m x)/m → f'(0)·x + f(0)/m, so alpha = beta = 1/f'(0)
    [("tanh", 1.0), ("sigmoid", 4.0), ("gelu", 2.0), ("silu", 2.0)],
)
def test_activation_small_mult_limit(name, limit):
    alpha, beta = rules.activation_constants(name, 1e-4)
    assert alpha == pytest.approx(limit, rel=1e-6)
    assert beta == pytest.approx(limit, rel=1e-6)


@pytest.mark.parametrize("name, mult", [("gelu", 0.55), ("silu", 2.0), ("tanh", 1.0), ("sigmoid", 3.0)])
def test_activation_constants_against_monte_carlo(name, mult):
    # Independent estimate: 4M float64 samples through torch's op and autograd; sampling error ≈ 0.1%.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4_000_000, dtype=torch.float64, generator=gen) * mult).requires_grad_()
    f = {
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }[name]
    y = f(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    alpha, beta = rules.activation_constants(name, mult)
    assert alpha == pytest.approx(1 / (y / mult).std().item(), rel=5e-3)
    assert beta == pytest.approx(1 / dy.pow(2).mean().sqrt().item(), rel=5e-3)


def test_unknown_activation():
    with pytest.raises(ValueError, match="'swish'.*relu"):
        rules.activation_rule("swish")
    with pytest.raises(ValueError, match="mult"):
        rules.activation_rule("gelu", 0.0)


def test_softmax_rule_refined_values():
    s = 512
    r = rules.softmax_rule(s)
    assert s / r.alpha == pytest.approx(math.sqrt(math.e - 1), rel=1e-12)
    assert round(s / r.alpha, 2) == 1.31 and round(s / r.betas["input"], 2) == 1.65
    alpha, _ = r.resolve("gmean")
    assert round(s / alpha, 2) == 1.47


@pytest.mark.parametrize("mult", [0.5, 1.0, 1.5])
def test_softmax_rule_against_monte_carlo(mult):
    # Float64 sample of softmax(mult·x) at large s; the rule is the s → ∞ limit (finite-s error ≈ 1/√s).
    s, rows = 8192, 256
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, s, dtype=torch.float64, generator=gen).requires_grad_()
    y = torch.softmax(mult * x, -1)
    g = torch.randn(rows, s, dtype=torch.float64, generator=gen)
    (dx,) = torch.autograd.grad(y, x, g)
    r = rules.softmax_rule(s, mult)
    assert r.alpha * y.std().item() == pytest.approx(1.0, rel=0.05)
    assert r.betas["input"] * dx.std().item() == pytest.approx(1.0, rel=0.05)


def test_linear_rule_and_exponent():
    r = rules.linear_rule(1024, 4096, 65536)
    assert r.alpha == 1024**-0.5 and r.betas["input"] == 4096**-0.5
    assert r.betas["weight"] == r.betas["bias"] == 1 / 256
    assert r.constrained == ("input",)
    alpha, betas = r.resolve("gmean")
    assert alpha == betas["input"] == pytest.approx(1 / 45.254833995939, rel=1e-12)
    assert betas["weight"] == 1 / 256  # cut edge: untouched
    r34 = rules.linear_rule(1024, 4096, 65536, weight_grad_exponent=0.75)
    assert r34.betas["weight"] == pytest.approx(65536**-0.75, rel=1e-12)
    assert rules.linear_rule(8, 8, 100, weight_grad_exponent=1.0).betas["weight"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="weight_grad_exponent"):
        rules.linear_rule(8, 8, 100, weight_grad_exponent=2)


def test_readout_is_unconstrained():
    r = rules.readout_rule(768, 30400, 8192)
    assert r.constrained == ()
    assert r.resolve("gmean") == (768**-0.5, dict(r.betas))


def test_matmul_rule():
    b, m, n = 4096, 64, 256
    r = rules.matmul_rule(b, m, n)
    assert (r.alpha, r.betas["left"], r.betas["right"]) == (m**-0.5, n**-0.5, b**-0.5)
    assert r.resolve()[0] == pytest.approx((b * m * n) ** (-1 / 6), rel=1e-12)
    assert r.resolve("to_output") == (m**-0.5, {"left": m**-0.5, "right": m**-0.5})


def test_small_rules():
    ce = rules.cross_entropy_rule(5)
    assert ce.alpha == 1 and ce.betas["input"] == pytest.approx(2.5, rel=1e-12) and ce.constrained == ()
    assert rules.embedding_rule(30400, 8192).betas["weight"] == pytest.approx(math.sqrt(30400 / 8192))
    assert rules.layer_norm_rule(4096).betas == {"input": 1.0, "weight": 1 / 64, "bias": 1 / 64}
    assert rules.rms_norm_rule(4096).betas == {"input": 1.0, "weight": 1 / 64}
    assert rules.sum_rule(1024).resolve()[0] == pytest.approx(1024**-0.25, rel=1e-12)
    add = rules.add_rule()
    assert add.alpha == 2**-0.5 and add.resolve()[0] == pytest.approx(2 ** (-1 / 6), rel=1e-12)
    assert rules.add_rule(1, 64).betas["right"] == 1 / 8
    d = rules.dropout_rule(0.19)
    assert d.alpha == d.betas["input"] == pytest.approx(0.9, rel=1e-12)
    a = rules.attention_rule(256, 0.1)
    assert a.alpha == pytest.approx(math.sqrt(256 / math.e * 0.9), rel=1e-12)
    assert set(a.betas.values()) == {a.alpha}
    res = rules.residual_rule(0.01)
    assert res.betas == {"skip": pytest.approx(math.sqrt(0.99)), "branch": pytest.approx(0.1)}


def test_tau_from_ratio_direction():
    assert rules.tau_from_ratio(1.0) == 0.5
    assert rules.tau_from_ratio(0.1) == pytest.approx(0.01 / 1.01, rel=1e-12)
    # A larger ratio favours the branch (u-μP's code; its docstring says the opposite).
    assert rules.tau_from_ratio(2.0) > 0.5 > rules.tau_from_ratio(0.5)
    tau = rules.tau_from_ratio(0.3)
    assert math.sqrt(tau) == pytest.approx(0.3 / math.sqrt(1 + 0.09), rel=1e-12)
    assert math.sqrt(1 - tau) == pytest.approx(1 / math.sqrt(1 + 0.09), rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rules.linear_rule(0, 4, 4), "fan_in must be a positive integer, got 0"),
        (lambda: rules.matmul_rule(4, 2.5, 4), "m must be a positive integer, got 2.5"),
        (lambda: rules.softmax_rule(-3), "s must be a positive integer, got -3"),
        (lambda: rules.cross_entropy_rule(1), "num_classes=1"),
        (lambda: rules.dropout_rule(1.0), "p=1.0"),
        (lambda: rules.attention_rule(8, -0.1), "dropout_p=-0.1"),
        (lambda: rules.weighted_add_rule(0.5, 0.5), "left_weight² \\+ right_weight² = 1"),
        (lambda: rules.check_tau(1.0), r"\(0, 1\), got tau=1.0"),
        (lambda: rules.check_tau(0.0, allow_one=True), r"\(0, 1\], got tau=0.0"),
        (lambda: rules.residual_rule(1.5), "tau=1.5"),
    ],
)
def test_rule_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
