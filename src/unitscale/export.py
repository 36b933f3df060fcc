"""Export a unit-scaled model to plain PyTorch: every static unit scale folded, no unitscale at inference.

``export(model, *example_args)`` traces ``model`` with torch.fx, with unitscale's functional ops and modules
as leaves, and replaces each leaf by its plain-torch forward (inference semantics only: backward factors
β do not matter, precision backends are dropped, dropout is off):

    unit Linear (α)            → nn.Linear with weight α·W (bias unchanged)
    unit Embedding / LayerNorm / RMSNorm → nn.Embedding / nn.LayerNorm / nn.RMSNorm (same tensors)
    α·act(mult·x)/mult         → torch op, then one constant multiply α/mult
    residual split / add       → identity / √(1−τ)·skip + √τ·branch;  weighted add → a·x + c·y
    unit SDPA                  → F.scaled_dot_product_attention · α(s),  α(s) = √(s/e·(1−p))
    unit softmax / matmul / add → torch op · α(sizes);  cross_entropy → F.cross_entropy
    causal grouped conv (char-LM) → F.pad + nn.Conv1d with weight α·W
    converted models (``unit_scale``): softmax_at / matmul_at / attention_at (functions, or the modules
        MatmulAt / AttentionAt that converted graphs call) → torch op · target
        (unit op · target/α(sizes)); with target=None (init="unit") as the unit op above
    UnitMultiheadAttention      → nn.MultiheadAttention: α of each projection and logit_factor folded
        into in_proj (query part), target·α_o into out_proj; target=None: α(s) applied after out_proj·W

Scales that depend on activation sizes (key length, softmax width, matmul dims, broadcast ratios) are
computed *in the graph* from ``Tensor.size``/``numel``, so one exported model serves every sequence length.
Each such scale is fitted as c·Π nᵢ^kᵢ from the op's own rule in ``unitscale.rules`` (matmul: from
``functional.matmul_scales``), checked at several sizes, so the rule stays in one place. Where the
model's Python code branches on a traced value (a shape check, an RNN unrolled over the sequence), the
trace needs example inputs and specialises on them; each specialisation becomes a ``torch._assert`` guard
in the graph, so a mismatching input fails loudly.

``export_program(model, example_args)`` goes one step further, to a ``torch.export.ExportedProgram``.
The module is callable: ``unitscale.export(model, x)`` is ``unitscale.export.export(model, x)``.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import sys
import types
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import Node, map_arg
from torch.utils._pytree import tree_map

from unitscale import functional as U
from unitscale import nn as unn
from unitscale import rules
from unitscale import scale as S
from unitscale.precision import QuantisedLinear
from unitscale.transforms import _modules as T

__all__ = ["export", "export_program", "unitscale_references"]

_VALUE = "unitscale_example_value"  # node.meta key: the value the node took on the example inputs


# -- scale laws ----------------------------------------------------------------------------------------

_BASE, _PROBES = 64, ((37, 101, 7, 13), (3, 1000, 250, 11))


def power_law(alpha_of: Callable[[Sequence[int]], float], n_sizes: int) -> tuple[float, tuple[float, ...]]:
    """(c, k) with alpha_of(n) = c·Π nᵢ^kᵢ, fitted by doubling each size in turn and checked at two other
    points to 1e-9 relative; ValueError when the rule is not such a power law."""
    base = [_BASE] * n_sizes
    a0 = alpha_of(base)
    ks = []
    for i in range(n_sizes):
        k = math.log2(alpha_of([*base[:i], 2 * _BASE, *base[i + 1 :]]) / a0)
        snapped = round(k * 24) / 24  # exponents of the compendium are multiples of 1/6 or 1/4
        ks.append(snapped if abs(k - snapped) < 1e-9 else k)
    c = a0 / math.prod(_BASE**k for k in ks)
    for probe in _PROBES:
        sizes = [probe[i % len(probe)] for i in range(n_sizes)]
        want, got = alpha_of(sizes), c * math.prod(s**k for s, k in zip(sizes, ks))
        if not math.isclose(want, got, rel_tol=1e-9):
            raise ValueError(f"scale rule is not a power law of its sizes: {want} vs {got} at {sizes}")
    return c, tuple(ks)


def _linear_alpha(module: nn.Module, constraint: Any, readout: bool) -> float:
    """α of a unit Linear module: must not depend on the row count, so that it folds into the weight."""
    out_f, in_f = module.weight.shape
    rule = rules.readout_rule if readout else rules.linear_rule

    def alpha(rows: float) -> float:
        return rule(in_f, out_f, rows).resolve(None if readout else constraint)[0]

    if not math.isclose(alpha(1), alpha(10**6), rel_tol=1e-12):
        raise ValueError(f"linear scale depends on the row count ({alpha(1)} vs {alpha(10**6)}); cannot fold")
    return alpha(1)


# -- graph building --------------------------------------------------------------------------------------


class _Builder:
    """Emits plain-torch nodes into ``graph`` and collects the new root's modules and tensors."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.graph, self.root = graph, root
        self.attrs: dict[str, Any] = {}  # target → module or Parameter of the exported root
        self._clones: dict[int, nn.Parameter] = {}

    def clone(self, t: Tensor) -> nn.Parameter:
        """One detached copy per original tensor, so tied weights stay tied in the export."""
        if id(t) not in self._clones:
            self._clones[id(t)] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        return self._clones[id(t)]

    def fn(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        return self.graph.call_function(target, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        return self.graph.call_method(name, args, kwargs)

    def module(self, target: str, module: nn.Module, *args: Any) -> Node:
        self.attrs[target] = module
        return self.graph.call_module(target, args)

    def mul(self, x: Node, factor: float) -> Node:
        return x if factor == 1.0 else self.fn(operator.mul, x, factor)

    def scale(
        self, x: Node, alpha_of: Callable[[Sequence[int]], float], sizes: Sequence[Callable[[], Any]]
    ) -> Node:
        """x · alpha(sizes), with alpha = c·Π nᵢ^kᵢ computed in the graph (only sizes with kᵢ ≠ 0)."""
        c, ks = power_law(alpha_of, len(sizes))
        expr = None
        for k, size in zip(ks, sizes):
            if k == 0:
                continue
            n = size()
            if not isinstance(n, Node):  # a static size folds into the constant
                c *= n**k
                continue
            term = n if k == 1 else self.fn(operator.pow, n, k)
            expr = term if expr is None else self.fn(operator.mul, expr, term)
        if expr is None:
            return self.mul(x, c)
        factor = expr if c == 1.0 else self.fn(operator.mul, expr, c)
        return self.fn(operator.mul, x, factor)

    def rows(self, x: Node, dim: int = -1) -> Node:
        """numel(x)/size(dim): the rows a broadcasting op sees (a float in the graph)."""
        return self.fn(operator.truediv, self.method("numel", x), self.method("size", x, dim))

    def size(self, node: Any, dim: int) -> int | Node:
        """A weight-like argument's size: static for a get_attr tensor, else computed in the graph."""
        if isinstance(node, Node) and node.op == "get_attr":
            return _fetch(self.root, node.target).shape[dim]
        return self.method("size", node, dim)


def _fetch(root: nn.Module, target: str) -> Any:
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _bind(fn: Callable, node: Node) -> dict[str, Any]:
    bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _const(value: Any, name: str, op: str) -> Any:
    if isinstance(value, Node):
        raise ValueError(f"export: {op} needs a constant {name}, got the traced value {value}")
    return value


# -- converters: unitscale functions -------------------------------------------------------------------


def _linear_fn(b: _Builder, node: Node, readout: bool) -> Node:
    p = _bind(U.linear_readout if readout else U.linear, node)
    weight = p["weight"]
    rule = rules.readout_rule if readout else rules.linear_rule
    constraint = None if readout else _const(p["constraint"], "constraint", "linear")
    y = b.scale(
        b.fn(F.linear, p["input"], weight),
        lambda s: rule(s[0], s[1], s[2]).resolve(constraint)[0],
        [lambda: b.size(weight, 1), lambda: b.size(weight, 0), lambda: b.rows(p["input"])],
    )
    return y if p["bias"] is None else b.fn(operator.add, y, p["bias"])


def _matmul(b: _Builder, left: Node, right: Node, constraint: Any) -> Node:
    """torch.matmul · α, α from ``U.matmul_scales`` in the graph. Only the broadcast counts are taken here:
    left (…, r, m) @ right (…, m, n) has the α of (x, 1, r, m) @ (1, y, m, n), x (y) = how often right
    (left) is repeated over the broadcast batch, = batch(out) / batch(right (left))."""
    y = b.fn(torch.matmul, left, right)

    def batch(t: Node) -> Node:
        return b.fn(operator.truediv, b.rows(t, -1), b.method("size", t, -2))

    sizes = [
        lambda: b.fn(operator.truediv, batch(y), batch(right)),
        lambda: b.fn(operator.truediv, batch(y), batch(left)),
        lambda: b.method("size", left, -2),
        lambda: b.method("size", left, -1),
        lambda: b.method("size", right, -1),
    ]
    return b.scale(
        y, lambda s: U.matmul_scales((s[0], 1, s[2], s[3]), (1, s[1], s[3], s[4]), constraint)[0], sizes
    )


def _matmul_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.matmul, node)
    return _matmul(b, p["left"], p["right"], _const(p["constraint"], "constraint", "matmul"))


def _embedding_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.embedding, node)
    return b.fn(F.embedding, p["input"], p["weight"], p["padding_idx"])


