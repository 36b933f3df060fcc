"""unitscale.formats against independent references: REFERENCE §3.1, torch's float8/16 dtypes, ml_dtypes,
numpy bit manipulation and brute-force nearest-grid-point search. Never against the module's own output."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import unitscale.formats as formats
from unitscale.formats import (
    FORMATS,
    Format,
    absmax_scale,
    dequantise,
    format_names,
    get_format,
    quantise,
    quantise_int,
    range_counts,
    range_fractions,
)

FP8 = {
    "fp8_e4b": (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    "fp8_e5b": (torch.float8_e5m2, ml_dtypes.float8_e5m2),
    "fp8_e4a": (torch.float8_e4m3fnuz, ml_dtypes.float8_e4m3fnuz),
    "fp8_e5a": (torch.float8_e5m2fnuz, ml_dtypes.float8_e5m2fnuz),
}
FLOATS = [n for n, f in FORMATS.items() if f.is_float]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INF, NAN = math.inf, math.nan


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN, and the same sign of zero."""
    a, b = a.double(), b.double()
    nan = torch.isnan(a)
    return bool(
        torch.equal(nan, torch.isnan(b))
        and torch.equal(a[~nan], b[~nan])
        and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))
    )


def ml_cast(x: torch.Tensor, mldt) -> torch.Tensor:
    """RNE through ml_dtypes (non-saturating), back to float64."""
    with np.errstate(over="ignore"):  # overflow to inf is what is being compared
        return torch.from_numpy(x.numpy().astype(mldt).astype(np.float64))


def torch_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float64)


def all_codes(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float64 values) of all 256 bit patterns, decoded by ml_dtypes."""
    codes = np.arange(256, dtype=np.uint8)
    return codes, codes.view(FP8[name][1]).astype(np.float64)


def grid(name: str, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite values of an fp8 format (non-negative unless ``signed``; one zero) and their codes."""
    codes, vals = all_codes(name)
    keep = np.isfinite(vals) & ~((vals == 0) & (codes != 0)) & ((vals >= 0) | signed)
    order = np.argsort(vals[keep], kind="stable")
    return vals[keep][order], codes[keep][order]


def brute_rne(x: np.ndarray, name: str) -> np.ndarray:
    """Nearest grid value by search (ties to the even code); |x| ≤ max only. Sign of zero as the format."""
    vals, codes = grid(name)
    a = np.abs(x)
    i = np.clip(np.searchsorted(vals, a, side="right") - 1, 0, len(vals) - 2)
    lo, hi = vals[i], vals[i + 1]
    dlo, dhi = a - lo, hi - a  # exact: Sterbenz on neighbouring grid points
    up = (dhi < dlo) | ((dhi == dlo) & (codes[i + 1] % 2 == 0))
    r = np.where(a == lo, lo, np.where(up, hi, lo))
    return np.copysign(r, x) if get_format(name).negative_zero else np.where(x < 0, -r, r) + 0.0


def np_round_bits(x: np.ndarray, drop: int) -> np.ndarray:
    """RNE by integer arithmetic on IEEE bits: clear the low ``drop`` mantissa bits (float32 or float64)."""
    u = np.uint32 if x.dtype == np.float32 else np.uint64
    b = x.view(u)
    one = u(1)
    lsb = (b >> u(drop)) & one
    r = (b + (one << u(drop - 1)) - one + lsb) & ~((one << u(drop)) - one)
    return np.where(np.isnan(x), x, r.view(x.dtype))


# ---------------------------------------------------------------------------------------------------------
# REFERENCE §3.1 table and constants
# ---------------------------------------------------------------------------------------------------------

# name: E, M, max_exp, min_exp, bias, max finite, log2 min normal, log2 min subnormal, inf, NaN codes, -0
TABLE = {
    "fp32": (8, 23, 127, -126, 127, 3.4028e38, -126, -149, True, None, True),
    "tf32": (8, 10, 127, -126, 127, 3.4012e38, -126, -136, True, None, True),
    "bf16": (8, 7, 127, -126, 127, 3.3895e38, -126, -133, True, None, True),
    "fp16": (5, 10, 15, -14, 15, 65504, -14, -24, True, None, True),
    "fp8_e5a": (5, 2, 15, -15, 16, 57344, -15, -17, False, 1, False),
    "fp8_e5b": (5, 2, 15, -14, 15, 57344, -14, -16, True, 6, True),
    "fp8_e4a": (4, 3, 7, -7, 8, 240, -7, -10, False, 1, False),
    "fp8_e4b": (4, 3, 8, -6, 7, 448, -6, -9, False, 2, True),
}
TORCH_DTYPES = {
    "fp32": torch.float32,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    **{k: v[0] for k, v in FP8.items()},
    "int8": torch.int8,
    "int4": None,
}


