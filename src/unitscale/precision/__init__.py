"""Precision: recipes, matmul backends and ``apply(model, recipe)``.

``apply`` walks a model and gives every matmul-running module its backend: unitscale modules (instances of
a unitscale class with a ``precision`` attribute, subclasses included) get it directly; ``nn.Linear`` and
its subclasses become ``QuantisedLinear`` (same parameters, same state_dict keys; a subclass keeps its own
class and methods). Modules whose matmuls cannot be reached are reported by name. ``module_filter_fn(module,
fqn) -> bool`` (as in torchao) leaves the modules it rejects untouched.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from unitscale.precision.backend import EXACT, Backend, Exact
from unitscale.precision.recipe import BACKENDS, RECIPE_NAMES, Recipe, get_recipe

__all__ = [
    "BACKENDS",
    "Backend",
    "EXACT",
    "RECIPE_NAMES",
    "Exact",
    "MatmulPlan",
    "QuantisedLinear",
    "Recipe",
    "apply",
    "backend_for",
    "describe",
    "get_recipe",
    "plan",
]

# Modules whose internal matmuls bypass any backend: reported, never silently left unquantised.
_UNREACHABLE = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.Bilinear, nn.modules.conv._ConvNd)
ModuleFilter = Callable[[nn.Module, str], bool]


class QuantisedLinear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs through ``self.precision`` (a backend). Same parameters."""

    precision: Backend

    def forward(self, input: Tensor) -> Tensor:
        return self.precision.linear(input, self.weight, self.bias)

    def to_plain(self) -> nn.Linear:
        """``nn.Linear`` over the same tensors: inference in the compute dtype (``unitscale.export``)."""
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


@cache
def _quantised_class(cls: type) -> type:
    """QuantisedLinear for nn.Linear; for a subclass, one that is both (its own methods first, so a forward
    it overrides still runs and reaches the backend through ``super().forward``)."""
    if cls is nn.Linear or issubclass(cls, QuantisedLinear):
        return QuantisedLinear if cls is nn.Linear else cls
    return type(f"Quantised{cls.__name__}", (cls, QuantisedLinear), {"__module__": cls.__module__})


def _is_unitscale_module(module: nn.Module) -> bool:
    """An instance of a class defined in unitscale (a user's subclass of one included)."""
    return any(c.__module__.split(".")[0] == "unitscale" for c in type(module).__mro__)


@dataclass(frozen=True)
class MatmulPlan:
    """How one matmul-running module will execute: its path, kind, recipe, backend and why."""

    path: str
    kind: str  # "linear" | "attention" | "unreachable"
    recipe: Recipe
    backend: str
    reason: str


def _kind(module: nn.Module) -> str:
    """ "linear", "attention", "conv" (a module may declare ``matmul_kind``) or "unreachable"."""
    if isinstance(module, _UNREACHABLE):
        return "unreachable"
    declared = getattr(module, "matmul_kind", None)
    if declared:
        return declared
    return "linear" if hasattr(module, "in_features") and hasattr(module, "weight") else "attention"


def plan(
    model: nn.Module, recipe: Recipe | str, module_filter_fn: ModuleFilter | None = None
) -> list[MatmulPlan]:
    """Where each matmul of ``model`` will run under ``recipe`` (one rule for apply and describe).

    Matmul-running modules are found by ``isinstance``: unitscale modules holding ``precision``, any
    ``nn.Linear`` (subclasses too) and the unreachable kinds; modules inside an unreachable one (the
    ``out_proj`` of ``nn.MultiheadAttention``, which its forward never calls) are not separate matmuls.
    ``module_filter_fn(module, fqn)`` returning False leaves a module out: its row says so (backend "none").
    """
    recipe = get_recipe(recipe)
    rows: list[MatmulPlan] = []
    inside: list[str] = []  # paths of unreachable modules: their children are covered by their row
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        owns = hasattr(module, "precision") and _is_unitscale_module(module)
        if not (owns or isinstance(module, (nn.Linear, *_UNREACHABLE))):
            continue
        kind = _kind(module)
        if kind == "unreachable":
            inside.append(path)
        sub, why = recipe.for_module(path)
        sub, why = _effective(sub, recipe, why)
        if module_filter_fn is not None and not module_filter_fn(module, path):
            rows.append(MatmulPlan(path, kind, sub, "none", "excluded by module_filter_fn"))
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            rows.append(MatmulPlan(path, "unreachable", sub, "none",
                                   f"{type(module).__name__} is uninitialised: run one forward first"))
            continue
        if kind == "unreachable":
            rows.append(MatmulPlan(path, kind, sub, "none", f"{type(module).__name__} matmuls are internal"))
            continue
        backend = _backend_name(sub, kind)
        if backend != sub.backend and sub.backend == "int4":
            why += f"; {kind} matmuls stay in high precision (INT4 paper: linear layers only)"
        elif sub.backend == "fp8" and backend == "simulate":
            why += "; no CUDA: fp8 falls back to simulate"
        elif sub.backend == "fp8" and backend == "exact":
            why += f"; {kind} matmuls are batched (_scaled_mm is 2-D): torch's fused SDPA, compute dtype"
        if not owns and type(module).forward is not nn.Linear.forward:
            why += f"; {type(module).__name__}.forward reaches the backend only through nn.Linear.forward"
        rows.append(MatmulPlan(path, kind, sub, backend, why))
    return rows