def _layer_norm_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.layer_norm, node)
    shape = p["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return b.fn(F.layer_norm, p["input"], shape, p["weight"], p["bias"], p["eps"])


def _rms_norm_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.rms_norm, node)
    shape = p["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return b.fn(F.rms_norm, p["input"], shape, p["weight"], p["eps"])


_TORCH_ACTIVATIONS: dict[str, Callable] = {
    "relu": torch.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def _activation(
    b: _Builder, x: Node, name: str, mult: float, constraint: Any, approximate: str = "none"
) -> Node:
    """α·act(mult·x)/mult as act(mult·x) · (α/mult)."""
    rule_name = name if approximate == "none" else "gelu_tanh"
    alpha = rules.activation_rule(rule_name, mult).resolve(constraint)[0]
    h = b.mul(x, mult)
    y = b.fn(F.gelu, h, approximate=approximate) if name == "gelu" else b.fn(_TORCH_ACTIVATIONS[name], h)
    return b.mul(y, alpha / mult)


def _activation_fn(name: str) -> Callable[[_Builder, Node], Node]:
    def convert(b: _Builder, node: Node) -> Node:
        p = _bind(getattr(U, name), node)
        op = f"U.{name}"
        return _activation(
            b,
            p["input"],
            name,
            _const(p["mult"], "mult", op),
            _const(p["constraint"], "constraint", op),
            _const(p.get("approximate", "none"), "approximate", op),
        )

    return convert


def _softmax(b: _Builder, x: Node, dim: int, mult: float, constraint: Any) -> Node:
    y = b.fn(torch.softmax, b.mul(x, mult), dim)
    return b.scale(
        y, lambda s: rules.softmax_rule(s[0], mult).resolve(constraint)[0], [lambda: b.method("size", x, dim)]
    )


def _softmax_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.softmax, node)
    return _softmax(b, p["input"], _const(p["dim"], "dim", "softmax"), p["mult"], p["constraint"])


def _cross_entropy_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.cross_entropy, node)
    logits, target, ignore = (
        p["input"],
        p["target"],
        _const(p["ignore_index"], "ignore_index", "cross_entropy"),
    )
    reduction, grad_rows = p["reduction"], p["grad_rows"]
    flat = b.method("reshape", logits, -1, b.method("size", logits, -1))
    if reduction == "none":
        loss = b.fn(
            F.cross_entropy, flat, b.method("reshape", target, -1), ignore_index=ignore, reduction="none"
        )
        return b.method("reshape", loss, b.method("size", target))
    total = b.fn(F.cross_entropy, flat, b.method("reshape", target, -1), ignore_index=ignore, reduction="sum")
    if reduction == "sum":
        return total
    if grad_rows is not None:
        return b.fn(operator.truediv, total, float(grad_rows))
    # As U.cross_entropy: divide by the non-ignored rows, at least 1 (0, not NaN, when every row is ignored).
    count = b.method("clamp", b.method("sum", b.fn(operator.ne, target, ignore)), min=1)
    return b.fn(operator.truediv, total, count)


