"""SNR of the formats against REFERENCE §3.2 (exact RNE casts with clamping, 2^20 samples) and against the
uniform-noise model 12σ²/step², both independent of the code under test."""

from __future__ import annotations

import math

import pytest

from unitscale.formats import snr, snr_db


def db(v: float) -> float:
    return 10 * math.log10(v)


# REFERENCE §3.2 at σ = 1; the stated tolerance is 1 dB
AT_SIGMA_1 = [
    ("fp16", {}, 73.7),
    ("bf16", {}, 55.6),
    ("fp8_e4b", {}, 31.5),
    ("fp8_e4a", {}, 31.5),
    ("fp8_e5b", {}, 25.6),
    ("fp8_e5a", {}, 25.6),
    ("int8", {"step": 2**-4}, 34.9),
    ("int8", {"scaling": "absmax"}, 39.1),
]


@pytest.mark.parametrize("name,kw,want_db", AT_SIGMA_1)
def test_reference_snr_at_unit_sigma(name, kw, want_db):
    assert abs(snr_db(name, 1.0, **kw) - want_db) <= 1.0


# REFERENCE §3.2: σ range (log2) within 10× of the peak SNR
PLATEAUS = [
    ("fp16", {}, -15, 13),
    ("bf16", {}, -30, 30),
    ("fp8_e4b", {}, -7, 7),
    ("fp8_e4a", {}, -8, 6),
    ("fp8_e5b", {}, -15, 15),
    ("fp8_e5a", {}, -16, 15),
    ("int8", {"step": 2**-4}, 0, 1),
]


@pytest.mark.parametrize("name,kw,lo,hi", PLATEAUS)
def test_plateau_within_10x_of_peak(name, kw, lo, hi):
    n = 2**16
    curve = {s: snr(name, 2.0**s, n=n, **kw) for s in range(lo - 2, hi + 3)}
    peak = max(curve.values())
    assert min(curve[s] for s in range(lo, hi + 1)) >= peak / 10
    if name != "bf16":  # bf16 is flat well beyond the stated range
        assert curve[lo - 2] < peak / 10 and curve[hi + 2] < peak / 10


def test_e4m3fn_outside_its_plateau():
    assert abs(snr_db("fp8_e4b", 2.0**-8) - db(48)) <= 1.0
    assert abs(snr_db("fp8_e4b", 2.0**-12) - db(1)) <= 1.0  # almost everything flushes to zero


def test_int8_fixed_step():
    # uniform rounding noise step²/12 while nothing clips: SNR = 12 σ² / step²
    assert snr("int8", 1.0, step=2**-4) == pytest.approx(12 * 2**8, rel=0.02)
    assert snr("int8", 0.25, step=2**-4) == pytest.approx(12 * 2**4, rel=0.02)
    assert abs(snr_db("int8", 2.0, step=2**-4) - db(1.1e4)) <= 1.0  # REFERENCE: peak 1.1e4 at σ = 2


def test_absmax_is_scale_free():
    base = snr("int8", 1.0, scaling="absmax")
    for s in (2.0**-10, 2.0**10):  # power-of-two σ scales the data exactly
        assert snr("int8", s, scaling="absmax") == pytest.approx(base, rel=1e-12)
    assert snr("fp8_e4b", 2.0**-20, scaling="absmax") == pytest.approx(snr("fp8_e4b", 1.0, scaling="absmax"))


def test_fp32_snr_is_huge_but_finite():
    v = snr("fp32", 1.0, n=2**16)
    assert 1e14 < v < math.inf


def test_outliers_int8_falls_as_one_over_k_squared():
    s10 = snr("int8", 1.0, scaling="absmax", outliers=10.0)
    s100 = snr("int8", 1.0, scaling="absmax", outliers=100.0)
    assert 80 < s10 / s100 < 120
    # REFERENCE §3.2: 467 (K = 10) and 4.7 (K = 100); the outliers' own maximum varies with the seed
    # (max of 16 |N(0,1)|), so allow 2 dB here
    assert abs(db(s10) - db(467)) <= 2.0 and abs(db(s100) - db(4.7)) <= 2.0
    assert snr("int8", 1.0, scaling="absmax", outliers=1000.0) < 2.0


@pytest.mark.parametrize("scaling", [None, "absmax"])
def test_outliers_do_not_hurt_e4m3(scaling):
    clean = snr("fp8_e4b", 1.0, scaling=scaling)
    for k in (10.0, 100.0, 1000.0):
        assert abs(db(snr("fp8_e4b", 1.0, scaling=scaling, outliers=k)) - db(clean)) <= 0.3


def test_e4m3_absmax_loses_only_for_huge_outliers():
    # bulk pushed below the normal range 2^-6 once K·max|outlier| ≳ 448·64 ≈ 3·10^4
    assert snr("fp8_e4b", 1.0, scaling="absmax", outliers=1e5) < snr("fp8_e4b", 1.0) / 10


def test_seed_and_db():
    assert snr("fp8_e5b", 1.0, seed=1, n=4096) == snr("fp8_e5b", 1.0, seed=1, n=4096)
    assert snr("fp8_e5b", 1.0, seed=1, n=4096) != snr("fp8_e5b", 1.0, seed=2, n=4096)
    assert snr_db("fp16", 0.5, n=4096) == pytest.approx(10 * math.log10(snr("fp16", 0.5, n=4096)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fmt="int8"), "exactly one of step"),
        (dict(fmt="int8", step=0.1, scaling="absmax"), "exactly one of step"),
        (dict(fmt="fp16", step=0.1), "step applies to integer formats"),
        (dict(fmt="fp16", scaling="rms"), "unknown scaling 'rms'"),
        (dict(fmt="fp16", sigma=0.0), "sigma must be"),
        (dict(fmt="fp16", sigma=math.nan), "sigma must be"),
        (dict(fmt="fp16", outliers=-1.0), "outliers must be"),
        (dict(fmt="fp16", outliers=2.0, n=16), "n_outliers < n"),
        (dict(fmt="fp9"), "unknown number format 'fp9'"),
    ],
)
def test_snr_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        snr(**kwargs)