@pytest.mark.parametrize("name", list(TABLE))
def test_reference_table(name):
    e, m, max_exp, min_exp, bias, vmax, log_mn, log_ms, inf, nan_codes, negzero = TABLE[name]
    f = get_format(name)
    assert (f.exponent_bits, f.mantissa_bits, f.max_exp, f.min_exp, f.bias) == (e, m, max_exp, min_exp, bias)
    assert f.max == pytest.approx(vmax, rel=5e-5)
    assert f.min_normal == 2.0**log_mn and f.min_subnormal == 2.0**log_ms
    assert f.has_inf is inf and f.negative_zero is negzero
    if nan_codes is not None:
        assert f.nan_codes == nan_codes
    assert f.epsilon == 2.0**-m and f.bits == 1 + e + m and f.is_float


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_torch_dtype(name):
    assert get_format(name).torch_dtype == TORCH_DTYPES[name]


@pytest.mark.parametrize("name", list(FP8))
def test_constants_vs_ml_dtypes_and_grid(name):
    f, fi = get_format(name), ml_dtypes.finfo(FP8[name][1])
    assert (f.max, f.min_normal, f.min_subnormal) == (float(fi.max), float(fi.smallest_normal),
                                                      float(fi.smallest_subnormal))  # fmt: skip
    vals, _ = grid(name)
    # epsilon is the spacing above 1 of the real grid (torch.finfo(float8_e5m2fnuz).eps is wrong in 2.13)
    assert vals[np.searchsorted(vals, 1.0) + 1] - 1.0 == f.epsilon
    assert vals[-1] == f.max and vals[vals > 0][0] == f.min_subnormal
    _, all_vals = all_codes(name)
    assert np.isnan(all_vals).sum() == f.nan_codes and np.isinf(all_vals).any() == f.has_inf


@pytest.mark.parametrize(
    "name,dtype", [("fp32", np.float32), ("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)]
)
def test_wide_constants_vs_finfo(name, dtype):
    f, fi = get_format(name), ml_dtypes.finfo(dtype)
    assert (f.max, f.min_normal, f.min_subnormal, f.epsilon) == tuple(
        float(v) for v in (fi.max, fi.smallest_normal, fi.smallest_subnormal, fi.eps)
    )


def test_integer_formats():
    assert (FORMATS["int8"].qmin, FORMATS["int8"].qmax, FORMATS["int8"].bits) == (-128, 127, 8)
    assert (FORMATS["int4"].qmin, FORMATS["int4"].qmax, FORMATS["int4"].bits) == (-8, 7, 4)
    assert not FORMATS["int4"].is_float and FORMATS["int4"].max == 7.0
    assert (Format.integer("u4", 4, signed=False).qmin, Format.integer("u4", 4, signed=False).qmax) == (0, 15)
    with pytest.raises(ValueError, match="integer formats only"):
        _ = FORMATS["fp16"].qmax


def test_registry_and_get_format():
    assert format_names() == ["fp32", "tf32", "bf16", "fp16", "fp8_e5a", "fp8_e5b", "fp8_e4a", "fp8_e4b",
                              "int8", "int4"]  # fmt: skip
    assert set(FORMATS) == set(format_names())
    assert get_format("E4M3") is FORMATS["fp8_e4b"] and get_format("e5m2") is FORMATS["fp8_e5b"]
    assert get_format(" FP16 ") is FORMATS["fp16"]
    assert get_format(FORMATS["int4"]) is FORMATS["int4"]
    custom = Format("e3m2", 3, 2, 3)
    assert get_format(custom) is custom and custom.max == 14.0  # (2 - 1/4)·2^(6 - 3): top binade reserved


@pytest.mark.parametrize("bad", ["fp8", "e4m3fnuz", "", "int2", 3, None])
def test_get_format_errors(bad):
    with pytest.raises(ValueError, match=r"unknown number format.*accepted: fp32, tf32.*e4m3, e5m2"):
        get_format(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nan="weird"),
        dict(nan="negative_zero", has_inf=False, negative_zero=True),
        dict(nan="all_ones", has_inf=True),
        dict(nan="none", has_inf=False),
    ],
)
def test_format_validation(kwargs):
    with pytest.raises(ValueError, match="Format 'bad'"):
        Format("bad", 4, 3, 7, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Round to nearest even: FP8 against torch and ml_dtypes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FP8))
