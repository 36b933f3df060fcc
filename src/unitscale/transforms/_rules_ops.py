"""Rules for nonlinear and size-dependent ops:

activation    α·f(mult·x)/mult with mult = 1/c                   → α·c
softmax       softmax(mult·x), mult = 1/c; α pinned at the example width      → α_ref
a @ b         unit matmul of two activations, α pinned at the example shapes   → c_a·c_b·α_ref
SDPA          logit scale / (c_q·c_k); α pinned at the example key length (GQA: heads repeated)
                                                                 → c_v·α_ref
mean / sum / average pooling over n elements: the sum rule, α = n^-½ on the sum  → α·n·c (mean)
cross-entropy unit cross-entropy of the logits brought to factor 1 (β = V/√(V−1))  → 1
dropout       a module following .train()/.eval(); unit dropout with init="unit"  → c
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from unitscale import functional as U
from unitscale import rules
from unitscale.scale import scaled
from unitscale.transforms._convert import Converter, Result, as_tensor_meta
from unitscale.transforms._modules import AttentionAt, DropoutAt, MatmulAt, softmax_at

aten = torch.ops.aten

UNIT_ACTIVATIONS = {"relu": U.relu, "gelu": U.gelu, "silu": U.silu, "tanh": U.tanh, "sigmoid": U.sigmoid}


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def activation(cv: Converter, node: fx.Node, x: Any, name: str, approximate: str = "none") -> Result:
    """Unit ``name`` activation of x (factor c): α·f(mult·x)/mult with mult = 1/c."""
    mult, constraint = 1.0 / cv.c(x), cv.cons(node, x)
    kwargs: dict[str, Any] = {"mult": mult, "constraint": constraint}
    rule_name = name
    if name == "gelu":
        kwargs["approximate"] = approximate
        rule_name = "gelu" if approximate == "none" else "gelu_tanh"
    alpha = rules.activation_rule(rule_name, mult).resolve(constraint)[0]
    return cv.call(UNIT_ACTIVATIONS[name], (cv.arg(node, x),), kwargs), alpha * cv.c(x)


def _activation_rule(name: str):
    def rule(cv: Converter, node: fx.Node) -> Result | None:
        approximate = _arg(node, 1, "approximate", "none") if name == "gelu" else "none"
        return activation(cv, node, node.args[0], name, approximate)

    rule.__name__ = name
    return rule


_MAX_SOFTMAX_MULT_SQUARED = 50.0


def _softmax(cv: Converter, node: fx.Node) -> Result | None:
    x, dim = node.args[:2]
    dtype = node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
    if node.target is aten._softmax.default:
        dtype = None  # half_to_float: the output dtype is the cast below
    new_x = cv.arg(node, x)
    out = as_tensor_meta(node)
    if out is not None and as_tensor_meta(x) is not None and out.dtype != as_tensor_meta(x).dtype:
        new_x = cv.call(aten.to.dtype, (new_x, out.dtype))
    elif isinstance(dtype, torch.dtype):
        new_x = cv.call(aten.to.dtype, (new_x, dtype))
    mult, constraint = 1.0 / cv.c(x), cv.cons(node, x)
    if mult * mult > _MAX_SOFTMAX_MULT_SQUARED:  # the rule's e^{mult²} would overflow: bring x to factor 1
        new_x, mult = cv.comp(new_x, cv.c(x)), 1.0
    target = None
    if cv.o.keep:
        shape = cv.shape(x)
        target = rules.softmax_rule(shape[dim], mult).resolve(constraint)[0] if shape else 1.0
    kwargs = {"mult": mult, "constraint": constraint, "target": target}
    return cv.call(softmax_at, (new_x, dim), kwargs), target or 1.0


def matmul(cv: Converter, node: fx.Node) -> Result | None:
    """Product of two activations (a module, so precision.apply reaches it); with a non-live operand the
    factor of the live one passes."""
    a, b = node.args[:2]
    if not (a in cv.live and b in cv.live):
        return cv.copy(node), cv.c(a) * cv.c(b)
    constraint = cv.cons(node, a, b)
    target = None
    if cv.o.keep:
        sa, sb = cv.shape(a), cv.shape(b)
        if sa and sb and len(sa) == 1:
            sa = (1, *sa)
        if sa and sb and len(sb) == 1:
            sb = (*sb, 1)
        target = U.matmul_scales(sa, sb, constraint)[0] if sa and sb else 1.0
    left, right = cv.arg(node, a), cv.arg(node, b)
    new = cv.call_new_module(node, MatmulAt(constraint=constraint, target=target), (left, right), "matmul")
    return new, cv.c(a) * cv.c(b) * (target or 1.0)


def _sdpa(cv: Converter, node: fx.Node) -> Result | None:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    p, causal = _arg(node, 4, "dropout_p", 0.0), _arg(node, 5, "is_causal", False)
    scale, gqa = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if isinstance(mask, fx.Node) and mask in cv.live:
        return None  # a learned attention bias: its factor cannot enter the logits
    target = None
    if cv.o.keep:
        shape = cv.shape(k)
        target = rules.attention_rule(shape[-2], p).alpha if shape else 1.0
    module = AttentionAt(logit_factor=1.0 / (cv.c(q) * cv.c(k)), target=target)
    args = (*(cv.arg(node, t) for t in (q, k, v, mask)), p, causal, scale, gqa)
    return cv.call_new_module(node, module, args, "scaled_dot_product_attention"), cv.c(v) * (target or 1.0)


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _cross_entropy(cv: Converter, node: fx.Node) -> Result | None:
    x, target = node.args[:2]
    weight, reduction = _arg(node, 2, "weight"), _arg(node, 3, "reduction", 1)
    ignore, smoothing = _arg(node, 4, "ignore_index", -100), _arg(node, 5, "label_smoothing", 0.0)
    meta, tmeta = as_tensor_meta(x), as_tensor_meta(target)
    if weight is not None or smoothing or meta is None or tmeta is None or tmeta.dtype.is_floating_point:
        return None
    logits = cv.comp(cv.arg(node, x), cv.c(x))
    if meta.dim() > 2:  # torch's class dim is 1; the unit op's is the last
        logits = cv.call(aten.movedim.int, (logits, 1, -1))
    kwargs = {"ignore_index": ignore, "reduction": _REDUCTIONS[reduction]}
    return cv.call(U.cross_entropy, (logits, cv.arg(node, target)), kwargs), 1.0


def _dropout(cv: Converter, node: fx.Node) -> Result | None:
    x, p = node.args[0], _arg(node, 1, "p", 0.5)
    module = DropoutAt(p, unit=not cv.o.keep)
    return cv.call_new_module(node, module, (cv.arg(node, x),), "dropout"), cv.c(x)


def _summed(cv: Converter, node: fx.Node) -> float | None:
    """Elements summed into each output element: the pooling window, or (reductions, adaptive pooling)
    the ratio of the example's input and output sizes."""
    if node.target in _WINDOWED:
        kernel = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        return float(math.prod(kernel * _WINDOWED[node.target] if len(kernel) == 1 else kernel))
    sx, sy = cv.shape(node.args[0]), cv.shape(node)
    if sx is None or sy is None or not math.prod(sy):
        return None
    return math.prod(sx) / math.prod(sy)