def _dropout(b: _Builder, x: Node, p: float, training: bool) -> Node:
    if not training or p == 0:
        return x
    return b.mul(b.fn(F.dropout, x, p, True), rules.dropout_rule(p).alpha)


def _dropout_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.dropout, node)
    return _dropout(
        b, p["input"], _const(p["p"], "p", "dropout"), _const(p["training"], "training", "dropout")
    )


def _add_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.add, node)
    left, right, constraint = p["left"], p["right"], p["constraint"]
    y = b.fn(operator.add, left, right)
    # broadcast factor of an input = numel(out)/numel(input)
    sizes = [
        lambda t=t: b.fn(operator.truediv, b.method("numel", y), b.method("numel", t)) for t in (left, right)
    ]
    return b.scale(y, lambda s: rules.add_rule(*s).resolve(constraint)[0], sizes)


def _weighted(b: _Builder, left: Node, right: Node, a: float, c: float) -> Node:
    return b.fn(torch.add, b.mul(left, a), right, alpha=c)


def _weighted_add_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.weighted_add, node)
    a, c = (_const(p[k], k, "weighted_add") for k in ("left_weight", "right_weight"))
    return _weighted(b, p["left"], p["right"], a, c)


def _residual_split_fn(b: _Builder, node: Node) -> tuple[Node, Node]:
    x = _bind(U.residual_split, node)["input"]
    return x, x


