"""The simulate backend: matmul inputs and output gradients rounded to a format, higher-precision compute."""

from __future__ import annotations

from torch import Tensor

from unitscale.formats import get_format, quantise
from unitscale.precision.backend import Exact, Role
from unitscale.precision.scales import check_weight_scale, weight_scale


class Simulate(Exact):
    """Rounds each matmul input (forward) and each matmul output gradient (backward) to its format.

    ``saturate`` clamps finite values beyond ±max to ±max (a scaled FP8 cast on hardware, set by the FP8
    recipes); without it they overflow to inf (NaN in formats without inf) like a real FP16 cast, so a
    simulated run diverges where the real one does. ±inf and NaN are never made finite. RNE by default,
    stochastic rounding for gradients when asked. Everything else runs in the compute dtype. Weights are cast
    as q(W/s)·s with s from ``precision.scales.weight_scale`` (``weight_scale``: "static" = 1, "pow2_amax",
    "pow2_rms"), the rule the fp8 backend uses, so both backends give the same weight values.
    """

    name = "simulate"

    def __init__(
        self,
        weight_format: str | None,
        activation_format: str | None,
        grad_format: str | None,
        grad_rounding: str = "nearest",
        saturate: bool = False,
        *,
        weight_scale: str = "static",
    ) -> None:
        self.formats = {
            "weight": get_format(weight_format) if weight_format else None,
            "activation": get_format(activation_format) if activation_format else None,
        }
        self.grad_format = get_format(grad_format) if grad_format else None
        self.grad_rounding = grad_rounding
        self.saturate = saturate
        self.weight_scale = check_weight_scale(weight_scale)

    def cast_forward(self, t: Tensor, role: Role) -> Tensor:
        fmt = self.formats[role]
        if fmt is None:
            return t
        if role != "weight" or self.weight_scale == "static":
            return quantise(t, fmt, saturate=self.saturate)
        # Power-of-two s: t/s and q·s are exact in fp32 (the scaled values lie within the format's range).
        s = weight_scale(t, self.weight_scale, fmt.max)
        return (quantise(t.float() / s, fmt, saturate=self.saturate) * s).to(t.dtype)

    def cast_backward(self, grad: Tensor) -> Tensor:
        fmt = self.grad_format
        return grad if fmt is None else quantise(grad, fmt, self.grad_rounding, saturate=self.saturate)

    def __repr__(self) -> str:
        w, a = (f.name if f else None for f in self.formats.values())
        g = self.grad_format.name if self.grad_format else None
        ws = "" if self.weight_scale == "static" else f", weight_scale={self.weight_scale!r}"
        return (
            f"Simulate(weight={w}, activation={a}, grad={g}, grad_rounding={self.grad_rounding!r}, "
            f"saturate={self.saturate}{ws})"
        )