_WINDOWED = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


def _reduce(mean: bool):
    def rule(cv: Converter, node: fx.Node) -> Result | None:
        """The sum rule (docs/theory.md, Sum): a sum of n unit terms × n^-½ on the sum; a mean is that sum
        ÷ n, so the mean takes α·n forward and β·n backward."""
        x = node.args[0]
        n = _summed(cv, node)
        if n is None or n < 1:
            return None
        alpha, betas = rules.sum_rule(max(round(n), 1)).resolve(cv.cons(node, x))
        k = n if mean else 1.0
        new = cv.copy(node)
        return cv.call(scaled, (new, alpha * k, betas["input"] * k)), cv.c(x) * alpha * k

    rule.__name__ = "mean" if mean else "sum"
    return rule


RULES = {
    **{
        getattr(aten, f"{name}"): _activation_rule(name)
        for name in ("relu", "gelu", "silu", "tanh", "sigmoid")
    },
    **{
        getattr(aten, f"{name}_"): _activation_rule(name)
        for name in ("relu", "gelu", "silu", "tanh", "sigmoid")
    },
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.cross_entropy_loss.default: _cross_entropy,
    aten.dropout.default: _dropout,
    aten.dropout_.default: _dropout,
    aten.mean.dim: _reduce(mean=True),
    aten.mean.default: _reduce(mean=True),
    aten.sum.dim_IntList: _reduce(mean=False),
    aten.sum.default: _reduce(mean=False),
    aten.avg_pool1d.default: _reduce(mean=True),
    aten.avg_pool2d.default: _reduce(mean=True),
    aten.avg_pool3d.default: _reduce(mean=True),
    aten.adaptive_avg_pool1d.default: _reduce(mean=True),
    aten.adaptive_avg_pool2d.default: _reduce(mean=True),
    aten.adaptive_avg_pool3d.default: _reduce(mean=True),
}