def _residual_add_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.residual_add, node)
    tau = _const(p["tau"], "tau", "residual_add")
    if tau == 1:
        return p["branch"]
    r = rules.residual_rule(tau)
    return _weighted(b, p["skip"], p["branch"], r.betas["skip"], r.betas["branch"])


def _attention_alpha(b: _Builder, y: Node, key: Node, dropout_p: float) -> Node:
    """y · α(s) of unit SDPA, s = key length (key (…, s, d))."""
    return b.scale(
        y, lambda s: rules.attention_rule(s[0], dropout_p).alpha, [lambda: b.method("size", key, -2)]
    )


def _sdpa_fn(b: _Builder, node: Node) -> Node:
    p = _bind(U.scaled_dot_product_attention, node)
    dropout_p = _const(p["dropout_p"], "dropout_p", "scaled_dot_product_attention")
    y = b.fn(
        F.scaled_dot_product_attention,
        p["query"],
        p["key"],
        p["value"],
        p["attn_mask"],
        dropout_p,
        p["is_causal"],
        scale=p["scale"],
    )
    return _attention_alpha(b, y, p["key"], dropout_p)


def _scaled_fn(b: _Builder, node: Node) -> Node:
    p = _bind(S.scaled, node)
    return b.mul(p["x"], float(_const(p["fwd"], "fwd", "scaled")))


def _shared_fn(b: _Builder, node: Node) -> Node:
    return _bind(S.shared, node)["param"]  # identity going forward


# -- converters: ops of converted models (unitscale.transforms) ---------------------------------------------
# ``*_at`` ops are the unit op times target/α(sizes): with a target that is torch op · target (a constant),
# with target=None (init="unit") the plain unit op, α(sizes) computed in the graph as above.


def _softmax_at_fn(b: _Builder, node: Node) -> Node:
    p = _bind(T.softmax_at, node)
    x, op = p["input"], "softmax_at"
    dim, mult, constraint, target = (_const(p[k], k, op) for k in ("dim", "mult", "constraint", "target"))
    if target is None:
        return _softmax(b, x, dim, mult, constraint)
    return b.mul(b.fn(torch.softmax, b.mul(x, mult), dim), target)


def _matmul_at_fn(b: _Builder, node: Node) -> Node:
    return _matmul_at(b, _bind(T.matmul_at, node))


def _matmul_at(b: _Builder, p: dict[str, Any]) -> Node:
    constraint, target = (_const(p[k], k, "matmul_at") for k in ("constraint", "target"))
    if target is None:
        return _matmul(b, p["left"], p["right"], constraint)
    return b.mul(b.fn(torch.matmul, p["left"], p["right"]), target)


def _attention_at_fn(b: _Builder, node: Node) -> Node:
    return _attention_at(b, _bind(T.attention_at, node))