def test_all_256_codes_round_trip(name, dtype, saturate):
    tdt, _ = FP8[name]
    from_torch = torch.arange(256, dtype=torch.uint8).view(tdt).to(torch.float64)
    from_ml = torch.from_numpy(all_codes(name)[1])
    assert same(from_torch, from_ml)  # the two libraries decode identically
    x = from_torch.to(dtype)  # every fp8 value is exact in fp16/bf16/fp32/fp64
    # every code maps to itself, saturating or not: e5m2's ±inf stay ±inf (saturation is for finite values)
    assert same(quantise(x, name, saturate=saturate), x)
    sr = quantise(x, name, "stochastic", saturate=saturate, generator=torch.Generator().manual_seed(0))
    assert same(sr, x)


@pytest.mark.parametrize("name", list(FP8))
def test_midpoints_ties_to_even(name):
    vals, codes = grid(name)
    lo, hi = vals[:-1], vals[1:]
    mid = torch.from_numpy((lo + hi) / 2).float()  # exact in fp32
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, INF))
    x = torch.cat([mid, below, above, -mid, -below, -above])
    q = quantise(x, name).double()
    assert same(q, torch_cast(x, FP8[name][0]))
    assert same(q, ml_cast(x, FP8[name][1]))
    assert same(q, torch.from_numpy(brute_rne(x.double().numpy(), name)))
    # ties go down to an even lower code and up to an even upper code, both directions happen
    qm = q[: len(mid)].numpy()
    went_up = qm == hi
    assert np.all(np.where(went_up, codes[1:] % 2 == 0, codes[:-1] % 2 == 0))
    assert went_up.any() and (~went_up).any()
    assert torch.equal(q[len(mid) : 2 * len(mid)], torch.from_numpy(lo))  # just below: down
    assert torch.equal(q[2 * len(mid) : 3 * len(mid)], torch.from_numpy(hi))  # just above: up


@pytest.mark.parametrize("name", list(FP8))
def test_subnormal_and_normal_boundary(name):
    f = get_format(name)
    ms, mn = f.min_subnormal, f.min_normal
    x = torch.tensor([ms / 2, ms * 0.5000001, ms * 0.4999999, ms, 1.5 * ms, mn - ms / 2, mn - ms / 4, mn,
                      mn + f.epsilon * mn / 2, mn - ms * 0.75])  # fmt: skip
    expected = [0.0, ms, 0.0, ms, 2 * ms, mn, mn, mn, mn, mn - ms]
    for sign in (1.0, -1.0):
        q = quantise(sign * x, name)
        assert torch.equal(q, sign * torch.tensor(expected)), q
        assert same(q, ml_cast(sign * x, FP8[name][1]).float())
    # underflow keeps the sign where the format has -0 (OCP) and gives +0 in the fnuz formats
    assert torch.signbit(quantise(torch.tensor([-ms / 2]), name)).item() is f.negative_zero


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("name", FLOATS)
def test_specials(name, saturate):
    f = get_format(name)
    # the largest fp32 value lies beyond every format's rounding boundary but fp32's own
    x = torch.tensor([0.0, -0.0, INF, -INF, NAN, torch.finfo(torch.float32).max])
    # saturation clamps finite values only: ±inf become ±inf (NaN without inf) either way, NaN stays NaN
    big = f.max if saturate or name == "fp32" else f.overflow_value
    neg0 = -0.0 if f.negative_zero else 0.0
    want = torch.tensor([0.0, neg0, f.overflow_value, -f.overflow_value, NAN, big])
    for dtype in (torch.float32, torch.float64):
        assert same(quantise(x.to(dtype), name, saturate=saturate).double(), want.double()), dtype
        sr = quantise(x.to(dtype), name, "stochastic", saturate=saturate)
        assert same(sr.double(), want.double()), dtype


@pytest.mark.parametrize("name", list(FP8))
def test_overflow_fp8(name):
    f = get_format(name)
    half_ulp = 2.0 ** (f.max_exp - f.mantissa_bits - 1)
    thr = f.max + half_ulp
    mags = torch.tensor([f.max, f.max + half_ulp / 2, thr, thr + 1 / 64, 2 * f.max, 1e6, 1e30, 3e38])
    x = torch.cat([mags, -mags])
    # saturate=False is the non-saturating RNE cast of ml_dtypes
    assert same(quantise(x, name, saturate=False).double(), ml_cast(x, FP8[name][1]))
    assert same(quantise(x.double(), name, saturate=False), ml_cast(x, FP8[name][1]))
    # saturate=True clamps everything beyond max to ±max; torch 2.13 only does this itself for e4m3fn
    assert torch.equal(quantise(x, name), torch.cat([torch.full((8,), f.max), torch.full((8,), -f.max)]))
    # the tie at max + ulp/2 rounds to the even code: down to 448 for e4m3fn, up (overflow) elsewhere
    tie = quantise(torch.tensor([thr]), name, saturate=False).item()
    if name == "fp8_e4b":
        assert tie == 448.0
    else:
        assert (tie == INF) if f.has_inf else math.isnan(tie)