_DTYPE_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _effective(sub: Recipe, top: Recipe, why: str) -> tuple[Recipe, str]:
    """An override asking for another compute dtype than the model's (autocast is global) is simulated:
    its matmul inputs and output gradients are rounded to that dtype, so "keep this layer in BF16" holds."""
    fmt = _DTYPE_FORMATS.get(sub.compute_dtype)
    if sub is top or sub.quantises or sub.compute_dtype == top.compute_dtype or fmt is None:
        return sub, why
    simulated = dataclasses.replace(
        sub, weight_format=fmt, activation_format=fmt, grad_format=fmt, compute_dtype=top.compute_dtype
    )
    return simulated, f"{why}; {fmt} rounding simulated in {str(top.compute_dtype).split('.')[-1]} compute"


def _backend_name(recipe: Recipe, kind: str) -> str:
    if recipe.backend == "int4" and kind != "linear":
        return "exact"
    if recipe.backend == "fp8" and not torch.cuda.is_available():
        return "simulate"
    if recipe.backend == "fp8" and kind == "attention":
        # Fp8Backend runs batched matmuls in the compute dtype anyway; with no backend the attention module
        # calls torch's fused scaled_dot_product_attention (flash attention) instead of matmul-softmax-matmul.
        return "exact"
    if recipe.backend == "simulate" and not recipe.quantises:
        return "exact"
    return recipe.backend


@cache
def _shared_simulate(recipe: Recipe) -> Exact:
    from unitscale.precision.simulate import Simulate

    return Simulate(
        recipe.weight_format,
        recipe.activation_format,
        recipe.grad_format,
        recipe.grad_rounding,
        recipe.saturate,
        weight_scale=recipe.weight_scale,
    )


def backend_for(module: nn.Module, recipe: Recipe, kind: str | None = None) -> Backend | None:
    """The backend object a module should hold under ``recipe`` (shared where stateless)."""
    kind = kind or _kind(module)
    name = _backend_name(recipe, kind)
    if name == "exact":
        return None
    if name == "simulate":
        return _shared_simulate(recipe)
    if name == "int4":
        from unitscale.precision.int4 import Int4Config, int4_backend_for

        # A fan-in that is not a multiple of the Hadamard block is zero-padded by the layer (exact).
        return int4_backend_for(module, recipe.int4_config or Int4Config.hq_lss())
    from unitscale.precision.fp8 import fp8_backend_for  # Hopper only

    return fp8_backend_for(module, recipe)


def _set_backend(module: nn.Module, backend: Backend | None) -> None:
    if "precision" in module._modules:
        del module._modules["precision"]
    if isinstance(backend, nn.Module) and hasattr(module, "weight"):
        backend = backend.to(module.weight.device)
    module.precision = backend


_warned_fp8_fallback = False


def apply(
    model: nn.Module, recipe: Recipe | str, *, module_filter_fn: ModuleFilter | None = None
) -> nn.Module:
    """Give every matmul of ``model`` the backend ``recipe`` asks for (in place; returns ``model``).

    Unitscale modules get the backend in their ``precision`` attribute; ``nn.Linear`` (and subclasses)
    become ``QuantisedLinear`` (same parameters and state_dict keys; a subclass stays an instance of its
    class). Modules with internal matmuls that no backend reaches (nn.MultiheadAttention, convs, RNNs) are
    named in a warning when the recipe quantises them. ``module_filter_fn(module, fqn) -> bool``: modules it
    rejects are left as they are (e.g. ``lambda m, fqn: "lm_head" not in fqn``).
    """
    global _warned_fp8_fallback
    recipe = get_recipe(recipe)
    modules = dict(model.named_modules())
    unreachable = []
    for row in plan(model, recipe, module_filter_fn):
        module = modules[row.path]
        if row.backend == "none" and row.kind != "unreachable":
            continue  # excluded by module_filter_fn
        if row.kind == "unreachable":
            if row.recipe.quantises:
                unreachable.append(f"{row.path or '<root>'} ({type(module).__name__})")
            continue
        if row.recipe.backend == "fp8" and row.backend == "simulate" and not _warned_fp8_fallback:
            warnings.warn(
                "unitscale: no CUDA device, the fp8 backend runs as the simulate backend", stacklevel=2
            )
            _warned_fp8_fallback = True
        if isinstance(module, nn.Linear) and not _is_unitscale_module(module):
            module.__class__ = _quantised_class(type(module))
        backend = backend_for(module, row.recipe, row.kind)
        _set_backend(module, EXACT if backend is None and isinstance(module, QuantisedLinear) else backend)
    if unreachable:
        warnings.warn(
            "unitscale.precision.apply: these modules run matmuls no backend can reach and stay in the "
            f"compute dtype: {', '.join(unreachable)}. Convert them (unitscale.unit_scale) or override them.",
            stacklevel=2,
        )
    model.unitscale_recipe = recipe.name
    return model


def describe(
    model: nn.Module, recipe: Recipe | str, module_filter_fn: ModuleFilter | None = None
) -> str:
    """A table of every matmul in ``model``: the format and backend it runs in under ``recipe``, and why."""
    rows = plan(model, recipe, module_filter_fn)
    width = max([len(r.path) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'kind':<11} {'backend':<9} {'w/x/grad formats':<28} reason"]
    for r in rows:
        fmts = "/".join(
            str(f) for f in (r.recipe.weight_format, r.recipe.activation_format, r.recipe.grad_format)
        )
        if r.backend == "exact":
            fmts = f"({str(r.recipe.compute_dtype).split('.')[-1]})"
        elif r.backend == "int4":
            fmts = "int4/int4/bit-split int4"
        lines.append(f"{r.path or '<root>':<{width}}  {r.kind:<11} {r.backend:<9} {fmts:<28} {r.reason}")
    return "\n".join(lines)