def _attention_at(b: _Builder, p: dict[str, Any]) -> Node:
    """SDPA with logit scale ``logit_factor``·(``scale`` or d^-½), d = head size (in the graph)."""
    op = "attention_at"
    dropout_p, scale, logit_factor, target = (
        _const(p[k], k, op) for k in ("dropout_p", "scale", "logit_factor", "target")
    )
    query = p["query"]
    if scale is None:
        scale = b.fn(operator.mul, b.fn(operator.pow, b.method("size", query, -1), -0.5), logit_factor)
    else:
        scale = scale * logit_factor
    y = b.fn(
        F.scaled_dot_product_attention,
        query,
        p["key"],
        p["value"],
        p["attn_mask"],
        dropout_p,
        p["is_causal"],
        scale=scale,
    )
    return _attention_alpha(b, y, p["key"], dropout_p) if target is None else b.mul(y, target)


@cache
def _functions() -> dict[Callable, Callable]:
    table: dict[Callable, Callable] = {
        U.linear: lambda b, n: _linear_fn(b, n, readout=False),
        U.linear_readout: lambda b, n: _linear_fn(b, n, readout=True),
        U.matmul: _matmul_fn,
        U.embedding: _embedding_fn,
        U.layer_norm: _layer_norm_fn,
        U.rms_norm: _rms_norm_fn,
        U.softmax: _softmax_fn,
        U.cross_entropy: _cross_entropy_fn,
        U.dropout: _dropout_fn,
        U.add: _add_fn,
        U.weighted_add: _weighted_add_fn,
        U.residual_split: _residual_split_fn,
        U.residual_add: _residual_add_fn,
        U.scaled_dot_product_attention: _sdpa_fn,
        S.scaled: _scaled_fn,
        S.shared: _shared_fn,
        T.softmax_at: _softmax_at_fn,
        T.matmul_at: _matmul_at_fn,
        T.attention_at: _attention_at_fn,
    }
    for name in ("relu", "gelu", "silu", "tanh", "sigmoid"):
        table[getattr(U, name)] = _activation_fn(name)
    return table


# -- converters: unitscale modules -------------------------------------------------------------------------


def _linear_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    alpha = _linear_alpha(m, m.constraint, m.readout)
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach() * alpha, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        lin.bias = b.clone(m.bias)
    return b.module(node.target, lin, *node.args)


def _quantised_linear_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight = b.clone(m.weight)
    if m.bias is not None:
        lin.bias = b.clone(m.bias)
    return b.module(node.target, lin, *node.args)


def _embedding_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    emb = nn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, device="meta")
    emb.weight = b.clone(m.weight)
    return b.module(node.target, emb, *node.args)


def _layer_norm_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    affine = m.weight is not None
    ln = nn.LayerNorm(m.normalized_shape, m.eps, affine, bias=m.bias is not None, device="meta")
    if affine:
        ln.weight = b.clone(m.weight)
    if m.bias is not None:
        ln.bias = b.clone(m.bias)
    return b.module(node.target, ln, *node.args)


def _rms_norm_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    rms = nn.RMSNorm(m.normalized_shape, m.eps, m.weight is not None, device="meta")
    if m.weight is not None:
        rms.weight = b.clone(m.weight)
    return b.module(node.target, rms, *node.args)


def _activation_module(name: str) -> Callable[[_Builder, Node, nn.Module], Node]:
    def convert(b: _Builder, node: Node, m: nn.Module) -> Node:
        return _activation(b, node.args[0], name, m.mult, m.constraint, getattr(m, "approximate", "none"))

    return convert


def _softmax_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    return _softmax(b, node.args[0], m.dim, m.mult, m.constraint)


def _dropout_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    return _dropout(b, node.args[0], m.p, m.training)


def _causal_conv_module(b: _Builder, node: Node, m: nn.Module) -> Node:
    """The char-LM's grouped matmul over unfolded windows as a causal nn.Conv1d (weight α·W).

    Window element (tap j, group channel i) of group g is row j·C/G + i of W[g], so
    conv.weight[g·C/G + o, i, j] = α·W[g, j·C/G + i, o].
    """
    cfg = m.cfg
    g, c, k = cfg.conv_groups, cfg.d_model, cfg.conv_kernel
    cg = c // g
    alpha = rules.linear_rule(k * cg, cg, 1).resolve()[0] if cfg.unit else 1.0
    conv = nn.Conv1d(c, c, k, groups=g, bias=False, device="meta")
    weight = m.weight.detach().reshape(g, k, cg, cg).permute(0, 3, 2, 1).reshape(c, cg, k) * alpha
    conv.weight = nn.Parameter(weight.contiguous(), requires_grad=m.weight.requires_grad)
    x = b.fn(F.pad, b.method("transpose", node.args[0], 1, 2), (k - 1, 0))
    return b.method("transpose", b.module(node.target, conv, x), 1, 2)


