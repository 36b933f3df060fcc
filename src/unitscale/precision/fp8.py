"""The real FP8 backend: every linear as three ``torch._scaled_mm`` GEMMs with static power-of-two scales.

For y = α·x Wᵀ + c with x [M, K], W [N, K] and static dequantisation scales s_x, s_w, s_g (powers of two;
1 for unit-scaled tensors), each tensor is cast once, q(t) = fp8(clamp(t / s, ±max)), into both layouts
(docs/theory.md, One read per tensor) and

    forward  y  = (α·s_x)·s_w · q(x) q(W)ᵀ + c          E4M3 × E4M3, fast accumulation
    dgrad    ∂x = (β_x·s_g)·s_w · q(∂y) q(W)             E5M2 × E4M3, FP32 accumulation
    wgrad    ∂W = (β_w·s_g)·s_x · q(∂y)ᵀ q(x)            E5M2 × E4M3, FP32 accumulation
    bias     ∂c = β_c · Σ_rows ∂y                         (unquantised, as in every backend)

α and β fold into ``scale_a`` / ``scale_b``, so unit scaling costs no extra kernel. Only FP8 copies are
saved for backward: q(x)ᵀ (the wgrad operand, the one activation copy kept) and q(W)ᵀ (the dgrad operand).
With q = the simulate backend's RNE + saturation, outputs equal ``Simulate(fp8_e4b, fp8_e4b, fp8_e5b)``
up to accumulation order (and the forward's fast accumulation on Hopper).

Weights are the one exception to static scales: ``weight_scale="pow2_amax"`` (what the training recipes
use) or ``"pow2_rms"`` computes, on the device at every cast, a power-of-two s_w from the weight itself
(``precision.scales``, the rule the simulate backend calls too); the default ``"static"`` keeps s_w fixed (the
paper's unscaled casts). A weight is cast once per forward call and that cast is saved for the same call's
backward: no FP8 copy outlives its call, so a weight changed in any way (an optimizer step, an FSDP2
all-gather into the same storage, ``weight.data = ...``) is always read afresh. A per-call shape rule
(:class:`Dispatch`) sends small GEMMs to the compute dtype, where FP8 is measured slower. Batched matmuls
(attention) run in the compute dtype: ``_scaled_mm`` is 2-D only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from unitscale.formats import get_format
from unitscale.precision.backend import Exact
from unitscale.precision.scales import (  # noqa: F401  (pow2_rms_scale: re-exported)
    WEIGHT_SCALES,
    WeightScale,
    check_weight_scale,
    pow2_rms_scale,
    weight_scale,
)

# Hopper tensor cores run the OCP formats only.
FP8_FORMATS: dict[str, torch.dtype] = {"fp8_e4b": torch.float8_e4m3fn, "fp8_e5b": torch.float8_e5m2}
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GEMM_ALIGN = 16  # _scaled_mm on Hopper: every GEMM dimension a multiple of 16


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True where ``torch._scaled_mm`` runs FP8: CPU (torch ≥ 2.13, reference speed) or CUDA with sm_89+."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _supported(device.type, device.index)


@torch.compiler.assume_constant_result  # a device property: torch.compile evaluates it once, no graph break
def _supported(device_type: str, index: int | None) -> bool:
    key = (device_type, index)
    if key not in _SUPPORT:
        if not hasattr(torch, "_scaled_mm"):
            _SUPPORT[key] = False
        elif device_type == "cuda":
            ok = torch.cuda.is_available()
            _SUPPORT[key] = ok and torch.cuda.get_device_capability(index) >= (8, 9)
        else:
            _SUPPORT[key] = device_type == "cpu"
    return _SUPPORT[key]


_SUPPORT: dict[tuple[str, int | None], bool] = {}


@dataclass(frozen=True)
class Dispatch:
    """Which linears run in FP8: M ≥ min_m, K ≥ min_k, N ≥ min_n, and M, K, N positive multiples of 16.

    Everything else runs in the compute dtype. M (rows = tokens) is only known per call; the rule reads
    static shapes, so torch.compile specialises on it instead of breaking the graph. The default is
    start rule (docs/theory.md, Dispatch): every measured H100 win satisfies it, the measured loss does not;
    refine it per device from ``bench/linear.py``.
    """

    min_m: int = 8192
    min_k: int = 4096
    min_n: int = 4096

    def __post_init__(self) -> None:
        for name in ("min_m", "min_k", "min_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Dispatch.{name} must be a non-negative integer, got {value!r}")

    @classmethod
    def always(cls) -> Dispatch:
        """FP8 for every aligned shape (tests, benchmarks)."""
        return cls(0, 0, 0)

    def use_fp8(self, m: int, k: int, n: int) -> bool:
        aligned = m % GEMM_ALIGN == 0 and k % GEMM_ALIGN == 0 and n % GEMM_ALIGN == 0
        return aligned and min(m, k, n) > 0 and m >= self.min_m and k >= self.min_k and n >= self.min_n


def check_pow2(name: str, value: float) -> float:
    """``value`` as a float if it is a positive finite power of two, else ValueError."""
    value = float(value)
    if not (math.isfinite(value) and value > 0 and math.frexp(value)[0] == 0.5):
        raise ValueError(f"{name} must be a positive power of two (static scales are exact), got {value!r}")
    return value


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast_pair(
    t: Tensor,
    inv_scale: float | Tensor,
    dtype: torch.dtype,
    *,
    round_to: torch.dtype | None = None,
    write_row: bool = True,
    write_col: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """(q, qᵀ contiguous) with q = fp8(clamp(ρ(t)·inv_scale, ±max)) for a 2-D ``t``; None where not asked.

    ρ rounds to ``round_to`` first (the compute dtype, i.e. what the simulate backend would quantise).
    One registered op (fp8_kernels.fp8_cast_pair): the fused Triton pass on CUDA, eager or compiled (no
    graph break), torch ops elsewhere.
    """
    from unitscale.precision.fp8_kernels import fp8_cast_pair

    if not isinstance(inv_scale, Tensor):
        inv_scale = _const(inv_scale, t.device)
    return fp8_cast_pair(t, inv_scale, dtype, round_to=round_to, write_row=write_row, write_col=write_col)


_CONSTS: dict[tuple[float, torch.device], Tensor] = {}


def _const(value: float, device: torch.device) -> Tensor:
    """A float32 0-dim tensor holding ``value`` (cached in eager mode: no fill kernel per GEMM)."""
    if torch.compiler.is_compiling():
        return torch.full((), value, dtype=torch.float32, device=device)
    key = (value, device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((), value, dtype=torch.float32, device=device)
    return t


@dataclass(frozen=True)
class _Plan:
    """Everything static about one linear call."""

    alpha: float
    beta_x: float
    beta_w: float
    beta_b: float
    compute: torch.dtype
    x_dtype: torch.dtype
    w_dtype: torch.dtype
    g_dtype: torch.dtype
    x_scale: float
    g_scale: float
    need_gx: bool
    need_gw: bool


def _mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype, *,
        fast: bool, bias: Tensor | None = None) -> Tensor:
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan, backend):  # type: ignore[override]
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        x8, x8t = cast_pair(x2, 1.0 / plan.x_scale, plan.x_dtype, round_to=plan.compute,
                            write_col=plan.need_gw)
        w8, w8t, s_w = backend.weight_fp8(weight, plan.w_dtype, plan.compute)
        dev = x.device
        # The epilogue adds a bias of the output dtype after the scales (y = s_a·s_b·AB + c).
        fused_bias = bias is not None and plan.compute != torch.float32
        y = _mm(x8, w8.t(), _const(plan.alpha * plan.x_scale, dev), s_w, plan.compute, fast=True,
                bias=bias.to(plan.compute) if fused_bias else None)
        if bias is not None and not fused_bias:
            y = y + bias.to(plan.compute)
        ctx.save_for_backward(x8t, w8t if plan.need_gx else None, s_w)
        ctx.plan = plan
        ctx.meta = (lead, k, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x8t, w8t, s_w = ctx.saved_tensors
        plan: _Plan = ctx.plan
        lead, k, x_dtype, w_dtype, b_dtype = ctx.meta
        g2 = grad.reshape(-1, grad.shape[-1])
        dev = grad.device
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and x8t is not None
        g8, g8t = cast_pair(g2, 1.0 / plan.g_scale, plan.g_dtype, write_row=need_gx, write_col=need_gw)
        gx = gw = gb = None
        if need_gx:
            gx = _mm(g8, w8t.t(), _const(plan.beta_x * plan.g_scale, dev), s_w, x_dtype, fast=False)
            gx = gx.reshape(*lead, k)
        if need_gw:
            gw = _mm(g8t, x8t.t(), _const(plan.beta_w * plan.g_scale, dev), _const(plan.x_scale, dev),
                     w_dtype, fast=False)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = (g2.sum(0, dtype=torch.float32) * plan.beta_b).to(b_dtype)
        return gx, gw, gb, None, None


class Fp8Backend(Exact):
    """Linears on FP8 tensor cores via ``torch._scaled_mm`` with static power-of-two scales.

    weight_format / activation_format / grad_format: "fp8_e4b" (E4M3) or "fp8_e5b" (E5M2), aliases
    accepted; no GEMM may pair E5M2 with E5M2 (unsupported by the hardware). activation_scale, grad_scale,
    weight_static_scale: the fixed dequantisation scales s (powers of two; 1 for unit-scaled tensors).
    weight_scale: "static", "pow2_amax" or "pow2_rms" (per cast, from the weight; ``precision.scales``).
    dispatch: the shape rule sending small linears to the compute dtype.
    """

    name = "fp8"

    def __init__(
        self,
        weight_format: str = "fp8_e4b",
        activation_format: str = "fp8_e4b",
        grad_format: str = "fp8_e5b",
        *,
        weight_scale: WeightScale = "static",
        activation_scale: float = 1.0,
        grad_scale: float = 1.0,
        weight_static_scale: float = 1.0,
        dispatch: Dispatch | None = None,
    ) -> None:
        given = {"weight": weight_format, "activation": activation_format, "grad": grad_format}
        self.formats = {role: _fp8_dtype(role, fmt) for role, fmt in given.items()}
        e5 = torch.float8_e5m2
        pairs = {"forward (weight × activation)": ("weight", "activation"),
                 "dgrad (grad × weight)": ("grad", "weight"),
                 "wgrad (grad × activation)": ("grad", "activation")}
        for gemm, (r1, r2) in pairs.items():
            if self.formats[r1] == e5 and self.formats[r2] == e5:
                raise ValueError(f"{gemm} would multiply E5M2 by E5M2, which _scaled_mm does not run; "
                                 "use fp8_e4b for one of them")
        self.weight_scale = check_weight_scale(weight_scale)
        self.activation_scale = check_pow2("activation_scale", activation_scale)
        self.grad_scale = check_pow2("grad_scale", grad_scale)
        self.weight_static_scale = check_pow2("weight_static_scale", weight_static_scale)
        self.dispatch = Dispatch() if dispatch is None else dispatch

    # Weight copies ----------------------------------------------------------------------------------------
    def weight_fp8(
        self, weight: Tensor, dtype: torch.dtype, compute: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(q(W/s_w) [N, K], its transpose [K, N] contiguous, s_w), cast from ``weight`` as it is now.

        Never cached across calls: the forward casts once and saves the copy for its own backward.
        """
        if self.weight_scale == "static":
            s_w = _const(self.weight_static_scale, weight.device)
            inv: float | Tensor = 1.0 / self.weight_static_scale
        else:
            s_w = weight_scale(weight.to(compute), self.weight_scale, torch.finfo(dtype).max)
            inv = 1.0 / s_w
        w8, w8t = cast_pair(weight.detach(), inv, dtype, round_to=compute)
        return w8, w8t, s_w

    # The backend protocol ----------------------------------------------------------------------------------
    def linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        alpha: float = 1.0,
        beta_x: float = 1.0,
        beta_w: float = 1.0,
        beta_b: float = 1.0,
    ) -> Tensor:
        """y = alpha · x Wᵀ + bias on FP8 GEMMs where :class:`Dispatch` allows, else as :class:`Exact`."""
        if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
            raise ValueError(
                f"linear: input feature size {x.shape[-1]} does not match weight shape {tuple(weight.shape)}"
            )
        compute = _compute_dtype(x)
        k, n = x.shape[-1], weight.shape[0]
        m = x.numel() // k if k else 0
        if compute not in COMPUTE_DTYPES or not self.dispatch.use_fp8(m, k, n) or not fp8_supported(x.device):
            return super().linear(x, weight, bias, alpha=alpha, beta_x=beta_x, beta_w=beta_w, beta_b=beta_b)
        grad_on = torch.is_grad_enabled()
        plan = _Plan(
            alpha=float(alpha), beta_x=float(beta_x), beta_w=float(beta_w), beta_b=float(beta_b),
            compute=compute, x_dtype=self.formats["activation"], w_dtype=self.formats["weight"],
            g_dtype=self.formats["grad"], x_scale=self.activation_scale, g_scale=self.grad_scale,
            need_gx=grad_on and x.requires_grad, need_gw=grad_on and weight.requires_grad,
        )
        return _Fp8Linear.apply(x, weight, bias, plan, self)

    def __repr__(self) -> str:
        names = {v: k for k, v in FP8_FORMATS.items()}
        w, a, g = (names[self.formats[r]] for r in ("weight", "activation", "grad"))
        return (f"Fp8Backend(weight={w}, activation={a}, grad={g}, weight_scale={self.weight_scale!r}, "
                f"dispatch={self.dispatch})")


