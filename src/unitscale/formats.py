"""Number formats: the registry, quantisation, range statistics and signal-to-noise (docs/theory.md,
Number formats).

A float format with E exponent bits, M mantissa bits and bias b represents

    normal:    (-1)^s · 1.m · 2^(e - b),  min_exp = 1 - b ≤ e - b ≤ max_exp
    subnormal: (-1)^s · 0.m · 2^min_exp

and every constant (``max``, ``min_normal``, ``min_subnormal``, ``epsilon`` = 2^-M) follows from (E, M, b)
and the special-value rule of its NaN encoding:

* ``"ieee"``: the all-ones exponent holds ±inf and NaN, so max_exp = 2^E - 2 - b (fp32, bf16, fp16, e5m2);
* ``"all_ones"``: only S.1111.111 is NaN, no inf, so max_exp = 2^E - 1 - b and the top mantissa code is lost
  (e4m3fn: max = 1.75 · 2^8 = 448);
* ``"negative_zero"``: the single code 0x80 (the would-be -0) is NaN, no inf, no -0 ("fnuz"; max_exp =
  2^E - 1 - b).

Integer formats hold the codes [qmin, qmax] (int4: [-8, 7], int8: [-128, 127]) and need a scale.
Constants are never read from ``torch.finfo`` (its ``eps`` of float8_e5m2fnuz is wrong in torch 2.13).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
NAN_ENCODINGS: tuple[str, ...] = ("ieee", "all_ones", "negative_zero", "none")
SCALINGS: tuple[str | None, ...] = (None, "absmax")

# Torch dtypes by (E, M, bias, nan encoding), looked up by name: older torch builds lack the fnuz dtypes.
_TORCH_FLOAT_DTYPES = {
    (8, 23, 127, "ieee"): "float32",
    (8, 7, 127, "ieee"): "bfloat16",
    (5, 10, 15, "ieee"): "float16",
    (5, 2, 15, "ieee"): "float8_e5m2",
    (5, 2, 16, "negative_zero"): "float8_e5m2fnuz",
    (4, 3, 7, "all_ones"): "float8_e4m3fn",
    (4, 3, 8, "negative_zero"): "float8_e4m3fnuz",
}
_TORCH_INT_DTYPES = {(8, True): "int8", (8, False): "uint8", (16, True): "int16", (32, True): "int32"}


@dataclass(frozen=True)
class Format:
    """A number format. Float formats set exponent/mantissa bits; integer formats set ``integer_bits``.

    Build integer formats with :meth:`Format.integer`. Properties of integer formats describe unit step:
    ``max`` = qmax, ``min_normal`` = ``min_subnormal`` = ``epsilon`` = 1, ``min_exp`` = 0 and ``max_exp`` =
    floor(log2 qmax).
    """

    name: str
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    has_inf: bool = True
    nan: str = "ieee"
    negative_zero: bool = True
    integer_bits: int = 0
    signed: bool = True

    def __post_init__(self) -> None:
        def bad(why: str) -> ValueError:
            return ValueError(f"Format {self.name!r}: {why}")

        if self.nan not in NAN_ENCODINGS:
            raise bad(f"unknown nan encoding {self.nan!r}; accepted: {', '.join(NAN_ENCODINGS)}")
        if self.exponent_bits > 0:
            if self.integer_bits or self.mantissa_bits < 0 or self.exponent_bits > 11:
                raise bad("need 1..11 exponent bits, mantissa bits >= 0 and no integer bits")
            if self.nan == "none":
                raise bad("float formats need a nan encoding: ieee, all_ones or negative_zero")
            if self.has_inf != (self.nan == "ieee"):
                raise bad("inf exists exactly with the 'ieee' encoding (all-ones exponent)")
            if self.nan == "negative_zero" and self.negative_zero:
                raise bad("the 'negative_zero' NaN encoding leaves no -0")
            if self.nan == "all_ones" and self.mantissa_bits < 1:
                raise bad("the 'all_ones' encoding needs mantissa bits >= 1")
        elif self.integer_bits < 2 or self.mantissa_bits or self.has_inf or self.nan != "none":
            raise bad("integer formats need integer_bits >= 2, has_inf=False and nan='none'")

    @classmethod
    def integer(cls, name: str, bits: int, signed: bool = True) -> Format:
        """An integer format with ``bits`` bits (two's complement when ``signed``)."""
        return cls(name, integer_bits=bits, signed=signed, has_inf=False, nan="none", negative_zero=False)

    def __str__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        return self.exponent_bits > 0

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits if self.is_float else self.integer_bits

    @property
    def qmin(self) -> int:
        """Smallest integer code (integer formats only)."""
        self._need_integer("qmin")
        return -(2 ** (self.integer_bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code (integer formats only)."""
        self._need_integer("qmax")
        return 2 ** (self.integer_bits - 1) - 1 if self.signed else 2**self.integer_bits - 1

    @property
    def max_exp(self) -> int:
        """Exponent of the top binade: 2^E - 2 - bias ('ieee'), 2^E - 1 - bias (no inf)."""
        if not self.is_float:
            return self.qmax.bit_length() - 1
        top = 2**self.exponent_bits - (2 if self.nan == "ieee" else 1)
        return top - self.bias

    @property
    def min_exp(self) -> int:
        """Exponent of the lowest normal binade: 1 - bias."""
        return 1 - self.bias if self.is_float else 0

    @property
    def max(self) -> float:
        """Largest finite value: (2 - 2^-M) · 2^max_exp, or (2 - 2^(1-M)) · 2^max_exp for 'all_ones'."""
        if not self.is_float:
            return float(self.qmax)
        top_code = 2 ** (self.mantissa_bits + 1) - (2 if self.nan == "all_ones" else 1)
        return math.ldexp(top_code, self.max_exp - self.mantissa_bits)

    @property
    def min_normal(self) -> float:
        """2^min_exp."""
        return math.ldexp(1.0, self.min_exp) if self.is_float else 1.0

    @property
    def min_subnormal(self) -> float:
        """2^(min_exp - M); the smallest step anywhere in the format."""
        return math.ldexp(1.0, self.min_exp - self.mantissa_bits) if self.is_float else 1.0

    @property
    def epsilon(self) -> float:
        """Spacing above 1: 2^-M."""
        return math.ldexp(1.0, -self.mantissa_bits) if self.is_float else 1.0

    @property
    def nan_codes(self) -> int:
        """Number of bit patterns that decode to NaN."""
        per_encoding = {"ieee": 2 * (2**self.mantissa_bits - 1), "all_ones": 2, "negative_zero": 1, "none": 0}
        return per_encoding[self.nan]

    @property
    def overflow_value(self) -> float:
        """What a non-saturating cast gives beyond the range: inf where the format has it, else NaN."""
        return math.inf if self.has_inf else math.nan

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype storing exactly this format, or None (tf32, int4)."""
        if self.is_float:
            key = (self.exponent_bits, self.mantissa_bits, self.bias, self.nan)
            name = _TORCH_FLOAT_DTYPES.get(key)
        else:
            name = _TORCH_INT_DTYPES.get((self.integer_bits, self.signed))
        return getattr(torch, name, None) if name else None

    def _need_integer(self, what: str) -> None:
        if self.is_float:
            raise ValueError(f"{what} is defined for integer formats only, not {self.name!r}")


def _float(name: str, e: int, m: int, bias: int, nan: str = "ieee") -> Format:
    return Format(name, e, m, bias, has_inf=nan == "ieee", nan=nan, negative_zero=nan != "negative_zero")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _float("fp32", 8, 23, 127),
        _float("tf32", 8, 10, 127),
        _float("bf16", 8, 7, 127),
        _float("fp16", 5, 10, 15),
        _float("fp8_e5a", 5, 2, 16, "negative_zero"),
        _float("fp8_e5b", 5, 2, 15),
        _float("fp8_e4a", 4, 3, 8, "negative_zero"),
        _float("fp8_e4b", 4, 3, 7, "all_ones"),
        Format.integer("int8", 8),
        Format.integer("int4", 4),
    )
}
ALIASES: dict[str, str] = {"e4m3": "fp8_e4b", "e5m2": "fp8_e5b"}


def format_names(aliases: bool = False) -> list[str]:
    """Registered format names in table order (optionally followed by the aliases)."""
    return [*FORMATS, *(ALIASES if aliases else ())]


def get_format(fmt: str | Format) -> Format:
    """The Format for a registered name (case-insensitive, aliases e4m3/e5m2 accepted) or a Format itself."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        key = fmt.strip().lower()
        found = FORMATS.get(ALIASES.get(key, key))
        if found is not None:
            return found
    raise ValueError(f"unknown number format {fmt!r}; accepted: {', '.join(format_names(aliases=True))}")


# --------------------------------------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------------------------------------


def _check_choice(what: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {what} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def _check_float_input(x: Tensor, fn: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}() needs a floating-point tensor, got {got}")


@functools.cache
def _exact_in(value: float, dtype: torch.dtype) -> bool:
    return torch.tensor(value, dtype=torch.float64).to(dtype).item() == value


def _fits_fp32(fmt: Format) -> bool:
    return fmt.max_exp <= 127 and fmt.min_exp - fmt.mantissa_bits >= -149


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """Exactly 2^k (integer tensor k) in float32/float64, built from bits so no libm rounding is involved."""
    ibits, mbits, bias = (torch.int32, 23, 127) if dtype == torch.float32 else (torch.int64, 52, 1023)
    k = k.to(ibits)
    normal = (k + bias).clamp_min(1) << mbits
    subnormal = torch.ones_like(k) << (k + (bias + mbits - 1)).clamp(0, mbits - 1)
    return torch.where(k >= 1 - bias, normal, subnormal).view(dtype)


def _to_float32_round_to_odd(x: Tensor) -> Tensor:
    """float64 → float32 rounding to odd: truncate, then set the last bit if inexact.

    Rounding to odd with ≥ 2 spare bits followed by RNE equals one RNE, so fp64 inputs avoid the double
    rounding of torch's (and ml_dtypes') fp64 → fp32 → fp8/fp16/bf16 casts.
    """
    y = x.to(torch.float32)
    y = torch.where(y.to(torch.float64).abs() > x.abs(), torch.nextafter(y, torch.zeros_like(y)), y)
    inexact = (y.to(torch.float64) != x).to(torch.int32)
    return (y.view(torch.int32) | inexact).view(torch.float32)


def _nonfinite(q: Tensor, x: Tensor, fmt: Format) -> Tensor:
    """±inf input becomes the format's overflow value (±inf, or NaN where it has no inf): saturation is for
    finite values only, so a diverged tensor never comes back finite (docs/theory.md, Special values and
    saturation)."""
    return torch.where(torch.isinf(x), torch.copysign(torch.full_like(q, fmt.overflow_value), x), q)


def _finish(q: Tensor, y: Tensor, fmt: Format, saturate: bool) -> Tensor:
    """Shared tail of the arithmetic paths: sign of zero, then overflow (beyond ±max) to inf or NaN."""
    q = torch.copysign(q, y) if fmt.negative_zero else q + 0.0  # -0 + 0 = +0 where the format has no -0
    if not saturate:
        over = q.abs() > fmt.max  # ±inf input lands here too: inf / ulp rounds to inf
        q = torch.where(over, torch.copysign(torch.full_like(q, fmt.overflow_value), y), q)
    return q


def _round_arithmetic(x: Tensor, fmt: Format, rounding: str, saturate: bool, generator) -> Tensor:
    """RNE or SR on the format's grid in float32/float64 arithmetic; every step below is exact.

    With e = max(floor(log2|y|), min_exp) and ulp = 2^(e - M), y/ulp is exact (power-of-two scaling) and
    the two neighbours of y are floor(y/ulp)·ulp and that + ulp (the upper one may be 2^(e+1), the next
    binade's first value). RNE: torch.round (ties to even). SR: round up with probability
    p = y/ulp - floor(y/ulp), so E[SR(y)] = y.
    """
    work = torch.float64 if x.dtype == torch.float64 or not _fits_fp32(fmt) else torch.float32
    y = x.to(work)
    if saturate:
        y = y.clamp(-fmt.max, fmt.max)
    _, e = torch.frexp(y)  # |y| = m · 2^e, m ∈ [0.5, 1)
    ulp = _pow2((e - 1).clamp_min(fmt.min_exp) - fmt.mantissa_bits, work)
    scaled = y / ulp
    if rounding == "nearest":
        q = torch.round(scaled)
    else:
        lower = torch.floor(scaled)
        u = torch.rand(y.shape, generator=generator, device=y.device, dtype=work)
        q = lower + (u < scaled - lower).to(work)
    q = _finish(q * ulp, y, fmt, saturate)
    return (_nonfinite(q, x, fmt) if saturate else q).to(x.dtype)


def _round_cast(x: Tensor, fmt: Format, saturate: bool) -> Tensor:
    """RNE through torch's own dtype: clamp, cast, cast back (16-bit and fp64 inputs)."""
    dtype = fmt.torch_dtype
    assert dtype is not None
    if x.dtype == torch.float64 and fmt.mantissa_bits < 21:
        y = _to_float32_round_to_odd(x)
    elif x.dtype in (torch.float16, torch.bfloat16) and not _exact_in(fmt.max, x.dtype):
        y = x.to(torch.float32)  # the clamp bound must be exact in the dtype the clamp runs in
    else:
        y = x
    if not saturate:
        return y.to(dtype).to(x.dtype)
    return _nonfinite(y.clamp(-fmt.max, fmt.max).to(dtype).to(x.dtype), x, fmt)


# fp32 inputs: integer arithmetic on the bit pattern (any format, one fused kernel under torch.compile) and
# a native-cast fast path for tensors that need no overflow or special-value handling (eager).

_SIGN = -(2**31)  # 0x80000000 as int32


def _random_bits(x: Tensor, generator) -> Tensor:
    """24 uniform random bits per element of fp32 ``x`` (int32): the draw of every fp32 SR path."""
    return torch.randint(0, 1 << 24, x.shape, generator=generator, device=x.device, dtype=torch.int32)


def _round_subnormal(a: Tensor, fmt: Format, rounding: str, bits: Tensor | None) -> Tensor:
    """|x| = ``a`` < 2^min_exp rounded onto the format's fixed subnormal spacing u = 2^(min_exp - M) (for
    formats whose subnormals sit above fp32's). RNE by (a + C) - C with C = 2^23·u (fp32 rounds the sum to
    a multiple of u, ties to even); SR by floor(a/u) + [v < frac(a/u)], v = bits·2^-24."""
    u = math.ldexp(1.0, fmt.min_exp - fmt.mantissa_bits)
    if rounding == "nearest":
        c = math.ldexp(u, 23)
        return (a + c) - c
    s = a * (1.0 / u)  # exact: a power-of-two scaling
    lower = torch.floor(s)
    return (lower + ((bits.to(torch.float32) * 2.0**-24) < s - lower).to(torch.float32)) * u


def _round_bits(x: Tensor, fmt: Format, rounding: str, saturate: bool, generator) -> Tensor:
    """RNE or SR of fp32 ``x`` onto ``fmt``'s grid from its int32 bit pattern b; exact for every input.

    Normal range of the format (|x| ≥ 2^min_exp): keep M of fp32's 23 mantissa bits, d = 23 - M.
    RNE: (b + 2^(d-1) - 1 + bit_d(b)) with the low d bits cleared (a carry moves into the exponent, so a
    binade edge and fp32 overflow to inf come out right). SR: b + r, r uniform on [0, 2^d), low bits cleared:
    P(up) = (b mod 2^d) / 2^d exactly. Subnormal range: :func:`_round_subnormal`. Then |q| > max gives ±max
    (saturate, finite x) or the overflow value, ±inf input the overflow value, NaN input itself.
    """
    d = 23 - fmt.mantissa_bits
    b = x.view(torch.int32)
    a = x.abs()
    if rounding == "nearest":
        bits = None
        r = b + ((b >> d) & 1) + ((1 << (d - 1)) - 1) if d > 0 else b
    else:
        bits = _random_bits(x, generator)
        r = b + (bits >> (24 - d)) if d > 0 else b
    q = (r & ~((1 << d) - 1)).view(torch.float32) if d > 0 else x
    if fmt.min_exp > -126:  # the format's subnormals sit above fp32's: a fixed spacing u below 2^min_exp
        q = torch.where(a < fmt.min_normal, torch.copysign(_round_subnormal(a, fmt, rounding, bits), x), q)
    big = torch.where(torch.isinf(x) | (not saturate), fmt.overflow_value, fmt.max)
    q = torch.where(q.abs() > fmt.max, torch.copysign(big, x), q)
    q = torch.where(torch.isnan(x), x, q)
    return q if fmt.negative_zero else torch.where(q == 0, 0.0, q)  # fnuz: no -0


def _round_bits_in_range(x: Tensor, fmt: Format, rounding: str, generator) -> Tensor:
    """:func:`_round_bits` for fp32 ``x`` with every |x| < max and no NaN (``_in_range``): the same bits and
    the same random draw, in place on one fresh buffer. Eager CPU runs each aten op as a full pass and a
    fresh 4-byte buffer costs about a clone, so the general path's selects for overflow and specials cost
    more than the rounding itself; elements below the format's min normal are redone by index."""
    d = 23 - fmt.mantissa_bits
    b = x.view(torch.int32)
    small = None
    if fmt.min_exp > -126:  # find the subnormals (and gather their draws) before the buffer is reused
        mn = fmt.min_normal
        small = (x > -mn).logical_and_(x < mn).reshape(-1).nonzero().squeeze(1)
    if rounding == "nearest":
        r = torch.bitwise_right_shift(b.contiguous(), d).bitwise_and_(1).add_(b).add_((1 << (d - 1)) - 1)
        small_bits = None
    else:
        r = _random_bits(x, generator)
        small_bits = None if small is None else r.reshape(-1).index_select(0, small)
        r.bitwise_right_shift_(24 - d).add_(b)
    q = r.bitwise_and_(~((1 << d) - 1)).view(torch.float32)
    if small is not None and small.numel():
        xs = x.reshape(-1).index_select(0, small)
        q.view(-1).index_copy_(
            0, small, torch.copysign(_round_subnormal(xs.abs(), fmt, rounding, small_bits), xs)
        )
    if not fmt.negative_zero:  # fnuz: no -0 (a -0 input, or a small negative rounded to zero)
        q.masked_fill_(q == 0, 0.0)
    return q


def _decode_fp8(codes: Tensor, fmt: Format, out: Tensor) -> Tensor:
    """fp8 codes into fp32 ``out`` by bit moves (torch's fp8 → fp32 cast is 8× slower on CPU): the sign to
    bit 31, exponent and mantissa to fp32's exponent/mantissa fields, times 2^(127 - bias). Finite codes
    only (the caller routes NaN/inf inputs elsewhere)."""
    w = out.view(torch.int32)
    w.copy_(codes.view(torch.int8))  # sign-extended: bit 31 is the sign
    shift = 23 - fmt.mantissa_bits
    w.bitwise_left_shift_(shift).bitwise_and_(_SIGN | (0x7F << shift))
    return out.mul_(math.ldexp(1.0, 127 - fmt.bias))


def _round_cast_fp32(x: Tensor, fmt: Format) -> Tensor:
    """RNE of fp32 ``x`` by torch's cast, for x with every |x| < max and no NaN (nothing to saturate), or any
    x for fp16/bf16 without saturation (the IEEE cast overflows to ±inf and keeps NaN, as asked)."""
    dtype = fmt.torch_dtype
    if fmt.bits == 8:
        return _decode_fp8(x.to(dtype), fmt, torch.empty_like(x))
    return torch.empty_like(x).copy_(x.to(dtype))


def _in_range(x: Tensor, fmt: Format) -> bool:
    """Every element finite with |x| < max (NaN fails both comparisons). One read pass, no copy."""
    lo, hi = torch.aminmax(x)
    return bool((lo > -fmt.max) & (hi < fmt.max))


@torch.no_grad()
def quantise(
    x: Tensor,
    fmt: str | Format,
    rounding: Rounding = "nearest",
    saturate: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``x`` onto the grid of float format ``fmt``; same dtype, shape and device as ``x``.

    nearest: round-to-nearest, ties to even, bit-identical to torch's and ml_dtypes' casts on fp32/fp16/bf16
    input (fp64 input is rounded once, correctly; those casts round fp64 via fp32 twice). tf32 keeps 10
    mantissa bits of fp32. stochastic: one of the two neighbours, up with probability equal to the distance
    from the lower one in ulps, so E[Q(x)] = x; random draws come from ``generator`` (device of x) and are
    fp32 (fp64 for fp64 x), so the bias is 0 whenever x has ≤ 24 (53) bits below the ulp it is rounded to,
    else ≤ 2^-24 (2^-53) ulp.

    saturate=True: finite values are clamped to ±max first, so finite overflow gives ±max. saturate=False:
    beyond the RNE boundary (max + ulp/2; a tie overflows unless max has an even last mantissa bit, as in
    fp8_e4b) the result is ±inf for fp32/tf32/bf16/fp16/fp8_e5b and NaN for fp8_e4b/fp8_e4a/fp8_e5a (no
    inf). Either way ±inf input gives that overflow value and NaN stays NaN: a non-finite value is never
    made finite (docs/theory.md, Special values and saturation). -0 stays -0 except in the fnuz formats
    (fp8_e4a, fp8_e5a), which give +0.

    Cost (bench/simulate.py): fp32 input with every |x| < max takes torch's own cast (fp8 decoded by bit
    moves); otherwise, and always under torch.compile, integer arithmetic on the fp32 bit pattern that
    Inductor fuses into one kernel (its elision of a to(float16).to(float32) round trip cannot skip it).

    The result is cast back to x.dtype, which is exact unless x.dtype is narrower than the format (e.g.
    fp16 input to bf16: bf16 values above 65504 overflow in the cast back). It is computed outside autograd
    (rounding has no useful derivative): backends call it inside their autograd Function, and a
    straight-through estimator is ``x + (quantise(x, fmt) - x).detach()``.
    """
    fmt = get_format(fmt)
    if not fmt.is_float:
        raise ValueError(
            f"quantise() takes float formats; {fmt.name!r} is an integer format: "
            "use quantise_int(x, fmt, scale)"
        )
    _check_choice("rounding", rounding, ROUNDINGS)
    _check_float_input(x, "quantise")
    if x.numel() == 0:
        return x.clone()
    if fmt.name == "fp32" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.detach()  # already on the grid; saturation and specials change nothing
    if x.dtype == torch.float32:
        # Under torch.compile: the bit arithmetic, one fused kernel (Inductor drops a to(fp16).to(fp32) round
        # trip). Eager on CPU: torch's cast, without a clamp where nothing needs saturating (one read pass).
        compiling = torch.compiler.is_compiling()
        eager_cast = rounding == "nearest" and fmt.torch_dtype is not None and not compiling
        if eager_cast and fmt.bits == 16 and not saturate:
            return _round_cast_fp32(x, fmt)  # the IEEE cast itself overflows to ±inf and keeps NaN
        if not compiling and x.device.type == "cpu" and _in_range(x, fmt):
            if eager_cast:
                return _round_cast_fp32(x, fmt)
            return _round_bits_in_range(x, fmt, rounding, generator)
        if not (eager_cast and (saturate or fmt.bits >= 16)):
            return _round_bits(x, fmt, rounding, saturate, generator)
    # Cast overflow differs between torch versions for the fp8 dtypes, so only 16/32-bit IEEE casts
    # (standard overflow to inf) take the cast path without saturation.
    fast = fmt.torch_dtype is not None and (saturate or fmt.bits >= 16)
    if rounding == "nearest" and fast and not torch.compiler.is_compiling():
        return _round_cast(x, fmt, saturate)
    return _round_arithmetic(x, fmt, rounding, saturate, generator)


def _check_scale(scale: float | Tensor) -> None:
    if not isinstance(scale, Tensor) and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number (or a tensor), got {scale!r}")


@torch.no_grad()
def quantise_int(
    x: Tensor,
    fmt: str | Format,
    scale: float | Tensor,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integer codes clamp(round(x / scale), qmin, qmax) as a float tensor of x's dtype.

    nearest rounds ties to even; stochastic rounds up with probability frac(x / scale) (unbiased inside
    the range). ±inf clamp to qmin/qmax; NaN stays NaN. ``scale`` broadcasts (per-tensor or finer).
    Computed outside autograd, like :func:`quantise`.
    """
    fmt = get_format(fmt)
    if fmt.is_float:
        raise ValueError(f"quantise_int() takes integer formats (int8, int4); {fmt.name!r} is a float format")
    _check_choice("rounding", rounding, ROUNDINGS)
    _check_float_input(x, "quantise_int")
    _check_scale(scale)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(work) / (scale.to(work) if isinstance(scale, Tensor) else scale)
    if rounding == "nearest":
        q = torch.round(xs)
    else:
        lower = torch.floor(xs)
        u = torch.rand(xs.shape, generator=generator, device=xs.device, dtype=work)
        q = lower + (u < xs - lower).to(work)
    return q.clamp(fmt.qmin, fmt.qmax).to(x.dtype)


def dequantise(codes: Tensor, scale: float | Tensor) -> Tensor:
    """codes · scale, the value an integer code stands for."""
    _check_scale(scale)
    return codes * scale


def absmax_scale(x: Tensor, fmt: str | Format) -> Tensor:
    """Per-tensor scale s = max|x| / fmt.max (qmax for integers) mapping the largest |x| to the format's
    largest value; 1 for an all-zero tensor. A 0-dim tensor on x's device (no host sync)."""
    fmt = get_format(fmt)
    if x.numel() == 0:
        return torch.ones(
            (), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device
        )
    amax = x.detach().abs().amax().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))


