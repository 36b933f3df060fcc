"""Precision recipes: which format each matmul input takes, which backend runs it, and per-module overrides.

A recipe is a frozen value: formats for matmul inputs going forward (weights, activations) and for the
matmul output gradient going back, the compute dtype (autocast) and an optional static loss scale. Casts
happen at matmul inputs only; matmul outputs stay in the compute dtype, as in the unit-scaling paper.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch

BACKENDS = ("simulate", "fp8", "int4")
# LSQ cold start of the int4-pretrain recipe: the warm-up of the char-LM runs that chose it
# (docs/results/int4.md); not tuned further.
INT4_PRETRAIN_COLD_START = 75
ROUNDINGS = ("nearest", "stochastic")
# u-μP's "critical matmuls": kept in BF16 when everything else runs in FP8 (attention output projection,
# FFN down projection, the head), for the char-LMs (body.out / body.down), unitscale.nn and BERT-style names.
CRITICAL_MATMULS = (
    "lm_head",
    "*.lm_head",
    "*.body.out",
    "*.body.down",
    "*.attn.out",
    "*.self_attn.out",
    "*.mlp.down",
    "*.attention.output.dense",
    "*.output.dense",
)
HIGH_PRECISION_HEADS = ("lm_head", "*.lm_head", "classifier", "*.classifier", "head", "*.head")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _format_name(name: str | None) -> str | None:
    if name is None:
        return None
    from unitscale.formats import get_format  # late: keeps `import unitscale.precision` light

    return get_format(name).name


@dataclass(frozen=True)
class Recipe:
    """How a model's matmuls run.

    weight_format / activation_format: format of matmul inputs in the forward pass (None: no cast).
    grad_format: format of the matmul output gradient in the backward pass (None: no cast).
    compute_dtype: dtype of the compute (torch.autocast when not float32); master weights stay float32.
    loss_scale: static loss scale S (loss scaled by S going back, gradients divided by S before the step).
    weight_scale: how a weight is scaled for its cast (``precision.scales``): "static" (scale 1, the
    paper's casts) or a power of two computed from the weight at each cast, "pow2_amax" (the FP8 training
    recipes) or "pow2_rms"; simulate and fp8 backends use the same rule.
    backend: "simulate" (quantise in higher precision, any device), "fp8" (torch._scaled_mm on Hopper; falls
    back to simulate elsewhere) or "int4" (Hadamard quantiser + LSQ + bit split, see precision.int4).
    overrides: (glob on the module path, recipe) pairs, first match wins; e.g. ("lm_head", Recipe.bf16()).
    saturate: clamp finite values beyond ±max to ±max when casting (a scaled FP8 cast on hardware; the FP8
    recipes). Off: they overflow to inf (NaN where the format has none), as a real FP16 cast does. Either
    way ±inf and NaN are never made finite (docs/theory.md, Special values and saturation).
    """

    name: str = "custom"
    weight_format: str | None = None
    activation_format: str | None = None
    grad_format: str | None = None
    compute_dtype: torch.dtype = torch.float32
    loss_scale: float | None = None
    weight_scale: str = "static"
    backend: str = "simulate"
    grad_rounding: str = "nearest"
    int4_config: Any = None
    overrides: tuple[tuple[str, Recipe], ...] = field(default=())
    saturate: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if self.grad_rounding not in ROUNDINGS:
            raise ValueError(
                f"unknown grad_rounding {self.grad_rounding!r}; accepted: {', '.join(ROUNDINGS)}"
            )
        if self.compute_dtype not in _DTYPES.values():
            raise ValueError(
                f"unsupported compute_dtype {self.compute_dtype}; accepted: {', '.join(_DTYPES)}"
            )
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ValueError(f"loss_scale must be a positive number or None, got {self.loss_scale!r}")
        from unitscale.precision.scales import check_weight_scale

        check_weight_scale(self.weight_scale)
        for attr in ("weight_format", "activation_format", "grad_format"):
            object.__setattr__(self, attr, _format_name(getattr(self, attr)))
        for pattern, sub in self.overrides:
            if not isinstance(pattern, str) or not isinstance(sub, Recipe):
                raise ValueError(f"overrides must be (glob, Recipe) pairs, got {(pattern, sub)!r}")

    # Named recipes -------------------------------------------------------------------------------------
    @classmethod
    def fp32(cls) -> Recipe:
        return cls(name="fp32")

    @classmethod
    def bf16(cls) -> Recipe:
        return cls(name="bf16", compute_dtype=torch.bfloat16)

    @classmethod
    def fp16(cls, loss_scale: float | None = None) -> Recipe:
        """Real torch fp16 compute (autocast), no loss scale unless given."""
        name = "fp16" if loss_scale is None else "fp16-loss-scaled"
        return cls(name=name, compute_dtype=torch.float16, loss_scale=loss_scale)

    @classmethod
    def fp16_simulated(cls, loss_scale: float | None = None) -> Recipe:
        """fp16 matmul inputs and output gradients simulated in fp32 compute (fast on CPUs)."""
        name = "fp16-sim" if loss_scale is None else "fp16-sim-loss-scaled"
        return cls(
            name=name,
            weight_format="fp16",
            activation_format="fp16",
            grad_format="fp16",
            loss_scale=loss_scale,
        )

    @classmethod
    def fp8(
        cls,
        backend: str = "simulate",
        variant: str = "b",
        loss_scale: float | None = None,
        weight_scale: str = "pow2_amax",
    ) -> Recipe:
        """E4 weights/activations forward, E5 gradients backward (variant "b" = OCP/Hopper, "a" = fnuz).

        Each weight is cast with its own power-of-two scale (``weight_scale="pow2_amax"``, refreshed at every
        cast); activations and gradients with scale 1. ``weight_scale="static"`` gives the unit-scaling
        paper's unscaled casts (:meth:`fp8_paper`).
        """
        if variant not in ("a", "b"):
            raise ValueError(f"unknown FP8 variant {variant!r}; accepted: 'a' (fnuz), 'b' (OCP, Hopper)")
        if backend not in ("simulate", "fp8"):
            raise ValueError(f"Recipe.fp8 backend must be 'simulate' or 'fp8', got {backend!r}")
        e4, e5 = f"fp8_e4{variant}", f"fp8_e5{variant}"
        name = "fp8" if variant == "b" else "fp8-e4a"
        if loss_scale is not None:
            name += "-loss-scaled"
        return cls(
            name=name,
            weight_format=e4,
            activation_format=e4,
            grad_format=e5,
            backend=backend,
            loss_scale=loss_scale,
            saturate=True,
            weight_scale=weight_scale,
        )

    @classmethod
    def fp8_paper(
        cls, backend: str = "simulate", variant: str = "b", loss_scale: float | None = None
    ) -> Recipe:
        """The unit-scaling paper's FP8: every cast, weights included, with scale 1 (its reproductions)."""
        base = cls.fp8(backend=backend, variant=variant, loss_scale=loss_scale, weight_scale="static")
        return dataclasses.replace(base, name=base.name.replace("fp8", "fp8-paper", 1))

    @classmethod
    def fp8_critical_bf16(cls, backend: str = "simulate") -> Recipe:
        """u-μP preset: FP8 everywhere except the critical matmuls (attention out, FFN down, head) in BF16."""
        base = dataclasses.replace(cls.fp8(backend=backend), name="fp8-critical-bf16")
        return base.with_overrides(*((glob, cls.bf16()) for glob in CRITICAL_MATMULS))

    @classmethod
    def int4(cls, config: Any = None) -> Recipe:
        """Every linear-layer matmul on 4-bit integers (HQ + LSQ forward, bit split + LSS backward)."""
        from unitscale.precision.int4 import Int4Config

        config = Int4Config.hq_lss() if config is None else config
        # As in the paper, the classifier / LM head stays in full precision.
        heads = tuple((glob, cls.fp32()) for glob in HIGH_PRECISION_HEADS)
        return cls(
            name="int4",
            weight_format="int4",
            activation_format="int4",
            backend="int4",
            int4_config=config,
            overrides=heads,
        )

    @classmethod
    def int4_pretrain(cls, cold_start_steps: int = INT4_PRETRAIN_COLD_START) -> Recipe:
        """:meth:`int4` for training from scratch: the LSQ step sizes are re-initialised from the data for the
        first ``cold_start_steps`` training calls instead of learned (docs/theory.md, LSQ), so they follow
        the weights and activations while these change fastest."""
        from unitscale.precision.int4 import Int4Config

        config = Int4Config.hq_lss(lsq_cold_start_steps=cold_start_steps)
        return dataclasses.replace(cls.int4(config), name="int4-pretrain")

    @classmethod
    def int4_naive(cls) -> Recipe:
        """LSQ only: no Hadamard rotation, gradients as one stochastically rounded INT4 digit."""
        from unitscale.precision.int4 import Int4Config

        return dataclasses.replace(cls.int4(Int4Config.naive()), name="int4-naive")

    # Per-module control ----------------------------------------------------------------------------------
    def with_overrides(self, *pairs: tuple[str, Recipe | str]) -> Recipe:
        """A copy with (glob, recipe-or-name) overrides appended; first match wins."""
        resolved = tuple((p, get_recipe(r) if isinstance(r, str) else r) for p, r in pairs)
        return dataclasses.replace(self, overrides=self.overrides + resolved)

    def for_module(self, path: str) -> tuple[Recipe, str]:
        """The recipe that governs the module at ``path`` and why ("override 'glob'" or "default")."""
        for pattern, sub in self.overrides:
            if fnmatch.fnmatchcase(path, pattern):
                return sub, f"override {pattern!r}"
        return self, "default"

    @property
    def quantises(self) -> bool:
        return any(f is not None for f in (self.weight_format, self.activation_format, self.grad_format))

    def describe(self) -> str:
        parts = [f"{self.name}: backend={self.backend}", f"compute={str(self.compute_dtype).split('.')[-1]}"]
        if self.quantises:
            parts.append(f"w={self.weight_format} x={self.activation_format} grad={self.grad_format}")
        if self.weight_scale != "static":
            parts.append(f"weight_scale={self.weight_scale}")
        if self.loss_scale is not None:
            parts.append(f"loss_scale={self.loss_scale:g}")
        return ", ".join(parts)