def _fp8_dtype(role: str, name: str) -> torch.dtype:
    fmt = get_format(name).name
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 backend: {role} format {name!r} is not run by FP8 tensor cores; "
                         f"accepted: {', '.join(FP8_FORMATS)} (aliases e4m3, e5m2)")
    return FP8_FORMATS[fmt]


@cache
def _warn_no_fp8_cores() -> None:
    warnings.warn("unitscale: this CUDA device has no FP8 tensor cores (sm_89+); fp8-recipe linears run "
                  "in the compute dtype (Recipe.fp8() simulates FP8 instead)", stacklevel=4)


@cache
def _shared(weight_format: str, activation_format: str, grad_format: str, grad_scale: float,
            weight_scale: WeightScale) -> Fp8Backend:
    return Fp8Backend(weight_format, activation_format, grad_format, grad_scale=grad_scale,
                      weight_scale=weight_scale)


def fp8_backend_for(module: torch.nn.Module, recipe: Any) -> Fp8Backend:
    """The backend ``precision.apply`` gives a module under an fp8-backend recipe (shared per recipe).

    Uses the recipe's formats and weight scale, static unit scales for activations and gradients and the
    default :class:`Dispatch`. A static loss scale S
    makes every gradient S times larger than unit, so gradients get the static scale 2^round(log2 S).
    Stochastic gradient rounding has no hardware path and raises ValueError.
    """
    if getattr(recipe, "grad_rounding", "nearest") != "nearest":
        raise ValueError(f"fp8 backend: grad_rounding {recipe.grad_rounding!r} is not supported; "
                         "accepted: 'nearest' (use the simulate backend for stochastic rounding)")
    formats = (recipe.weight_format, recipe.activation_format, recipe.grad_format)
    if any(f is None for f in formats):
        raise ValueError(f"fp8 backend: recipe {recipe.name!r} must set weight, activation and grad formats, "
                         f"got {formats}")
    if torch.cuda.is_available() and not fp8_supported("cuda"):
        _warn_no_fp8_cores()
    loss_scale = getattr(recipe, "loss_scale", None)
    grad_scale = 2.0 ** round(math.log2(loss_scale)) if loss_scale else 1.0
    return _shared(*formats, grad_scale, getattr(recipe, "weight_scale", "static"))
