"""Rules for shape ops, adds, residuals, products and the other elementwise ops:

shape ops, getitem, max pooling, casts, neg  unchanged              → c
x + f(x)      residual_split at x, residual_add(skip, scaled(f, k, k), τ), k = √((1−τ)/τ)·c_x/c_f
                                                                    → √(1−τ)·c_x
x·cos + rot(x)·sin (rotary position product, rot = rotate-half of x)  plain add  → c_x
a + b (independent, both parameter-dependent)  weighted_add(a, b, c_b/h, c_a/h), h = √(c_a²+c_b²),
                                               inputs over cut edges β 1
                                                                    → c_a·c_b/h
a + const, a − b, masked_fill / where with other values   bring to one factor, plain op
a·b (gated MLP products included), a/b                              → c_a·c_b, c_a/c_b
cat / stack   inputs brought to the first one's factor              → c
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from unitscale import functional as U
from unitscale import rules
from unitscale.scale import scaled
from unitscale.transforms._convert import Converter, Result, as_tensor_meta

aten = torch.ops.aten

PASS = {
    operator.getitem, aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.t,
    aten.contiguous, aten.clone, aten.alias, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze,
    aten.expand, aten.expand_as, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.chunk,
    aten.unbind, aten.narrow, aten.index, aten.index_select, aten.gather, aten.repeat, aten.repeat_interleave,
    aten.flip, aten.roll, aten.movedim, aten._to_copy, aten.to, aten.type_as, aten.neg, aten.detach,
    aten.lift_fresh_copy, aten.diagonal, aten.tril, aten.triu, aten.max_pool1d, aten.max_pool2d,
    aten.max_pool3d,
    aten.max_pool2d_with_indices, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.amax, aten.amin,
    aten.abs, aten.cumsum, aten.pad, aten.constant_pad_nd, aten.zeros_like, aten.new_zeros,
}  # fmt: skip
# Ops with which the rotate-half of a rotary position embedding is written.
_ROTATE = {aten.slice, aten.neg, aten.cat, aten.view, aten.reshape, aten.unflatten, aten.flatten, aten.stack,
           aten.unbind, aten.select, aten.unsqueeze, aten.squeeze, aten.transpose, aten.split, aten.chunk,
           operator.getitem}  # fmt: skip


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


_CASTS = {aten.to, aten._to_copy, aten.type_as}


def _narrowing(node: fx.Node) -> bool:
    """A cast to a float dtype with fewer mantissa bits than its input (float64 → float32 …)."""
    src, dst = as_tensor_meta(node.args[0]), as_tensor_meta(node)
    if src is None or dst is None or not (src.is_floating_point() and dst.is_floating_point()):
        return False
    return torch.finfo(dst.dtype).eps > torch.finfo(src.dtype).eps


def _pass(cv: Converter, node: fx.Node) -> Result | None:
    """Shape ops, casts, zero padding, max pooling: the factor of the first argument passes. A cast to a
    narrower float type (HF's ``.float()`` / ``.to(torch.float32)`` in a float64 model) sees its input at
    factor 1, so it rounds exactly as in the original."""
    if _packet(node) in _CASTS and _narrowing(node):
        return _to_one(cv, node)
    if _packet(node) in (aten.pad, aten.constant_pad_nd):
        value = (
            node.args[3]
            if _packet(node) is aten.pad and len(node.args) > 3
            else (node.args[2] if _packet(node) is aten.constant_pad_nd and len(node.args) > 2 else 0)
        )
        mode = node.args[2] if _packet(node) is aten.pad and len(node.args) > 2 else "constant"
        if mode != "constant" and value not in (0, None):
            return None
        if value not in (0, 0.0, None):
            return _to_one(cv, node)
    return cv.copy(node), cv.c(node.args[0])


def _to_one(cv: Converter, node: fx.Node) -> Result:
    """The plain op on inputs brought back to factor 1."""
    args, kwargs = fx.node.map_arg(
        (node.args, node.kwargs),
        lambda a: cv.comp(cv.arg(node, a), cv.c(a)) if a in cv.live else cv.arg(node, a),
    )
    return cv.graph.create_node(node.op, node.target, args, kwargs), 1.0


def _to_common(cv: Converter, node: fx.Node, values: list) -> Result:
    """The plain op with its live value inputs brought to the factor of the first (1 if a constant or
    an input mixes in)."""
    live = [a for a in values if isinstance(a, fx.Node) and a in cv.live]
    common = cv.c(live[0]) if live and len(live) == len(values) else 1.0

    def fix(a):
        new = cv.arg(node, a)
        return cv.comp(new, cv.c(a), common) if a in live else new

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fix)
    return cv.graph.create_node(node.op, node.target, args, kwargs), common


def _add(cv: Converter, node: fx.Node) -> Result | None:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    r = cv.residuals.get(node)
    if r is not None:
        cs, cb = cv.c(r.skip), cv.c(r.branch)
        k = math.sqrt((1 - r.tau) / r.tau) * cs / cb
        branch = cv.comp(cv.arg(node, r.branch), 1.0, k)
        new = cv.call(U.residual_add, (cv.arg(node, r.skip), branch, r.tau))
        cv.info.residuals.append({"node": new.name, "tau": r.tau, "attention": r.attention})
        cv.count("residual")
        return new, math.sqrt(1 - r.tau) * cs
    if not (a in cv.live and b in cv.live):
        return _to_one(cv, node)
    if _rotary(cv, a, b):
        cv.count("rotary")
        return _to_common(cv, node, [a, b])
    ca, cb = cv.c(a), cv.c(b)
    left, right = _broadcast_scaled(cv, node, a, b)
    # inputs arriving over cut edges (token + position embeddings) take the output gradient unscaled
    cut = {"cut": tuple(side for side, t in (("left", a), ("right", b)) if (t, node) in cv.cut)}
    if not cv.o.keep:  # a sum of n independent unit terms, as nested adds: every term weighs n^-½
        na, nb = cv.terms.get(a, 1), cv.terms.get(b, 1)
        cv.terms[node] = na + nb
        weights = (math.sqrt(na / (na + nb)), math.sqrt(nb / (na + nb)))
        return cv.call(U.weighted_add, (left, right, *weights), cut), 1.0
    norm = math.hypot(ca, cb)
    return cv.call(U.weighted_add, (left, right, cb / norm, ca / norm), cut), ca * cb / norm


def _broadcast_scaled(cv: Converter, node: fx.Node, a: fx.Node, b: fx.Node) -> tuple[fx.Node, fx.Node]:
    """An input broadcast f times (a position table added to every sequence of the batch) receives a
    gradient summed over f copies: on a cut edge its gradient takes f^-½ (``rules.add_rule``)."""
    out = cv.shape(node)
    sizes = [cv.shape(t) for t in (a, b)]
    if out is None or None in sizes:
        return cv.arg(node, a), cv.arg(node, b)
    factors = [math.prod(out) / max(math.prod(s), 1) for s in sizes]
    betas = rules.add_rule(*factors).betas
    new = []
    for t, beta in ((a, betas["left"]), (b, betas["right"])):
        cut = (t, node) in cv.cut
        new.append(cv.call(scaled, (cv.arg(node, t), 1.0, beta)) if cut and beta != 1.0 else cv.arg(node, t))
    return new[0], new[1]


def _products(cv: Converter, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(live factor, constant factor) of a product with a non-live tensor (cos or sin tables)."""
    if _packet(node) is not aten.mul or len(node.args) < 2:
        return None
    x, y = node.args[:2]
    for live, const in ((x, y), (y, x)):
        if live in cv.live and isinstance(const, fx.Node) and const not in cv.live:
            return live, const
    return None


def _rotary(cv: Converter, a: fx.Node, b: fx.Node) -> bool:
    """a + b = x·cos + rotate_half(x)·sin: both sides carry the σ of x (cos² + sin² = 1)."""
    pa, pb = _products(cv, a), _products(cv, b)
    if pa is None or pb is None:
        return False
    for (x, _), (y, _) in ((pa, pb), (pb, pa)):
        if cv.ancestor(x, y) and _only_rotation(cv, x, y):
            return True
    return False


def _only_rotation(cv: Converter, x: fx.Node, y: fx.Node) -> bool:
    between = [n for n in cv.gm.graph.nodes if n is y or (cv.ancestor(x, n) and cv.ancestor(n, y))]
    return all(_packet(n) in _ROTATE for n in between if n in cv.live)


def _sub(cv: Converter, node: fx.Node) -> Result | None:
    if node.kwargs.get("alpha", 1) != 1:
        return None
    return _to_common(cv, node, list(node.args[:2]))


def _mul(cv: Converter, node: fx.Node) -> Result | None:
    """Products (gated MLPs, scalings by constants): factors multiply. With init="unit" the product of two
    independent unit tensors is unit (σ² = E[a²]·E[b²])."""
    a, b = node.args[:2]
    return cv.copy(node), cv.c(a) * cv.c(b)


def _div(cv: Converter, node: fx.Node) -> Result | None:
    if node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args[:2]
    return cv.copy(node), cv.c(a) / cv.c(b)


def _cat(cv: Converter, node: fx.Node) -> Result | None:
    items = node.args[0]
    if not isinstance(items, (list, tuple)):
        return None
    live = [a for a in items if isinstance(a, fx.Node) and a in cv.live]
    target = cv.c(live[0]) if len(live) == len(items) else 1.0
    new = [cv.comp(cv.arg(node, a), cv.c(a), target) if a in live else cv.arg(node, a) for a in items]
    rest = tuple(cv.arg(node, a) for a in node.args[1:])
    return cv.call(node.target, (type(items)(new), *rest), dict(node.kwargs)), target


def _masked_fill(cv: Converter, node: fx.Node) -> Result | None:
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    if isinstance(value, (int, float)) and (value == 0 or math.isinf(value)):
        return _pass(cv, node)
    return _to_one(cv, node)


def _constant(cv: Converter, node: fx.Node) -> Result | None:
    """ones_like / full_like of a live tensor: values independent of it, factor 1."""
    return cv.copy(node), 1.0


def _where(cv: Converter, node: fx.Node) -> Result | None:
    return _to_common(cv, node, list(node.args[1:3]))


RULES = {
    **{op: _pass for op in PASS},
    aten.add: _add,
    aten.sub: _sub,
    aten.rsub: _sub,
    aten.mul: _mul,
    aten.div: _div,
    aten.cat: _cat,
    aten.stack: _cat,
    aten.masked_fill: _masked_fill,
    aten.where: _where,
    aten.ones_like: _constant,
    aten.full_like: _constant,
    aten.new_ones: _constant,
    aten.new_full: _constant,
}