def _projection(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(α·W, c) of a projection inside a unit MHA: unit Linear α folded; a plain/quantised Linear α = 1."""
    alpha = _linear_alpha(m, m.constraint, m.readout) if isinstance(m, unn.Linear) else 1.0
    return m.weight.detach() * alpha, None if m.bias is None else m.bias.detach()


def _bias_or_zeros(bias: Tensor | None, weight: Tensor) -> Tensor:
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias


def _unit_mha_module(b: _Builder, node: Node, m: T.UnitMultiheadAttention) -> Node | tuple[Node, Node]:
    """``UnitMultiheadAttention`` → ``nn.MultiheadAttention`` (same call, same outputs, dropout off).

    Its logits are logit_factor·q·kᵀ/√d: logit_factor folds into the query projection (weight and bias).
    Its attention output carries ``target`` (a constant) and meets out_proj's α_o: both fold into out_proj's
    weight. With target=None (init="unit") the output carries α(s), s = key length, which is applied in
    the graph: out = α(s)·(α_o W_o y) + c_o, out_proj's bias kept out of the module.
    """
    if m.in_proj is not None:
        w, c = _projection(m.in_proj)
        (wq, wk, wv), (cq, ck, cv) = w.chunk(3), (None,) * 3 if c is None else c.chunk(3)
    else:
        (wq, cq), (wk, ck), (wv, cv) = (_projection(p) for p in (m.q_proj, m.k_proj, m.v_proj))
    wq, cq = wq * m.logit_factor, None if cq is None else cq * m.logit_factor
    wo, co = _projection(m.out_proj)
    if m.target is not None:
        wo = wo * m.target
    has_bias = any(c is not None for c in (cq, ck, cv, co))
    mha = nn.MultiheadAttention(
        m.embed_dim, m.num_heads, 0.0, has_bias, kdim=wk.shape[1], vdim=wv.shape[1],
        batch_first=m.batch_first, device="meta", dtype=wq.dtype,
    )  # fmt: skip
    keep_grad = any(p.requires_grad for p in m.parameters())

    def param(t: Tensor) -> nn.Parameter:
        return nn.Parameter(t.clone().contiguous(), requires_grad=keep_grad)

    if mha._qkv_same_embed_dim:
        mha.in_proj_weight = param(torch.cat([wq, wk, wv]))
    else:
        mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight = param(wq), param(wk), param(wv)
    mha.out_proj.weight = param(wo)
    if has_bias:
        mha.in_proj_bias = param(torch.cat([_bias_or_zeros(t, w) for t, w in ((cq, wq), (ck, wk), (cv, wv))]))
        mha.out_proj.bias = param(_bias_or_zeros(None if m.target is None else co, wo))
    b.attrs[node.target] = mha
    out = b.graph.call_module(node.target, node.args, node.kwargs)
    if m.target is not None:
        return out
    key = inspect.signature(m.forward).bind(*node.args, **node.kwargs).arguments["key"]
    length = (lambda: b.method("size", key, -2)) if m.batch_first else (lambda: b.method("size", key, 0))
    y = b.scale(b.fn(operator.getitem, out, 0), lambda s: rules.attention_rule(s[0], 0.0).alpha, [length])
    if co is not None:
        target = f"{node.target}_out_bias"
        b.attrs[target] = param(co)
        y = b.fn(operator.add, y, b.graph.get_attr(target))
    return y, b.fn(operator.getitem, out, 1)


def _module_call(node: Node, m: nn.Module, constants: tuple[str, ...]) -> dict[str, Any]:
    """The call's arguments bound to ``m.forward``'s signature (defaults applied), plus m's ``constants``."""
    bound = inspect.signature(m.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return {**bound.arguments, **{k: getattr(m, k) for k in constants}}


def _matmul_at_module(b: _Builder, node: Node, m: T.MatmulAt) -> Node:
    return _matmul_at(b, _module_call(node, m, ("constraint", "target")))


def _attention_at_module(b: _Builder, node: Node, m: T.AttentionAt) -> Node:
    return _attention_at(b, _module_call(node, m, ("logit_factor", "target")))


@cache
def _modules() -> dict[type, Callable]:
    from unitscale.models.charlm import CausalConv

    table: dict[type, Callable] = {
        unn.Linear: _linear_module,
        QuantisedLinear: _quantised_linear_module,
        unn.Embedding: _embedding_module,
        unn.LayerNorm: _layer_norm_module,
        unn.RMSNorm: _rms_norm_module,
        unn.Softmax: _softmax_module,
        unn.Dropout: _dropout_module,
        CausalConv: _causal_conv_module,
        T.UnitMultiheadAttention: _unit_mha_module,
        T.MatmulAt: _matmul_at_module,
        T.AttentionAt: _attention_at_module,
    }
    for cls, name in (
        (unn.ReLU, "relu"),
        (unn.GELU, "gelu"),
        (unn.SiLU, "silu"),
        (unn.Tanh, "tanh"),
        (unn.Sigmoid, "sigmoid"),
    ):
        table[cls] = _activation_module(name)
    return table


def _module_converter(m: nn.Module) -> Callable | None:
    table = _modules()
    return next((table[cls] for cls in type(m).__mro__ if cls in table), None)


# -- tracing -----------------------------------------------------------------------------------------------


class _Proxy(fx.Proxy):
    """A proxy that can become a Python int/length when the tracer knows its example value."""

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "an integer", guard=True))