@pytest.mark.parametrize("name,ref", [("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)])
def test_overflow_16bit(name, ref):
    f = get_format(name)
    mags = torch.tensor([f.max, f.max * (1 + 2.0**-12), f.max * 1.01, 1e6 if name == "fp16" else 3.4e38])
    x = torch.cat([mags, -mags])
    q = quantise(x, name, saturate=False).double()
    assert same(q, torch_cast(x, f.torch_dtype)) and same(q, ml_cast(x, ref))
    assert torch.isinf(q[[2, 3, 6, 7]]).all()
    # saturation clamps the finite values; an input that is already ±inf (bf16's 1.01·max in fp32) stays ±inf
    want = torch.where(torch.isinf(x), x, torch.tensor([f.max] * 4 + [-f.max] * 4))
    assert torch.equal(quantise(x, name), want)


def log_uniform(n: int, lo: float, hi: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mag).to(dtype)


@pytest.mark.parametrize("name", list(FP8))
def test_random_fp8_vs_torch_and_ml_dtypes(name):
    f = get_format(name)
    tdt, mldt = FP8[name]
    x = log_uniform(100_000, -30, 20, seed=1)
    np_clipped = torch.from_numpy(
        np.clip(x.numpy(), -float(ml_dtypes.finfo(mldt).max), float(ml_dtypes.finfo(mldt).max))
    )
    assert same(quantise(x, name).double(), ml_cast(np_clipped, mldt))
    assert same(quantise(x, name, saturate=False).double(), ml_cast(x, mldt))
    inside = x.abs() <= f.max
    assert same(quantise(x[inside], name).double(), torch_cast(x[inside], tdt))
    for dtype in (torch.float16, torch.bfloat16):  # inputs of the usual compute dtypes
        xd = x.to(dtype)
        ref = torch_cast(xd.float().clamp(-f.max, f.max), tdt)  # finite values: the clamped torch cast
        ref = torch.where(torch.isinf(xd), torch.copysign(torch.tensor(f.overflow_value), xd.double()), ref)
        assert same(quantise(xd, name).double(), ref)  # ±inf (fp16 overflow) is never made finite


@pytest.mark.parametrize(
    "name,ref,lo,hi", [("fp16", np.float16, -30, 20), ("bf16", ml_dtypes.bfloat16, -140, 127)]
)
def test_random_16bit_vs_torch_and_reference(name, ref, lo, hi):
    x = log_uniform(100_000, lo, hi, seed=2)
    q = quantise(x, name, saturate=False).double()
    assert same(q, torch_cast(x, get_format(name).torch_dtype)) and same(q, ml_cast(x, ref))
    assert q.dtype == torch.float64


def test_fp64_input_rounds_once():
    # x just above the halfway point: correct RNE goes up; torch and ml_dtypes round fp64 via fp32 (twice)
    cases = [("fp8_e4b", 1 + 2**-4, 1.125), ("fp8_e5b", 1 + 2**-3, 1.25), ("fp16", 1 + 2**-11, 1 + 2**-10),
             ("bf16", 1 + 2**-8, 1 + 2**-7), ("tf32", 1 + 2**-11, 1 + 2**-10)]  # fmt: skip
    for name, half, up in cases:
        x = torch.tensor([half + 2**-40, -(half + 2**-40), half], dtype=torch.float64)
        assert quantise(x, name).tolist() == [up, -up, 1.0], name
        assert quantise(x, name, saturate=False).tolist() == [up, -up, 1.0], name


@pytest.mark.parametrize("name", list(FP8))
def test_random_fp64_vs_brute_force(name):
    f = get_format(name)
    x = log_uniform(20_000, -20, math.log2(f.max), seed=3, dtype=torch.float64)
    assert same(quantise(x, name), torch.from_numpy(brute_rne(x.numpy(), name)))


def test_random_fp64_to_16bit_vs_reference():
    x = log_uniform(50_000, -24, 15.9, seed=4, dtype=torch.float64)
    assert same(quantise(x, "fp16"), torch.from_numpy(x.numpy().astype(np.float16).astype(np.float64)))
    xb = log_uniform(50_000, -120, 120, seed=5, dtype=torch.float64)  # bf16 normal range
    assert same(quantise(xb, "bf16"), torch.from_numpy(np_round_bits(xb.numpy(), 52 - 7)))


@pytest.mark.parametrize("saturate", [True, False])
def test_tf32_vs_numpy_bits(saturate):
    f = get_format("tf32")
    x = torch.cat(
        [log_uniform(100_000, -149, 128, seed=6), torch.tensor([f.max, 3.4028e38, -3.4028e38, 2.0**-149])]
    )
    ref = np_round_bits(np.clip(x.numpy(), -f.max, f.max) if saturate else x.numpy(), 13)
    assert same(quantise(x, "tf32", saturate=saturate), torch.from_numpy(ref))
    # inputs narrower than tf32 pass through unchanged; fp64 agrees with the fp32 path on fp32 values
    x16 = log_uniform(10_000, -24, 15, seed=7).half()
    assert same(quantise(x16, "tf32"), x16)
    assert same(quantise(x.double(), "tf32", saturate=saturate), torch.from_numpy(ref).double())


def test_tf32_in_range_vs_numpy_bits():
    # every |x| < max: eager CPU rounds by in-place integer passes, not the general path above
    f = get_format("tf32")
    x = torch.cat([log_uniform(100_000, -149, 127.9, seed=8), torch.tensor([0.0, -0.0, 2.0**-149])])
    assert bool(x.abs().max() < f.max)
    for saturate in (True, False):
        assert same(quantise(x, "tf32", saturate=saturate), torch.from_numpy(np_round_bits(x.numpy(), 13)))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16", *FP8])
def test_in_range_path_gives_the_general_paths_bits(name, rounding):
    """Eager CPU fp32 tensors with every |x| < max take torch's cast or a few in-place integer passes (the
    format's subnormals redone by index); they must give the general bit path's result, random draw and
    sign of zero included."""
    f = get_format(name)
    lo = math.log2(f.min_subnormal) - 3
    x = torch.cat([log_uniform(50_000, lo, math.log2(f.max) - 0.01, seed=12), torch.tensor([0.0, -0.0])])
    assert bool(x.abs().max() < f.max)
    fast = quantise(x, name, rounding, generator=torch.Generator().manual_seed(5))
    general = formats._round_bits(x, f, rounding, True, torch.Generator().manual_seed(5))
    assert same(fast, general)
    xt = x[:50_000].view(250, 200).t()  # a non-contiguous view takes the same path
    fast_t = quantise(xt, name, rounding, generator=torch.Generator().manual_seed(6))
    assert same(fast_t, formats._round_bits(xt, f, rounding, True, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (), (3, 5, 7)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dtypes_and_shapes(dtype, shape, rounding):
    g = torch.Generator().manual_seed(8)
    x = (4 * torch.randn(shape, generator=g)).to(dtype)
    for name in ("fp8_e4b", "fp8_e5a", "fp16", "tf32"):
        q = quantise(x, name, rounding=rounding, generator=torch.Generator().manual_seed(0))
        assert q.dtype == dtype and q.shape == x.shape
        if rounding == "nearest" and x.numel():
            f = get_format(name)
            ref = np.asarray(x.double().numpy())
            if name in FP8:
                ref = brute_rne(np.clip(ref, -f.max, f.max), name)
            elif name == "fp16":
                ref = ref.astype(np.float16).astype(np.float64)
            else:
                ref = np_round_bits(ref.astype(np.float32), 13).astype(np.float64)
            assert same(q.double(), torch.from_numpy(np.asarray(ref, np.float64)).to(dtype).double()), name


def test_non_contiguous_and_grad_free():
    x = torch.randn(64, 32).t()
    assert same(quantise(x, "fp8_e4b"), quantise(x.contiguous(), "fp8_e4b"))
    w = torch.randn(5, requires_grad=True)
    for rounding in ("nearest", "stochastic"):  # every path is outside autograd
        q = quantise(w, "fp8_e5b", rounding, saturate=False)
        assert not q.requires_grad and q.grad_fn is None
    assert same(quantise(w, "fp8_e5b"), torch_cast(w.detach(), torch.float8_e5m2).float())
    assert not quantise_int(w, "int8", 0.1).requires_grad


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantise(torch.ones(2), "int8"), "quantise_int"),
        (lambda: quantise(torch.ones(2), "int4", rounding="stochastic"), "quantise_int"),
        (lambda: quantise(torch.ones(2), "fp16", rounding="up"), "rounding 'up'.*'nearest', 'stochastic'"),
        (lambda: quantise(torch.ones(2, dtype=torch.int32), "fp16"), "floating-point tensor"),
        (lambda: quantise(torch.ones(2), "fp7"), "unknown number format 'fp7'"),
        (lambda: quantise_int(torch.ones(2), "fp8_e4b", 1.0), "integer formats"),
        (lambda: quantise_int(torch.ones(2), "int8", 0.0), "scale must be a finite positive"),
        (lambda: quantise_int(torch.ones(2), "int8", -1.0), "scale must be a finite positive"),
        (lambda: range_fractions(torch.ones(2), "int8"), "float format"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------------------------------------


def neighbours(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) grid neighbours by search for fp8; by float16 nextafter for fp16; by bits for tf32."""
    if name in FP8:
        vals, _ = grid(name, signed=True)
        i = np.clip(np.searchsorted(vals, x, side="right") - 1, 0, len(vals) - 2)
        lo = vals[i]
        return lo, np.where(lo == x, lo, vals[i + 1])
    if name == "fp16":
        r = x.astype(np.float16)
        lo = np.where(r > x, np.nextafter(r, np.float16(-np.inf)), r).astype(np.float64)
        hi = np.where(r < x, np.nextafter(r, np.float16(np.inf)), r).astype(np.float64)
        return lo, hi
    assert name == "tf32"  # truncate the low 13 bits of |x| for the smaller magnitude
    x32 = x.astype(np.float32)
    t = np.abs(x32).view(np.uint32) & np.uint32(0xFFFFE000)
    small = t.view(np.float32).astype(np.float64)
    big = np.where(small == np.abs(x), small, (t + np.uint32(0x2000)).view(np.float32).astype(np.float64))
    return (np.where(x < 0, -big, small), np.where(x < 0, -small, big))


SR_NAMES = [*FP8, "fp16", "tf32"]


@pytest.mark.parametrize("name", SR_NAMES)
def test_sr_returns_a_neighbour(name):
    f = get_format(name)
    x = log_uniform(50_000, math.log2(f.min_subnormal) - 2, math.log2(f.max) - 0.01, seed=9)
    q = quantise(x, name, "stochastic", generator=torch.Generator().manual_seed(1)).double().numpy()
    lo, hi = neighbours(x.double().numpy(), name)
    assert np.all((q == lo) | (q == hi))
    assert (q == lo).mean() > 0.2 and (q == hi).mean() > 0.2  # both neighbours actually drawn


def sr_points(name: str) -> list[float]:
    f = get_format(name)
    ms, mn, eps = f.min_subnormal, f.min_normal, f.epsilon
    return [
        1 + 0.3 * eps,  # ordinary
        -(1 + 0.7 * eps),  # negative
        2 - 0.25 * eps,  # just below a binade edge: the upper neighbour is 2, in the next binade
        mn - 0.4 * ms,  # subnormal range, upper neighbour is min normal
        2.5 * ms,  # subnormal range
        0.25 * ms,  # below the smallest subnormal: 0 or min_subnormal
        -0.6 * ms,
        0.75 * f.max,
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SR_NAMES)
def test_sr_unbiased(name, dtype):
    draws = 40_000
    for v in sr_points(name):
        v = float(torch.tensor(v, dtype=dtype))
        lo, hi = (a.item() for a in neighbours(np.array([v]), name))
        p = (v - lo) / (hi - lo)
        x = torch.full((draws,), v, dtype=dtype)
        q = quantise(x, name, "stochastic", generator=torch.Generator().manual_seed(10)).double()
        assert set(q.unique().tolist()) <= {lo, hi}
        # mean of Bernoulli(p) draws scaled by the gap: standard error gap·√(p(1-p)/N); allow 5 of them
        tol = 5 * (hi - lo) * math.sqrt(p * (1 - p) / draws) + 1e-12 * abs(v)
        assert abs(q.mean().item() - v) <= tol, (v, q.mean().item(), tol)


def test_sr_exact_probability_small_grid():
    # 1 + k/64 for E4M3 lies between 1 and 1.125: P(up) = k/8 exactly; 200k draws, 5 standard errors
    k = torch.arange(1, 8).repeat_interleave(200_000)
    x = 1 + k / 64
    q = quantise(x, "fp8_e4b", "stochastic", generator=torch.Generator().manual_seed(11))
    up = (q == 1.125).double().view(7, -1).mean(1)
    p = torch.arange(1, 8) / 8
    assert torch.all((up - p).abs() <= 5 * torch.sqrt(p * (1 - p) / 200_000))


def test_sr_reproducible():
    x = torch.randn(10_000)
    a = quantise(x, "fp8_e5b", "stochastic", generator=torch.Generator().manual_seed(3))
    b = quantise(x, "fp8_e5b", "stochastic", generator=torch.Generator().manual_seed(3))
    c = quantise(x, "fp8_e5b", "stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", list(FP8))
def test_sr_overflow(name):
    f = get_format(name)
    x = torch.tensor([2 * f.max, -1e30, INF, NAN])
    want = torch.tensor([f.max, -f.max, f.overflow_value, NAN])  # saturation is for finite values only
    assert same(quantise(x, name, "stochastic"), want)
    over = f.overflow_value
    assert same(quantise(x, name, "stochastic", saturate=False), torch.tensor([over, -over, over, NAN]))


# ---------------------------------------------------------------------------------------------------------
# Integer formats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.037, 2.0**-4])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantise_int_vs_numpy(name, scale, dtype):
    f = get_format(name)
    x = (torch.randn(20_000, generator=torch.Generator().manual_seed(12)) * 60 * scale).to(dtype)
    codes = quantise_int(x, name, scale)
    ref = np.clip(np.round(x.double().numpy() / scale), f.qmin, f.qmax)  # numpy rounds ties to even too
    assert codes.dtype == dtype and np.array_equal(codes.double().numpy(), ref)
    assert torch.equal(dequantise(codes, scale), codes * scale)


def test_quantise_int_ties_clamps_specials():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 6.5, 7.5, -7.5, -8.5, -100.0, 100.0, INF, -INF, NAN])
    want = torch.tensor([0, 2, 2, -0.0, -2, 6, 7, -8, -8, -8, 7, 7, -8, NAN])
    assert same(quantise_int(x, "int4", 1.0), want)
    assert quantise_int(torch.tensor([300.0, -300.0]), "int8", 1.0).tolist() == [127.0, -128.0]


def test_quantise_int_tensor_scale():
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(13))
    s = x.abs().amax(dim=1, keepdim=True) / 7
    codes = quantise_int(x, "int4", s)
    assert torch.equal(codes, torch.round(x / s).clamp(-8, 7))
    assert codes.abs().amax(dim=1).tolist() == [7.0] * 4


def test_quantise_int_stochastic():
    v, draws = 2.3, 100_000
    codes = quantise_int(
        torch.full((draws,), v), "int8", 1.0, "stochastic", torch.Generator().manual_seed(14)
    )
    assert set(codes.unique().tolist()) == {2.0, 3.0}
    assert abs(codes.double().mean().item() - v) <= 5 * math.sqrt(0.3 * 0.7 / draws)


def test_absmax_scale():
    x = torch.tensor([0.5, -3.5, 1.0])
    assert absmax_scale(x, "int4").item() == pytest.approx(0.5)
    assert absmax_scale(x, "fp8_e4b").item() == pytest.approx(3.5 / 448)
    assert absmax_scale(torch.zeros(3), "int8").item() == 1.0
    assert absmax_scale(torch.zeros(0), "int8").item() == 1.0


# ---------------------------------------------------------------------------------------------------------
# Range fractions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FLOATS)
def test_range_fractions_synthetic(name, dtype):
    f = get_format(name)
    up = lambda v: torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(INF, dtype=dtype)).item()  # noqa: E731
    down = lambda v: torch.nextafter(torch.tensor(v, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()  # noqa: E731
    fmax32 = torch.finfo(dtype).max
    flush_edge = f.min_subnormal / 2  # 2^-150 for fp32: not a float32 value, so nothing flushes there
    groups = {  # value: (count, bucket)
        0.0: (3, "zero"),
        f.min_subnormal: (5, "subnormal"),
        down(f.min_normal): (7, "subnormal"),
        f.min_normal: (11, "normal"),
        1.0: (13, "normal"),
        f.max: (17, "normal"),
        INF: (2, "nonfinite"),
        NAN: (4, "nonfinite"),
    }
    if up(f.max) <= fmax32:
        groups[up(f.max)] = (19, "overflow")
    if torch.tensor(flush_edge, dtype=dtype).item() == flush_edge:
        groups[flush_edge] = (23, "underflow")
        groups[up(flush_edge)] = (29, "subnormal")
    vals = torch.cat([torch.full((c,), v, dtype=dtype) * s for v, (c, _) in groups.items() for s in (1, -1)])
    vals = vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(0))]
    buckets = ("zero", "underflow", "subnormal", "normal", "overflow", "nonfinite")
    count = {k: 2 * sum(c for c, b in groups.values() if b == k) for k in buckets}
    n = count["underflow"] + count["subnormal"] + count["normal"] + count["overflow"]
    r = range_fractions(vals, name)
    assert r["counted"] == n
    assert r["underflow"] == count["underflow"] / n
    assert r["subnormal"] == (count["underflow"] + count["subnormal"]) / n
    assert r["normal"] == count["normal"] / n and r["overflow"] == count["overflow"] / n
    c = range_counts(vals, name)
    assert c.tolist() == [count[k] for k in buckets]


def test_range_fractions_gaussian_vs_erf():
    # REFERENCE §3.2: at σ = 1, e4m3fn has 1.25% of values below min normal and flushes 0.08% to zero
    n = 2**20
    x = torch.randn(n, generator=torch.Generator().manual_seed(15))
    r = range_fractions(x, "fp8_e4b")
    p_sub, p_flush = math.erf(2**-6 / math.sqrt(2)), math.erf(2**-10 / math.sqrt(2))
    assert abs(r["subnormal"] - p_sub) <= 5 * math.sqrt(p_sub / n) and round(p_sub * 100, 2) == 1.25
    assert abs(r["underflow"] - p_flush) <= 5 * math.sqrt(p_flush / n) and round(p_flush * 100, 2) == 0.08
    assert r["overflow"] == 0.0
    r16 = range_fractions(x.half(), "fp8_e5b")  # half input is compared in its own values
    assert r16["subnormal"] == pytest.approx(range_fractions(x.half().float(), "fp8_e5b")["subnormal"])
    assert range_fractions(torch.empty(0), "fp16") == {"underflow": 0.0, "subnormal": 0.0, "normal": 0.0,
                                                       "overflow": 0.0, "counted": 0}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The fast paths: compiled quantise rounds, both fp32 paths agree with torch's casts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOATS)
def test_compiled_quantise_rounds_like_eager(name):
    # Inductor drops a to(float16).to(float32) round trip; compiled simulation must still round (and saturate)
    torch._dynamo.reset()  # one lambda per format and mode: keep clear of the recompile limit
    f = get_format(name)
    special = torch.tensor([1 + 2**-12, 1 / 3, INF, -INF, NAN, -0.0, 3e38, -f.min_subnormal / 2])
    x = torch.cat([log_uniform(4096, -30, 20, seed=12), special])
    for saturate in (True, False):
        fn = torch.compile(lambda t, s=saturate: quantise(t, name, saturate=s), fullgraph=True, dynamic=False)
        q = fn(x)
        assert same(q, quantise(x, name, saturate=saturate)), saturate
        if f.torch_dtype is not None and f.bits < 32:  # and equals torch's eager cast where it is defined
            inside = x.abs() < f.max
            assert same(q[inside].double(), torch_cast(x[inside], f.torch_dtype))
    sr = torch.compile(lambda t: quantise(t, name, "stochastic"), fullgraph=True)(x.abs()[:4096].repeat(8))
    lo, hi = neighbours(x.abs()[:4096].repeat(8).double().numpy(), name) if name in SR_NAMES else (None, None)
    if lo is not None:
        assert np.all((sr.double().numpy() == lo) | (sr.double().numpy() == hi))


@pytest.mark.parametrize("name", [n for n in FLOATS if get_format(n).torch_dtype is not None])
def test_fp32_cast_path_and_bit_path_agree_with_torch(name):
    # inside the range quantise takes torch's cast; one value past max sends the whole tensor to the bit path
    f = get_format(name)
    x = log_uniform(50_000, math.log2(f.min_subnormal) - 3, math.log2(f.max) - 0.01, seed=13)
    ref = torch_cast(x, f.torch_dtype)
    assert same(quantise(x, name).double(), ref)
    past = torch.cat([x, torch.tensor([2 * f.max if f.max < 1e38 else INF])])
    assert same(quantise(past, name)[:-1].double(), ref)


def test_fp8_stochastic_int_bits_hit_both_neighbours_at_exact_rate():
    # SR on the int32 pattern: 1 + k/64 between 1 and 1.125 in E4M3 goes up with probability k/8
    k = torch.arange(1, 8).repeat_interleave(100_000)
    q = quantise(1 + k / 64, "fp8_e5b", "stochastic", generator=torch.Generator().manual_seed(14))
    up = (q == 1.25).double().view(7, -1).mean(1)  # E5M2 neighbours 1 and 1.25: P(up) = k/16
    p = torch.arange(1, 8) / 16
    assert torch.all((up - p).abs() <= 5 * torch.sqrt(p * (1 - p) / 100_000))
