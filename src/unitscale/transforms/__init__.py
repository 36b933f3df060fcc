"""``unit_scale(model)``: an existing PyTorch model rewritten with unit-scaled ops (REFERENCE §1, §2, §4.3).

The model is deep-copied, torch transformer containers are swapped for traceable twins, and torch.fx
traces it with the convertible modules (Linear, Embedding, LayerNorm, Dropout, activations, Softmax,
MultiheadAttention) as leaves. Each node is then rewritten by the rules of ``_convert`` (see its docstring
for the maths), tracking per tensor the static factor c = converted / original so that, with
``init="keep"``, the converted model computes exactly what the original computes (weights absorb c).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, Literal

import torch.fx as fx
from torch import Tensor, nn

from unitscale.scale import check_constraint
from unitscale.transforms import _graph
from unitscale.transforms._convert import Converter, Info, Options
from unitscale.transforms._modules import (
    AttentionAt,
    MatmulAt,
    TraceableTransformerEncoder,
    TraceableTransformerEncoderLayer,
    UnitMultiheadAttention,
    attention_at,
    matmul_at,
    softmax_at,
    traceable,
)

__all__ = [
    "AttentionAt",
    "Info",
    "MatmulAt",
    "TraceableTransformerEncoder",
    "TraceableTransformerEncoderLayer",
    "UnitMultiheadAttention",
    "attention_at",
    "matmul_at",
    "softmax_at",
    "unit_scale",
]

INITS = ("keep", "unit")
RESCALES = ("weights", "activations", "none")
TAU_RULES = ("match", "running_mean")


def _check_tau(name: str, tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {tau!r}")
    return float(tau)


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(
        f"example_inputs must be a Tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def unit_scale(
    model: nn.Module,
    example_inputs: Tensor | tuple | dict | None = None,
    *,
    init: Literal["keep", "unit"] = "keep",
    constraint: Literal["gmean", "to_output"] = "gmean",
    tau: float | Literal["match", "running_mean"] | None = None,
    tau_attention: float = 0.01,
    tau_mlp: float = 0.5,
    rescale: Literal["weights", "activations", "none"] = "weights",
    grad_rows: float | None = None,
    attention_mask: Tensor | None = None,
    strict: bool = True,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """A unit-scaled copy of ``model`` as an ``fx.GraphModule`` (``model`` itself is not modified).

    ``init="keep"`` (pretrained models): outputs equal the original's (float rounding aside); every
    parameter's gradient is the original gradient times one constant per tensor (Theorem 5.2).
    ``init="unit"``: the same architecture built from unit ops with weights N(0, 1), biases 0, gains 1.

    example_inputs: one batch (Tensor, tuple of positional inputs, or dict of keyword inputs). Used to fix
        the reference sizes of size-dependent scales (softmax width, key length, matmul dims), to match τ
        and for ``rescale="activations"``. Without it those ops keep their plain output scale.
    constraint: resolution on non-cut edges (``"gmean"`` paper default, ``"to_output"`` u-μP); ops whose
        input edges are all cut (e.g. the classifier after the last residual) are unconstrained.
    tau: residual weight: a float for every residual, ``"match"`` (τ = r²/(1+r²), r = σ(branch)/σ(skip)
        on the example, REFERENCE §4.3), ``"running_mean"`` (τ_l = 1/(l+2)), or None: ``tau_attention`` for
        branches containing attention, ``tau_mlp`` otherwise.
    rescale: how ``init="keep"`` spreads the factors: ``"weights"`` makes every converted weight matrix and
        embedding table unit-RMS (recipe step 1), ``"activations"`` makes linear/embedding/norm outputs unit
        σ on the example (activation ``mult`` then equals the original pre-activation σ, REFERENCE §4.3),
        ``"none"`` keeps the original activations (c = 1 after every linear).
    grad_rows: tokens that carry gradient per batch (batch × mean non-padding tokens) for the weight-
        gradient scales; or give ``attention_mask`` (with ``example_inputs``) to take its sum. Applied to
        token-level ops only (those whose example row count equals ``attention_mask.numel()``).
    strict: unsupported ops raise ValueError listing each by name and module path; with False a warning
        lists them and they stay plain (inputs brought back to the original scale, so outputs still match).
    concrete_args: forward arguments to fix while tracing (torch.fx), for models whose Python code branches
        on them (``{"token_type_ids": None}``). With ``example_inputs``, arguments the example leaves out are
        fixed to their defaults automatically when the first trace cannot run the example.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    if constraint not in ("gmean", "to_output"):
        check_constraint(constraint)
        raise ValueError(
            f"constraint {constraint!r} not allowed in a residual trunk; accepted: 'gmean', 'to_output'"
        )
    if rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; accepted: {', '.join(RESCALES)}")
    if isinstance(tau, str):
        if tau not in TAU_RULES:
            raise ValueError(
                f"unknown tau rule {tau!r}; accepted: a float in (0, 1), None, {', '.join(TAU_RULES)}"
            )
    elif tau is not None:
        tau = _check_tau("tau", tau)
    tau_attention, tau_mlp = _check_tau("tau_attention", tau_attention), _check_tau("tau_mlp", tau_mlp)
    args, kwargs = _split_inputs(example_inputs)
    needs_example = {"tau='match'": tau == "match", "rescale='activations'": rescale == "activations",
                     "attention_mask": attention_mask is not None}  # fmt: skip
    missing = [name for name, needed in needs_example.items() if needed and example_inputs is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} need example_inputs")
    token_rows = None
    if attention_mask is not None:
        if grad_rows is not None:
            raise ValueError("give either grad_rows or attention_mask, not both")
        grad_rows, token_rows = float(attention_mask.sum()), attention_mask.numel()
    if grad_rows is not None and (isinstance(grad_rows, bool) or not isinstance(grad_rows, (int, float))
                                  or not math.isfinite(grad_rows) or grad_rows <= 0):  # fmt: skip
        raise ValueError(f"grad_rows must be a positive number, got {grad_rows!r}")

    root = traceable(copy.deepcopy(model))
    traced = _trace(model, root, concrete_args)
    stats = None
    if example_inputs is not None:
        try:
            stats = _record(traced, args, kwargs)
        except Exception as err:
            # Python branches on optional arguments (`if x is None`) need them fixed: retry with the
            # defaults of the arguments the example leaves out.
            fixed = _defaults_left_out(root, args, kwargs) | dict(concrete_args or {})
            if not fixed:
                raise ValueError(f"running {type(model).__name__} on example_inputs failed: {err}") from err
            traced = _trace(model, root, fixed)
            stats = _record(traced, args, kwargs)
    opts = Options(
        init == "keep", constraint, tau, tau_attention, tau_mlp, rescale, grad_rows, token_rows, strict
    )
    conv = Converter(traced, opts, stats)
    new_graph = conv.run()
    if conv.info.unsupported:
        listing = "; ".join(conv.info.unsupported)
        message = f"unit_scale: {len(conv.info.unsupported)} op(s) have no unit-scaling rule: {listing}"
        if strict:
            raise ValueError(message + " (strict=False keeps them plain, with a warning)")
        warnings.warn(message + "; kept plain at the original scale", stacklevel=2)
    for path, module in conv.install.items():
        owner = traced
        *scopes, name = path.split(".")
        for scope in scopes:  # fx keeps only the modules its graph called: rebuild a missing scope
            if not hasattr(owner, scope):
                setattr(owner, scope, nn.Module())
            owner = getattr(owner, scope)
        setattr(owner, name, module)
    out = fx.GraphModule(traced, new_graph, class_name=f"Unit{type(model).__name__}")
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    out.unit_scale_info = conv.info
    out.train(model.training)
    return out


def _trace(model: nn.Module, root: nn.Module, concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    try:
        graph = _graph.UnitTracer().trace(root, concrete_args=concrete_args)
    except Exception as err:  # fx raises many kinds; the user needs to know tracing is what failed
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
    return fx.GraphModule(root, graph)


def _record(traced: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    modes = {m: m.training for m in traced.modules()}
    traced.eval()
    try:
        return _graph.record(traced, args, kwargs)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _defaults_left_out(root: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    params = list(inspect.signature(root.forward).parameters.values())[len(args) :]
    return {p.name: p.default for p in params if p.name not in kwargs and p.default is not p.empty}
