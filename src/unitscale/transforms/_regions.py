"""Rules above single ops: a module call replaced by one unit op (``rules={...}`` of ``unit_scale`` and the
built-in Hugging Face activations that write GELU out of tanh/pow/mul), and the RMSNorm pattern
x·rsqrt(mean(x²) + eps)·w that Hugging Face models write by hand.

A *user rule* receives a :class:`Site` and returns ``(fn, factor)``: the converted graph calls ``fn`` on the
converted inputs (the module's one input, or the op's arguments) and ``factor`` is the factor of its
output (converted = factor × original). A string names a built-in unit op: ``"relu"``, ``"gelu"``,
``"gelu_tanh"``, ``"silu"``, ``"tanh"``, ``"sigmoid"`` or ``"identity"``. With ``init="keep"`` the
conversion checks on the example that every converted tensor is its factor × the original, so a wrong
rule is reported, never silently applied.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from unitscale import rules
from unitscale.scale import scaled
from unitscale.transforms._capture import module_stack
from unitscale.transforms._convert import Converter, Result, as_tensor_meta
from unitscale.transforms._graph import is_metadata

aten = torch.ops.aten

BUILTIN_MODULE_RULES: dict[str, str] = {
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.GELUTanh": "gelu_tanh",
    "transformers.activations.FastGELUActivation": "gelu_tanh",
    "transformers.activations.AccurateGELUActivation": "gelu_tanh",
    "transformers.activations.PytorchGELUTanh": "gelu_tanh",
    "transformers.activations.GELUActivation": "gelu",
    "transformers.activations.SiLUActivation": "silu",
    "transformers.activations.LinearActivation": "identity",
}
NAMED_RULES = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "identity")


@dataclass(frozen=True)
class Site:
    """One call a user rule converts.

    path: module path of the call; module: the original module (module rules) or None; target: the module
    class or the ATen op; factors: the factor of each tensor input (converted = factor × original, all 1
    with ``init="unit"``); shapes: their shapes on the example; keep: ``init == "keep"``; constraint: the
    one the op should use on its inputs (None where every input edge is cut).
    """

    path: str
    module: nn.Module | None
    target: Any
    factors: tuple[float, ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    keep: bool
    constraint: str | None


def check_rules(rules: Mapping[Any, Any] | None) -> dict[Any, Any]:
    """Validate ``unit_scale(rules=...)``: keys module classes, 'package.Class' names or ATen ops; values
    callables or built-in rule names."""
    out = {}
    for key, rule in (rules or {}).items():
        ok_key = isinstance(key, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or (
            isinstance(key, type) and issubclass(key, nn.Module)
        )
        if not ok_key:
            raise ValueError(f"rules: key {key!r} must be an nn.Module class, a 'package.Class' name or an "
                             "ATen op (torch.ops.aten.erf or torch.ops.aten.erf.default)")  # fmt: skip
        if not (callable(rule) or rule in NAMED_RULES):
            raise ValueError(
                f"rules: rule {rule!r} for {key!r} must be callable or one of {', '.join(NAMED_RULES)}"
            )
        out[key] = rule
    return out


def _qualnames(module: nn.Module) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__]


def module_rule(module: nn.Module | None, user: Mapping[Any, Any]) -> Any:
    """The rule for a module call: a user rule (class via isinstance, or name anywhere in its MRO), else a
    built-in one."""
    if module is None:
        return None
    names = _qualnames(module)
    for key, rule in user.items():
        if (isinstance(key, type) and isinstance(module, key)) or (isinstance(key, str) and key in names):
            return rule
    return next((BUILTIN_MODULE_RULES[n] for n in names if n in BUILTIN_MODULE_RULES), None)


def plan(cv: Converter) -> None:
    """Mark the nodes that module rules, the RMSNorm pattern and user op rules take over."""
    user = cv.o.rules
    for node in cv.gm.graph.nodes:
        if node in cv.live and node.target is aten.rsqrt.default:
            _plan_rms_norm(cv, node)
    _plan_modules(cv, user)
    op_rules = {
        k: v for k, v in user.items() if isinstance(k, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
    }
    for node in cv.gm.graph.nodes:
        rule = op_rules.get(node.target) or op_rules.get(getattr(node.target, "overloadpacket", None))
        if rule is not None and node in cv.live and node not in cv.absorbed:
            cv.special[node] = lambda cv, n, rule=rule: _op_rule(cv, n, rule)


# -- module rules --------------------------------------------------------------------------------------------


def _plan_modules(cv: Converter, user: Mapping[Any, Any]) -> None:
    calls: dict[str, tuple[int, str, list[fx.Node]]] = {}
    for node in cv.gm.graph.nodes:
        if node not in cv.live:
            continue
        for depth, (key, path, _) in enumerate(module_stack(node)):
            calls.setdefault(key, (depth, path, []))[2].append(node)
    for key, (_, path, region) in sorted(calls.items(), key=lambda item: item[1][0]):
        module = _submodule(cv.model, path)
        rule = module_rule(module, user)
        if rule is None or any(n in cv.absorbed or n in cv.special for n in region):
            continue
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes if a not in inside and a in cv.live}
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1 or any(a in cv.param_only for a in inputs):
            cv.info.unsupported.append(
                f"module rule for {type(module).__name__} at '{path}' (call {key}) needs one input and one "
                f"output, found {len(inputs)} and {len(outputs)}"
            )
            continue
        (x,), (out,) = tuple(inputs), outputs
        cv.absorbed |= inside - {out}
        first = next(u for u in x.users if u in inside)
        cv.special[out] = lambda cv, n, x=x, m=module, r=rule, f=first, p=path: _region(cv, n, x, m, r, f, p)


def _region(cv: Converter, out: fx.Node, x: fx.Node, module: nn.Module, rule: Any, first: fx.Node, path: str):
    from unitscale.transforms._rules_ops import activation

    if rule == "identity":
        return cv.arg(first, x), cv.c(x)
    if isinstance(rule, str):
        name, approximate = ("gelu", "tanh") if rule == "gelu_tanh" else (rule, "none")
        new, factor = activation(cv, first, x, name, approximate)
        cv.count(f"module:{type(module).__name__}")
        return new, factor
    site = Site(path, module, type(module), (cv.c(x),), (cv.shape(x),), cv.o.keep, cv.cons(first, x))
    fn, factor = rule(site)
    cv.count(f"user:{type(module).__name__}")
    return cv.call(fn, (cv.arg(first, x),)), float(factor)


def _op_rule(cv: Converter, node: fx.Node, rule: Any) -> Result | None:
    from unitscale.transforms._rules_ops import activation

    tensors = [a for a in node.all_input_nodes]
    if isinstance(rule, str):
        if rule == "identity":
            return cv.arg(node, node.args[0]), cv.c(node.args[0])
        name, approximate = ("gelu", "tanh") if rule == "gelu_tanh" else (rule, "none")
        return activation(cv, node, node.args[0], name, approximate)
    site = Site(_path(node), None, node.target, tuple(cv.c(a) for a in tensors),
                tuple(cv.shape(a) for a in tensors), cv.o.keep, cv.cons(node, *tensors))  # fmt: skip
    fn, factor = rule(site)
    args, kwargs = cv.args(node)
    cv.count(f"user:{node.target}")
    return cv.call(fn, args, kwargs), float(factor)


def _path(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][1] if stack else ""


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


# -- the RMSNorm pattern -----------------------------------------------------------------------------------


def _packet(node: Any) -> Any:
    return getattr(node.target, "overloadpacket", node.target) if isinstance(node, fx.Node) else None


_CASTS = {aten.to, aten._to_copy, aten.type_as}


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that read values (dtype/shape assertions left out)."""
    return [u for u in node.users if not is_metadata(u)]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _plan_rms_norm(cv: Converter, r: fx.Node) -> None:
    """x·rsqrt(mean(x², last dims) + eps) [·w], with casts between: one unit rms_norm (eps·c²)."""
    a = r.args[0]
    if _packet(a) is not aten.add or len(a.args) < 2:
        return
    m, eps = a.args[:2] if isinstance(a.args[0], fx.Node) else a.args[1::-1]
    if not isinstance(eps, numbers.Real) or _packet(m) is not aten.mean or len(m.args) < 3 or not m.args[2]:
        return
    p = m.args[0]
    if _packet(p) is not aten.pow or len(p.args) < 2 or p.args[1] != 2:
        return
    x0 = p.args[0]
    h = _only_user(r)
    if _packet(h) is not aten.mul or set(h.args[:2]) != {x0, r}:
        return
    meta = as_tensor_meta(x0)
    dims = sorted(d % meta.dim() for d in m.args[1]) if meta is not None else []
    if not dims or dims != list(range(meta.dim() - len(dims), meta.dim())):
        return
    inside, out = [p, m, a, r, h], h
    while (nxt := _only_user(out)) is not None and _packet(nxt) in _CASTS:
        inside.append(nxt)
        out = nxt
    weight = None
    nxt = _only_user(out)
    if _packet(nxt) is aten.mul:
        other = nxt.args[1] if nxt.args[0] is out else nxt.args[0]
        if (
            isinstance(other, fx.Node)
            and other in cv.param_only
            and tuple(as_tensor_meta(other).shape) == tuple(meta.shape[dims[0] :])
        ):
            weight, out = other, nxt
            inside.append(nxt)
    if any(u not in inside for n in inside[:-1] for u in _users(n)):
        return  # an intermediate is used outside the pattern
    width = math.prod(int(s) for s in meta.shape[dims[0] :])
    cv.absorbed |= set(inside[:-1])
    cv.special[out] = lambda cv, n: _emit_rms_norm(cv, x0, inside, weight, width)


def _emit_rms_norm(cv: Converter, x: fx.Node, inside: list[fx.Node], weight: Any, width: int) -> Result:
    """The model's own RMSNorm ops (its casts kept: exact, also where it computes in float32) on x brought
    to factor 1, the gain's gradient × rows^-e (``rules.rms_norm_rule``): α = 1, β_x = 1."""
    cv.unit_init(weight, "ones")
    local = {x: cv.comp(cv.arg(inside[0], x), cv.c(x))}
    if weight is not None:
        rows = cv.rows(x, width) or max(math.prod(cv.shape(x) or (width,)) // width, 1)
        beta = rules.rms_norm_rule(rows).betas["weight"]
        local[weight] = cv.call(scaled, (cv.arg(inside[-1], weight), 1.0, beta))
    for node in inside:
        local[node] = cv.graph.node_copy(node, lambda a, n=node: local[a] if a in local else cv.arg(n, a))
    cv.count("rms_norm_pattern")
    return local[inside[-1]], 1.0