class _Tracer(fx.Tracer):
    """fx tracer with unitscale's ops as leaves; with example inputs it also runs every node on them, so
    Python control flow on traced values can be resolved (and guarded) instead of failing."""

    def __init__(self, examples: dict[str, Any] | None) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(_functions()))
        # `U.linear(...)` reaches the function through the module, so patch it there too.
        self._autowrap_search.extend([U, S])
        self.examples = examples
        self._evaluating = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _module_converter(m) is not None:
            return True
        if type(m).__module__.startswith("unitscale"):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: Node) -> fx.Proxy:
        return _Proxy(node, self)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self._evaluating:  # running a leaf on example values: no tracing inside
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.examples is not None:
            proxy.node.meta[_VALUE] = self._evaluate(proxy.node)
        return proxy

    def _evaluate(self, node: Node) -> Any:
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta[_VALUE])
        self._evaluating += 1
        try:  # not under no_grad: some rules differentiate numerically (activation constants)
            if node.op == "placeholder":
                value = (
                    self.examples[node.target]
                    if node.target in self.examples
                    else (args[0] if args else None)
                )
            elif node.op == "get_attr":
                value = _fetch(self.root, node.target)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                value = self.root.get_submodule(node.target)(*args, **kwargs)
            else:
                value = None
        finally:
            self._evaluating -= 1
        return tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, value)

    def concrete(self, proxy: fx.Proxy, what: str, guard: bool = False) -> Any:
        """The example value of ``proxy``; with ``guard``, the graph asserts it at run time."""
        if self.examples is None or _VALUE not in proxy.node.meta:
            raise ValueError(
                f"export: the model's Python code needs {what} from the traced value {proxy.node.name!r}; "
                "pass example inputs: unitscale.export(model, *example_args)"
            )
        value = proxy.node.meta[_VALUE]
        if guard:
            ok = self.create_proxy("call_function", operator.eq, (proxy, value), {})
            message = f"exported graph was specialised on {proxy.node.name} == {value!r} (example inputs)"
            self.create_proxy("call_function", torch._assert, (ok, message), {})
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "a branch decision", guard=True))

    def iter(self, obj: fx.Proxy):  # type: ignore[override]
        n = len(self.concrete(obj, "an iteration"))
        return iter([obj[i] for i in range(n)])


# -- public API ------------------------------------------------------------------------------------------


def _root_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Example values by parameter name, and the forward parameters fixed to their defaults."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"export: example inputs do not match {type(model).__name__}.forward{sig}: {err}"
        ) from None
    given = dict(bound.arguments)
    concrete = {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in given and p.default is not inspect.Parameter.empty
    }
    return (given if (args or kwargs) else None), concrete