# --------------------------------------------------------------------------------------------------------
# Range statistics
# --------------------------------------------------------------------------------------------------------

RANGE_KEYS: tuple[str, ...] = ("underflow", "subnormal", "normal", "overflow")


def _smallest_above(value: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` strictly greater than ``value``."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if t.item() <= value:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.item()


@functools.lru_cache(maxsize=64)
def _range_boundaries(fmt: Format, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Bucket edges for range_counts, built once per (format, dtype, device); never mutated."""
    tiny = torch.nextafter(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()
    edges = (
        tiny,  # below: exact zero
        _smallest_above(fmt.min_subnormal / 2, dtype),  # below: flushed to zero by RNE
        fmt.min_normal,  # below: subnormal range
        _smallest_above(fmt.max, dtype),  # below: normal range
        math.inf,  # below: finite overflow; at or above: inf / NaN
    )
    return torch.tensor(edges, dtype=dtype, device=device)


def range_counts(x: Tensor, fmt: str | Format) -> Tensor:
    """Counts of x by where |x| falls in float format ``fmt``, as an int64 tensor on x's device (no sync):

    [0] zero, [1] underflow 0 < |x| ≤ min_subnormal/2 (RNE flushes it to 0; the tie goes to even = 0),
    [2] subnormal-but-kept min_subnormal/2 < |x| < min_normal, [3] normal min_normal ≤ |x| ≤ max,
    [4] overflow max < |x| < inf (what saturation clamps, including values RNE would round down to max),
    [5] ±inf and NaN. One bucketize pass plus one bincount.
    """
    fmt = get_format(fmt)
    if not fmt.is_float:
        raise ValueError(f"range statistics need a float format; {fmt.name!r} is an integer format")
    _check_float_input(x, "range_counts")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    a = torch.nan_to_num(x.detach().abs().to(work).flatten(), nan=math.inf, posinf=math.inf)
    edges = _range_boundaries(fmt, work, x.device)
    # right=True: bucket i holds edges[i-1] <= a < edges[i]
    return torch.bincount(torch.bucketize(a, edges, right=True), minlength=6)


def fractions_from_counts(counts: Sequence[int]) -> dict[str, float]:
    """Fractions of the finite non-zero values from a :func:`range_counts` vector (keys ``RANGE_KEYS``).

    ``underflow``: flushed to zero (0 < |x| ≤ min_subnormal/2); ``subnormal``: |x| < min_normal (includes
    ``underflow``); ``normal``: min_normal ≤ |x| ≤ max; ``overflow``: |x| > max (clamped by saturation).
    All 0 when there is no finite non-zero value.
    """
    _, under, sub, normal, over, _ = (int(c) for c in counts)
    n = under + sub + normal + over
    values = {"underflow": under, "subnormal": under + sub, "normal": normal, "overflow": over}
    return {k: (values[k] / n if n else 0.0) for k in RANGE_KEYS}


def range_fractions(x: Tensor, fmt: str | Format) -> dict[str, float]:
    """:func:`fractions_from_counts` of x in ``fmt``, plus ``counted``: the number of finite non-zero
    values. One host sync (use :func:`range_counts` to batch many tensors into one copy)."""
    counts = range_counts(x, fmt).tolist()
    return {**fractions_from_counts(counts), "counted": sum(counts[1:5])}


# --------------------------------------------------------------------------------------------------------
# Signal-to-noise
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _standard_normal(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64)


def quantise_scaled(
    x: Tensor, fmt: str | Format, scaling: str | None = None, step: float | None = None
) -> Tensor:
    """Q(x) in x's units with RNE and clamping: float formats unscaled or absmax-scaled (x/s onto the grid,
    times s); integer formats with a fixed ``step`` or an absmax scale s = max|x|/qmax."""
    fmt = get_format(fmt)
    _check_choice("scaling", scaling, SCALINGS)
    if fmt.is_float:
        if step is not None:
            raise ValueError(f"step applies to integer formats only, not {fmt.name!r}; use scaling='absmax'")
        if scaling is None:
            return quantise(x, fmt)
        s = absmax_scale(x, fmt)
        return quantise(x / s, fmt) * s
    if (scaling is None) == (step is None):
        raise ValueError(f"integer format {fmt.name!r} needs exactly one of step=<float> or scaling='absmax'")
    s = absmax_scale(x, fmt) if scaling == "absmax" else step
    return dequantise(quantise_int(x, fmt, s), s)


def snr(
    fmt: str | Format,
    sigma: float = 1.0,
    n: int = 2**20,
    seed: int = 0,
    scaling: str | None = None,
    step: float | None = None,
    *,
    outliers: float | None = None,
    n_outliers: int = 16,
) -> float:
    """Signal-to-noise ratio E[x²] / E[(x - Q(x))²] of x ~ N(0, σ²) (n float64 samples, fixed seed).

    Q is :func:`quantise_scaled` (RNE with clamping). ``outliers=K`` multiplies the first ``n_outliers``
    samples by K (outliers of scale Kσ); the SNR is then measured on the other samples only, the bulk that
    an absmax scale sized for the outliers starves of resolution. Returns inf when Q is exact.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite positive number, got {sigma!r}")
    if n < 1 or (outliers is not None and not 0 <= n_outliers < n):
        raise ValueError(f"need n >= 1 and 0 <= n_outliers < n, got n={n}, n_outliers={n_outliers}")
    x = sigma * _standard_normal(n, seed)
    bulk = slice(None)
    if outliers is not None:
        if not (math.isfinite(outliers) and outliers > 0):
            raise ValueError(f"outliers must be a finite positive factor K, got {outliers!r}")
        x[:n_outliers] *= outliers
        bulk = slice(n_outliers, None)
    err = (x - quantise_scaled(x, fmt, scaling, step))[bulk]
    noise = float(err.square().sum())
    signal = float(x[bulk].square().sum())
    return signal / noise if noise > 0 else math.inf


def snr_db(*args, **kwargs) -> float:
    """:func:`snr` in decibels, 10·log10(SNR); same arguments."""
    return 10.0 * math.log10(snr(*args, **kwargs))