_NAMED = {
    "fp32": Recipe.fp32,
    "bf16": Recipe.bf16,
    "fp16": Recipe.fp16,
    "fp16-loss-scaled": lambda: Recipe.fp16(loss_scale=2048.0),
    "fp16-sim": Recipe.fp16_simulated,
    "fp16-sim-loss-scaled": lambda: Recipe.fp16_simulated(loss_scale=2048.0),
    "fp8": Recipe.fp8,
    "fp8-e4a": lambda: Recipe.fp8(variant="a"),
    "fp8-loss-scaled": lambda: Recipe.fp8(loss_scale=2048.0),
    "fp8-hw": lambda: Recipe.fp8(backend="fp8"),
    "fp8-critical-bf16": Recipe.fp8_critical_bf16,
    "fp8-paper": Recipe.fp8_paper,
    "fp8-paper-e4a": lambda: Recipe.fp8_paper(variant="a"),
    "fp8-paper-loss-scaled": lambda: Recipe.fp8_paper(loss_scale=2048.0),
    "int4": Recipe.int4,
    "int4-pretrain": Recipe.int4_pretrain,
    "int4-naive": Recipe.int4_naive,
}
RECIPE_NAMES: tuple[str, ...] = tuple(_NAMED)


def get_recipe(name: str | Recipe) -> Recipe:
    """The named recipe (see RECIPE_NAMES); a Recipe is returned as is."""
    if isinstance(name, Recipe):
        return name
    try:
        factory = _NAMED[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPE_NAMES)}") from None
    return dataclasses.replace(factory(), name=name)