def export(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> fx.GraphModule:
    """``model`` as a plain-torch ``fx.GraphModule`` with every unit scale folded (inference semantics).

    Example inputs (as for ``model(*example_args, **example_kwargs)``) are optional; without them the trace
    is purely symbolic and fails with ValueError where the model's Python code branches on a traced value.
    Forward parameters not given keep their defaults (e.g. ``targets=None``). The exported model runs in
    the dtype of the weights, drops precision backends and dropout, and has fresh copies of the tensors.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export needs an nn.Module, got {type(model).__name__}")
    examples, concrete = _root_inputs(model, example_args, example_kwargs)
    training = {m: m.training for m in model.modules()}
    backends = {m: m.precision for m in model.modules() if hasattr(m, "precision")}
    try:
        model.eval()
        for m in backends:
            m.precision = None  # inference in the compute dtype: no backend, no cast
        # enable_grad: rules.activation_constants differentiates numerically, even under a caller's no_grad
        with torch.enable_grad():
            graph = _Tracer(examples).trace(model, concrete_args=concrete or None)
            root = _convert(graph, model)
    finally:
        for m, backend in backends.items():
            m.precision = backend
        for m, mode in training.items():
            m.training = mode
    leftover = unitscale_references(root)
    if leftover:
        raise ValueError(f"export: no plain-torch form for {', '.join(leftover)}")
    return root


def _convert(graph: fx.Graph, model: nn.Module) -> fx.GraphModule:
    b = _Builder(graph, model)
    functions = _functions()
    for node in list(graph.nodes):
        converter = None
        if node.op == "call_function" and node.target in functions:
            converter = functions[node.target]
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            found = _module_converter(module)
            if found is not None:
                converter = lambda b, n, m=module, f=found: f(b, n, m)  # noqa: E731
            else:
                b.attrs[node.target] = copy.deepcopy(module)
        if converter is None:
            continue
        with graph.inserting_before(node):
            new = converter(b, node)
        _replace(graph, node, new)
    for node in graph.nodes:
        node.meta.pop(_VALUE, None)
        node.type = None  # postponed (string) annotations of the source would break pickling
        if node.op == "get_attr" and node.target not in b.attrs:
            value = _fetch(model, node.target)
            b.attrs[node.target] = b.clone(value) if isinstance(value, Tensor) else copy.deepcopy(value)
    # The tracer class would be pickled by reference: keep it out, so loading needs torch only.
    graph._tracer_cls, graph._tracer_extras = None, {}
    name = type(model).__name__ + "Exported"
    graph = fx.GraphModule(b.attrs, graph, class_name=name).graph  # owning module for the purity check
    graph.eliminate_dead_code()
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    out = fx.GraphModule({t: v for t, v in b.attrs.items() if t in used}, graph, class_name=name)
    out.graph.lint()
    return out


def _replace(graph: fx.Graph, node: Node, new: Node | tuple[Node, ...]) -> None:
    if isinstance(new, tuple):
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise ValueError(f"export: {node.name} returns a tuple used as a whole by {user.name}")
            user.replace_all_uses_with(new[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(new)
    graph.erase_node(node)


def unitscale_references(module: nn.Module) -> list[str]:
    """Everything in an exported module that still needs unitscale: node targets, submodule classes, code."""
    found = []
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            if node.op == "call_function" and str(getattr(node.target, "__module__", "")).startswith(
                "unitscale"
            ):
                found.append(f"{node.name} ({node.target.__module__}.{node.target.__name__})")
        if "unitscale" in module.code:
            found.append("generated code")
    for name, sub in module.named_modules():
        if type(sub).__module__.startswith("unitscale"):
            found.append(f"{name or '<root>'} ({type(sub).__module__}.{type(sub).__name__})")
    return found


def export_program(
    model: nn.Module, example_args: tuple, example_kwargs: dict | None = None, **export_options: Any
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of :func:`export`'s plain-torch module (options such as ``dynamic_shapes``
    pass through). Save with ``torch.export.save``; load with ``torch.export.load(path).module()``."""
    if not isinstance(example_args, tuple):
        raise ValueError(f"example_args must be a tuple of inputs, got {type(example_args).__name__}")
    kwargs = example_kwargs or {}
    plain = export(model, *example_args, **kwargs)
    return torch.export.export(plain, example_args, kwargs or None, **export_options)


class _CallableModule(types.ModuleType):
    def __call__(self, model: nn.Module, *example_args: Any, **example_kwargs: Any) -> fx.GraphModule:
        return export(model, *example_args, **example_kwargs)


# `unitscale.export` is this module once imported; make `unitscale.export(model, ...)` work all the same.
sys.modules[__name__].__class__ = _CallableModule
