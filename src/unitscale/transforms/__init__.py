"""``unit_scale(model, example_inputs)``: an existing PyTorch model rewritten with unit-scaled ops
(docs/theory.md, Converting existing models; docs/convert.md).

The model is deep-copied and captured with ``torch.export`` (non-strict: Hugging Face models included), at
the level of ATen ops, with every node's module path. Each op is rewritten by the rules of the ``_rules*``
modules, tracking per tensor the static factor c = converted / original, so that with ``init="keep"`` the
converted model computes what the original computes (weights absorb c) — checked on the example before the
model is returned.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from unitscale import rules as scale_rules
from unitscale.scale import check_constraint
from unitscale.transforms import _capture
from unitscale.transforms._check import calibrate_ties, verify
from unitscale.transforms._convert import Converter, Info, Options
from unitscale.transforms._modules import (
    AttentionAt,
    BatchNormAt,
    ConvAt,
    DropoutAt,
    LinearAt,
    MatmulAt,
    attention_at,
    matmul_at,
    softmax_at,
)
from unitscale.transforms._regions import BUILTIN_MODULE_RULES, NAMED_RULES, Site, check_rules
from unitscale.transforms._result import UnitScaled, build

__all__ = [
    "BUILTIN_MODULE_RULES",
    "NAMED_RULES",
    "AttentionAt",
    "BatchNormAt",
    "ConvAt",
    "DropoutAt",
    "Info",
    "LinearAt",
    "MatmulAt",
    "Site",
    "UnitScaled",
    "attention_at",
    "matmul_at",
    "softmax_at",
    "unit_scale",
]

INITS = ("keep", "unit")
RESCALES = ("weights", "activations", "none")
TAU_RULES = ("match", "running_mean")


def _check_tau(name: str, tau: Any) -> float:
    return scale_rules.check_tau(tau, name=name)


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
    rules: Mapping[Any, Any] | None = None,
    dynamic: bool = True,
) -> UnitScaled:
    """A unit-scaled copy of ``model`` (``model`` itself is not modified).

    The copy is a new object (an ``fx.GraphModule``, :class:`UnitScaled`): same parameter names
    (``state_dict`` keys, optimizer groups), same call signature and output type, the original's public
    attributes (``config`` …) reachable on it; methods other than ``forward`` (``generate`` …) are not.
    ``init="keep"`` (pretrained models): outputs equal the original's (float rounding aside, checked on the
    example); every parameter's gradient is the original gradient times one constant per tensor (Theorem
    5.2; tied parameters included). ``init="unit"``: the same architecture with unit ops and every
    parameter re-drawn (weights, tables, cls tokens N(0, 1), biases 0, norm gains 1).

    example_inputs: one batch (Tensor, tuple of positional inputs, or dict of keyword inputs), required:
        the model is captured running it (``torch.export``), with batch and sequence sizes left dynamic.
        It fixes the reference sizes of size-dependent scales (softmax width, key length, matmul dims),
        τ for ``tau="match"`` and ``rescale="activations"``. Arguments it leaves out keep their defaults.
    constraint: resolution on non-cut edges (``"gmean"`` paper default, ``"to_output"`` u-μP); ops whose
        input edges are all cut (e.g. the classifier after the last residual) are unconstrained.
    tau: residual weight: a float for every residual, ``"match"`` (τ = r²/(1+r²), r = σ(branch)/σ(skip)
        on the example), ``"running_mean"`` (τ_l = 1/(l+2)), or None: ``tau_attention`` for branches
        containing attention, ``tau_mlp`` otherwise.
    rescale: how ``init="keep"`` spreads the factors: ``"weights"`` makes every converted weight matrix and
        embedding table unit-RMS, ``"activations"`` makes linear/embedding/norm outputs unit σ on the
        example, ``"none"`` keeps the original activations (c = 1 after every linear).
    grad_rows: tokens that carry gradient per batch (batch × mean non-padding tokens) for the weight-
        gradient scales; or give ``attention_mask`` to take its sum (token-level ops only).
    strict: ops without a rule raise ValueError naming each (op, module path, source line); with False a
        warning lists them and they stay plain at the original scale (outputs still match).
    rules: rules for your own modules and ops: ``{ModuleClass or "package.Class" or torch.ops.aten.op:
        rule}``, a rule being a built-in name (``"gelu_tanh"``, ``"silu"``, ``"identity"`` …) or a function
        of a :class:`Site` returning ``(fn, factor)`` (docs/convert.md, "Your own rules").
    dynamic: capture with symbolic batch and sequence sizes, so the result runs at other sizes (default);
        False captures at the example's sizes only, several times faster.
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
    user_rules = check_rules(rules)
    token_rows = None
    if attention_mask is not None:
        if grad_rows is not None:
            raise ValueError("give either grad_rows or attention_mask, not both")
        grad_rows, token_rows = float(attention_mask.sum()), attention_mask.numel()
    grad_rows = scale_rules.check_grad_rows(grad_rows)
    if example_inputs is None:
        raise ValueError(
            "unit_scale needs example_inputs (one batch, as the model is called): the model is captured "
            "with torch.export running it"
        )
    args, kwargs = _capture.split_inputs(example_inputs)
    captured = _capture.capture(model, args, kwargs, dynamic)
    stats = _capture.record(captured, with_std=tau == "match" or rescale == "activations")
    keep = init == "keep"
    with warnings.catch_warnings():  # torch's own deprecation inside deepcopy of export's pytree specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        reference = copy.deepcopy(captured.gm) if keep else None  # the original function, for the checks
    opts = Options(keep, constraint, tau, tau_attention, tau_mlp, rescale, grad_rows, token_rows, strict,
                   user_rules)  # fmt: skip
    conv = Converter(captured, model, opts, stats)
    graph = conv.run()
    if conv.info.unsupported:
        listing = "; ".join(conv.info.unsupported)
        message = f"unit_scale: {len(conv.info.unsupported)} op(s) have no unit-scaling rule: {listing}"
        if strict:
            raise ValueError(
                message + " (strict=False keeps them plain, with a warning; rules={...} adds rules)"
            )
        warnings.warn(message + "; kept plain at the original scale", stacklevel=2)
    out = build(captured, model, graph, conv.install)
    out.unit_scale_info = conv.info
    if keep:
        flat = _capture.flat_inputs(captured)
        out.eval()
        calibrate_ties(conv, reference, out, flat)
        verify(conv, reference, out, flat)
    out.train(model.training)
    return out
