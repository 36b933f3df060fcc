"""Node-by-node rewrite of a traced model into unit ops, by forward-factor propagation.

Every tensor of the new graph equals c × the original tensor for a static constant c (the *factor*; 1 for
inputs, masks and sizes). Each rule emits unit ops and returns the factor of its output:

    linear        W_u = W·c_out/(α·c_in), b_u = b·c_out              → c_out (``rescale`` picks it)
    embedding     T_u = T·c_out                                      → c_out
    layer_norm    LN(c·x; eps·c²) = LN(x; eps)                       → 1
    activation    α·f(mult·x)/mult with mult = 1/c                   → α·c
    softmax       softmax(mult·x), mult = 1/c; α pinned at the reference width  → α_ref
    SDPA          logit scale / (c_q·c_k); α pinned at the reference key length  → c_v·α_ref
    x + f(x)      residual_split / residual_add(skip, scaled(f, k, k), τ), k = √((1−τ)/τ)·c_s/c_f
                                                                     → √(1−τ)·c_s
    a + b (indep.) weighted_add(a, b, c_b/√(c_a²+c_b²), c_a/√(c_a²+c_b²))  → c_a·c_b/√(c_a²+c_b²)
    shape ops, dropout, sum/mean: c passes;  mul/div: c_a·c_b, c_a/c_b
    anything else: compensate inputs to 1 and keep plain (after reporting it as unsupported)
Compensations are ``scaled(x, k, k)`` (legal on any edge), outputs are brought back to factor 1. With
``init="unit"`` every factor is 1: the same rules give the plain unit-scaled model of that architecture.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from unitscale import functional as U
from unitscale import nn as unn
from unitscale import rules
from unitscale.scale import scaled
from unitscale.transforms import _graph as G
from unitscale.transforms._modules import (
    AttentionAt,
    MatmulAt,
    UnitMultiheadAttention,
    softmax_at,
)


@dataclass
class Options:
    """Resolved options of :func:`unitscale.transforms.unit_scale` (validated there)."""

    keep: bool
    constraint: str
    tau: float | str | None
    tau_attention: float
    tau_mlp: float
    rescale: str
    grad_rows: float | None
    token_rows: int | None
    strict: bool


@dataclass
class Residual:
    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    branch_users: set[fx.Node]
    attention: bool
    tau: float = 0.5
    split: tuple[fx.Node, fx.Node] | None = None


@dataclass
class Info:
    """What the conversion did: residual τ's, unsupported ops, ops per rule."""

    residuals: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)


PASS_METHODS = frozenset(
    "view reshape transpose permute contiguous flatten unflatten unsqueeze squeeze expand expand_as t clone "
    "to float double half bfloat16 type_as narrow select chunk split unbind repeat flip movedim swapaxes "
    "roll view_as reshape_as sum mean neg abs amax amin cumsum".split()
)
PASS_FUNCTIONS = {
    operator.getitem, operator.neg, torch.flatten, torch.transpose, torch.permute, torch.reshape,
    torch.unsqueeze, torch.squeeze, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.movedim,
    torch.clone, torch.t, torch.sum, torch.mean, torch.neg, torch.abs, torch.amax, torch.amin, torch.cumsum,
}  # fmt: skip
ADDS = {operator.add, operator.iadd, torch.add, "add"}
SUBS = {operator.sub, operator.isub, torch.sub, "sub"}
MULS = {operator.mul, operator.imul, torch.mul, "mul"}
DIVS = {operator.truediv, operator.itruediv, torch.div, "div"}
MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
CATS = {torch.cat, torch.stack}
ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", "relu": "relu", F.gelu: "gelu", "gelu": "gelu", F.silu: "silu",
    torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    "sigmoid": "sigmoid",
}  # fmt: skip
UNIT_ACTIVATIONS = {"relu": U.relu, "gelu": U.gelu, "silu": U.silu, "tanh": U.tanh, "sigmoid": U.sigmoid}
ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}
UNIT_ACTIVATION_MODULES = {
    "relu": unn.ReLU,
    "gelu": unn.GELU,
    "silu": unn.SiLU,
    "tanh": unn.Tanh,
    "sigmoid": unn.Sigmoid,
}
SOFTMAXES = {F.softmax, torch.softmax, "softmax"}
SDPA = F.scaled_dot_product_attention
SIGNATURES = {
    SDPA: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    F.linear: ("input", "weight", "bias"),
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.dropout: ("input", "p", "training", "inplace"),
    F.cross_entropy: (
        "input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"
    ),
    F.gelu: ("input", "approximate"),
    "softmax": ("input", "dim", "dtype"),
}  # fmt: skip


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _rms(t: Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _is_attention(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.MultiheadAttention, nn.Softmax, UnitMultiheadAttention))
    return node.target is SDPA or node.target in SOFTMAXES


class Converter:
    """One pass over ``gm``'s nodes in order, building the unit-scaled graph (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, opts: Options, stats: dict[fx.Node, Any] | None):
        self.gm, self.o, self.stats = gm, opts, stats
        self.modules = dict(gm.named_modules())
        self.live = G.live_nodes(gm)
        self.index, self.anc = G.ancestors(gm.graph)
        self.cut = G.cut_edges(gm.graph, self.live)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.factor: dict[fx.Node, Any] = {}
        self.install: dict[str, nn.Module] = {}
        self.info = Info()
        self.residuals = self._find_residuals()
        seen: dict[int, int] = {}
        for _, p in gm.named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        self.shared = {i for i, n in seen.items() if n > 1}  # tied weights: not converted (reported)

    # -- analysis ----------------------------------------------------------------------------------------

    def _ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """a is a strict ancestor of b."""
        return bool((self.anc[b] >> self.index[a]) & 1)

    def _find_residuals(self) -> dict[fx.Node, Residual]:
        found: dict[fx.Node, Residual] = {}
        skips: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if (
                node.target not in ADDS
                or node.op not in ("call_function", "call_method")
                or node not in self.live
            ):
                continue
            a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs.get("alpha", 1) != 1:
                continue
            for skip, branch in ((a, b), (b, a)):
                ok = skip in self.live or skip.op == "placeholder"
                if ok and branch in self.live and skip not in skips and self._ancestor(skip, branch):
                    users = {u for u in skip.users if u is branch or self._ancestor(u, branch)}
                    region = [
                        n
                        for n in self.gm.graph.nodes
                        if n is branch or (self._ancestor(skip, n) and self._ancestor(n, branch))
                    ]
                    attention = any(_is_attention(n, self.modules) for n in region)
                    found[node] = Residual(node, skip, branch, users, attention)
                    skips.add(skip)
                    break
        for i, r in enumerate(found.values()):
            r.tau = self._tau(i, r)
        return found

    def _tau(self, i: int, r: Residual) -> float:
        tau = self.o.tau
        if isinstance(tau, float):
            return tau
        if tau == "running_mean":
            return 1.0 / (i + 2)
        if tau == "match":
            s, b = self._std(r.skip), self._std(r.branch)
            if s and b:
                ratio = b / s
                return min(max(ratio * ratio / (1 + ratio * ratio), 1e-3), 1 - 1e-3)
        return self.o.tau_attention if r.attention else self.o.tau_mlp

    def _stat(self, node: Any) -> Any:
        if self.stats is None or not isinstance(node, fx.Node):
            return None
        s = self.stats.get(node)
        return s if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple) else None

    def _shape(self, node: Any) -> tuple[int, ...] | None:
        s = self._stat(node)
        return None if s is None else s[0]

    def _std(self, node: Any) -> float | None:
        s = self._stat(node)
        return None if s is None or not s[1] else s[1]

    # -- factors and emission helpers --------------------------------------------------------------------

    def c(self, node: Any) -> float:
        """Factor of an original node's converted value (1 for non-live nodes, constants, unit mode)."""
        if not self.o.keep or not isinstance(node, fx.Node):
            return 1.0
        f = self.factor.get(node, 1.0)
        return f if isinstance(f, float) else 1.0

    def arg(self, user: fx.Node, a: fx.Node) -> fx.Node:
        """New node standing for ``a`` as seen by ``user`` (residual splits route skip vs branch users)."""
        r = self._residual_of_skip.get(a)
        if r is not None and (user is r.add or user in r.branch_users):
            if r.split is None:
                split = self.graph.call_function(U.residual_split, (self.env[a], r.tau))
                r.split = (self.graph.call_function(operator.getitem, (split, 0)),
                           self.graph.call_function(operator.getitem, (split, 1)))  # fmt: skip
            return r.split[0] if user is r.add else r.split[1]
        return self.env[a]

    def args(self, node: fx.Node) -> tuple[tuple, dict]:
        return fx.node.map_arg((node.args, node.kwargs), lambda a: self.arg(node, a))  # type: ignore[return-value]

    def comp(self, new: Any, c_from: float, c_to: float = 1.0, bwd: float | None = None) -> Any:
        """scaled(new, k, k) with k = c_to/c_from (forward factor c_from → c_to); nothing when equal."""
        if not isinstance(new, fx.Node) or not self.o.keep or math.isclose(c_from, c_to, rel_tol=1e-15):
            return new
        k = c_to / c_from
        return self.graph.call_function(scaled, (new, k, k if bwd is None else bwd))

    def cons(self, node: fx.Node, *inputs: Any) -> str | None:
        """The op's constraint: none when every live input edge is cut (REFERENCE §1.3)."""
        edges = [(a, node) for a in inputs if isinstance(a, fx.Node) and a in self.live]
        return None if edges and all(e in self.cut for e in edges) else self.o.constraint

    def rows(self, node: Any, width: int) -> float | None:
        """Static grad_rows for a token-level op (example rows equal to the token count), else None."""
        if self.o.grad_rows is None:
            return None
        shape = self._shape(node)
        if self.o.token_rows is None or shape is None:
            return self.o.grad_rows
        return self.o.grad_rows if math.prod(shape) // max(width, 1) == self.o.token_rows else None

    def count(self, rule: str) -> None:
        self.info.rules[rule] = self.info.rules.get(rule, 0) + 1

    def call(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(target, args, kwargs or {})

    def call_new_module(self, node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
        """Call ``module``, installed beside the code ``node`` came from (its module scope) under the node's
        name, e.g. ``encoder.layer.0.attention.self.scaled_dot_product_attention``: precision.apply and
        per-path recipe overrides then reach the matmuls a functional call ran."""
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        owner = self.modules.get(scope)
        base = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
        name, i = base, 0
        while (path := f"{scope}.{name}" if scope else name) in self.install or hasattr(owner, name):
            i += 1  # a second op of that kind in the scope, or an attribute of that name
            name = f"{base}_{i}"
        self.install[path] = module
        return self.graph.call_module(path, args, {})

    # -- the pass ----------------------------------------------------------------------------------------

    def run(self) -> fx.Graph:
        self._residual_of_skip = {r.skip: r for r in self.residuals.values()}
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self._output(node)
                continue
            new, factor = self._convert(node)
            self.env[node] = new
            self.factor[node] = factor
        return self.graph

    def _copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda a: self.arg(node, a))

    def _output(self, node: fx.Node) -> None:
        def back(a: fx.Node) -> fx.Node:
            new = self.arg(node, a)
            return self.comp(new, self.c(a), 1.0, bwd=1.0) if a in self.live else new

        self.graph.output(fx.node.map_arg(node.args[0], back))

    def _convert(self, node: fx.Node) -> tuple[fx.Node, Any]:
        if node.op in ("placeholder", "get_attr") or node not in self.live or G.is_metadata(node):
            return self._copy(node), 1.0
        if node.op == "call_module":
            rule = self._module_rule(self.modules[node.target])
        else:
            rule = self._function_rule(node)
        if rule is not None:
            result = rule(node)
            if result is not None:
                self.count(rule.__name__.strip("_"))
                return result
        return self._unsupported(node)

    def _unsupported(self, node: fx.Node) -> tuple[fx.Node, Any]:
        if node.op == "call_module":
            name = f"{type(self.modules[node.target]).__name__} at '{node.target}'"
        else:
            target = (
                node.target
                if isinstance(node.target, str)
                else getattr(node.target, "__name__", str(node.target))
            )
            prefix = "Tensor." if node.op == "call_method" else ""
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else ""
            name = f"{prefix}{target} in '{where}'" if where else f"{prefix}{target} (node {node.name})"
        self.info.unsupported.append(name)
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs),
            lambda a: self.comp(self.arg(node, a), self.c(a)) if a in self.live else self.arg(node, a),
        )
        new = self.graph.create_node(node.op, node.target, args, kwargs, node.name)
        return new, 1.0

    # -- rule dispatch -----------------------------------------------------------------------------------

    def _module_rule(self, m: nn.Module) -> Any:
        if type(m) in ACTIVATION_MODULES:
            return self._activation_module
        return {
            nn.Linear: self._linear_module,
            nn.Embedding: self._embedding_module,
            nn.LayerNorm: self._layer_norm_module,
            nn.Dropout: self._dropout_module,
            nn.Identity: self._pass,
            nn.Flatten: self._pass,
            nn.Softmax: self._softmax,
            nn.MultiheadAttention: self._mha,
        }.get(type(m))

    def _function_rule(self, node: fx.Node) -> Any:
        t = node.target
        try:
            hash(t)
        except TypeError:
            return None
        if t in PASS_FUNCTIONS or (node.op == "call_method" and t in PASS_METHODS):
            return self._pass
        table = (
            (ADDS, self._add), (SUBS, self._sub), (MULS, self._mul), (DIVS, self._div),
            (MATMULS, self._matmul),
            (CATS, self._cat), (SOFTMAXES, self._softmax), (ACTIVATIONS, self._activation),
        )  # fmt: skip
        for targets, rule in table:
            if t in targets:
                return rule
        if node.op == "call_method" and t == "masked_fill":
            return self._masked_fill
        return {
            SDPA: self._sdpa,
            F.linear: self._linear_function,
            F.embedding: self._embedding_function,
            F.layer_norm: self._layer_norm_function,
            F.dropout: self._dropout_function,
            F.cross_entropy: self._cross_entropy,
        }.get(t)

    # -- simple rules ------------------------------------------------------------------------------------

    def _pass(self, node: fx.Node) -> tuple[fx.Node, Any]:
        """Shape ops, sums, dropout in keep mode: the factor of the first argument passes."""
        src = node.args[0]
        f = self.factor.get(src, 1.0) if self.o.keep else 1.0
        if node.target is operator.getitem and isinstance(f, tuple):
            f = f[node.args[1]] if isinstance(node.args[1], int) else 1.0
        return self._copy(node), f

    def _mul(self, node: fx.Node) -> tuple[fx.Node, Any]:
        return self._copy(node), math.prod(self.c(a) for a in node.args[:2])

    def _div(self, node: fx.Node) -> Any:
        if node.kwargs.get("rounding_mode") is not None:
            return None
        return self._copy(node), self.c(node.args[0]) / self.c(node.args[1])

    def _masked_fill(self, node: fx.Node) -> tuple[fx.Node, Any]:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        if isinstance(value, (int, float)) and (value == 0 or math.isinf(value)):
            return self._pass(node)
        args, kwargs = self.args(node)
        args = (self.comp(args[0], self.c(node.args[0])), *args[1:])
        return self.graph.call_method("masked_fill", args, kwargs), 1.0

    def _cat(self, node: fx.Node) -> Any:
        items = node.args[0]
        if not isinstance(items, (list, tuple)):
            return None
        live = [a for a in items if isinstance(a, fx.Node) and a in self.live]
        target = self.c(live[0]) if len(live) == len(items) else 1.0
        new_items = [
            self.comp(self.arg(node, a), self.c(a), target) if a in live else self.arg(node, a) for a in items
        ]
        args, kwargs = self.args(node)
        return self.call(node.target, (type(items)(new_items), *args[1:]), kwargs), target

    def _sub(self, node: fx.Node) -> Any:
        a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
        if node.kwargs.get("alpha", 1) != 1 or a is None:
            return None
        target = self.c(a) if (a in self.live and b in self.live) else 1.0
        args, kwargs = self.args(node)
        new_a = self.comp(args[0], self.c(a), target) if a in self.live else args[0]
        new_b = self.comp(args[1], self.c(b), target) if b in self.live else args[1]
        return self.graph.create_node(node.op, node.target, (new_a, new_b, *args[2:]), kwargs), target

    # -- adds and residuals ------------------------------------------------------------------------------

    def _add(self, node: fx.Node) -> Any:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
            return None
        a, b = node.args[:2]
        r = self.residuals.get(node)
        if r is not None:
            return self._residual(node, r)
        if a in self.live and b in self.live:
            ca, cb = self.c(a), self.c(b)
            norm = math.hypot(ca, cb)
            new = self.call(U.weighted_add, (self.arg(node, a), self.arg(node, b), cb / norm, ca / norm))
            return new, ca * cb / norm
        # a constant, a mask or an input: bring the live side to factor 1 and keep the plain add
        args, kwargs = self.args(node)
        new_a = self.comp(args[0], self.c(a)) if a in self.live else args[0]
        new_b = self.comp(args[1], self.c(b)) if b in self.live else args[1]
        return self.graph.create_node(node.op, node.target, (new_a, new_b), kwargs), 1.0

    def _residual(self, node: fx.Node, r: Residual) -> tuple[fx.Node, float]:
        cs, cb = self.c(r.skip), self.c(r.branch)
        k = math.sqrt((1 - r.tau) / r.tau) * cs / cb
        branch = self.comp(self.arg(node, r.branch), 1.0, k)
        new = self.call(U.residual_add, (self.arg(node, r.skip), branch, r.tau))
        self.info.residuals.append({"node": new.name, "tau": r.tau, "attention": r.attention})
        return new, math.sqrt(1 - r.tau) * cs

    # -- linear, embedding, norm ---------------------------------------------------------------------------

    def _linear_factor(self, node: fx.Node, weight: Tensor, alpha: float, c_in: float) -> float:
        if self.o.rescale == "activations" and self._std(node):
            return 1.0 / self._std(node)
        if self.o.rescale == "none":
            return 1.0
        rms = _rms(weight)
        return alpha * c_in / rms if rms > 0 and math.isfinite(rms) else 1.0

    def _unit_linear(
        self, node: fx.Node, x: fx.Node, weight: Tensor, bias: Tensor | None
    ) -> tuple[nn.Module, float]:
        out_f, in_f = weight.shape
        readout = (x, node) in self.cut
        constraint = self.o.constraint
        rule = rules.readout_rule if readout else rules.linear_rule
        alpha = rule(in_f, out_f, 1).resolve(None if readout else constraint)[0]
        new = unn.Linear(
            in_f, out_f, bias is not None, weight.device, weight.dtype, constraint=constraint, readout=readout
        )
        new.grad_rows = self.rows(x, in_f)
        c_out = 1.0
        if self.o.keep:
            c_in = self.c(x)
            c_out = self._linear_factor(node, weight, alpha, c_in)
            with torch.no_grad():
                new.weight.copy_(weight * (c_out / (alpha * c_in)))
                if bias is not None:
                    new.bias.copy_(bias * c_out)
        return new, c_out

    def _linear_module(self, node: fx.Node) -> Any:
        m = self.modules[node.target]
        if id(m.weight) in self.shared:
            return None
        new, c_out = self._unit_linear(node, node.args[0], m.weight, m.bias)
        self.install[node.target] = new
        return self._copy(node), c_out

    def _owned_param(self, node: Any) -> Tensor | None:
        """The parameter behind a get_attr node used by this op alone (so it may be rescaled in place)."""
        if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
            return None
        same = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
        value = G._fetch(self.gm, node.target)
        return value if len(same) == 1 and isinstance(value, nn.Parameter) else None

    def _linear_function(self, node: fx.Node) -> Any:
        b = _bind(node, SIGNATURES[F.linear])
        weight, bias = self._owned_param(b["weight"]), self._owned_param(b.get("bias"))
        if weight is None or (b.get("bias") is not None and bias is None) or b["input"] not in self.env:
            return None
        unit, c_out = self._unit_linear(node, b["input"], weight, bias)
        with torch.no_grad():
            weight.copy_(unit.weight)
            if bias is not None:
                bias.copy_(unit.bias)
        fn = U.linear_readout if unit.readout else U.linear
        kwargs = {"grad_rows": unit.grad_rows} | ({} if unit.readout else {"constraint": unit.constraint})
        bias_new = self.env[b["bias"]] if bias is not None else None
        return self.call(fn, (self.arg(node, b["input"]), self.env[b["weight"]], bias_new), kwargs), c_out

    def _embedding_factor(self, node: fx.Node, weight: Tensor) -> float:
        if self.o.rescale == "activations" and self._std(node):
            return 1.0 / self._std(node)
        rms = _rms(weight)
        return 1.0 / rms if self.o.rescale != "none" and rms > 0 and math.isfinite(rms) else 1.0

    def _embedding_module(self, node: fx.Node) -> Any:
        m = self.modules[node.target]
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse or id(m.weight) in self.shared:
            return None
        new = unn.Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, m.weight.device, m.weight.dtype)
        new.grad_rows = self.rows(node.args[0], 1)
        c_out = self._embedding_factor(node, m.weight) if self.o.keep else 1.0
        if self.o.keep:
            with torch.no_grad():
                new.weight.copy_(m.weight * c_out)
        self.install[node.target] = new
        return self._copy(node), c_out

    def _embedding_function(self, node: fx.Node) -> Any:
        b = _bind(node, SIGNATURES[F.embedding])
        weight = self._owned_param(b["weight"])
        if weight is None or b.get("max_norm") is not None or b.get("scale_grad_by_freq") or b.get("sparse"):
            return None
        c_out = self._embedding_factor(node, weight) if self.o.keep else 1.0
        with torch.no_grad():
            if self.o.keep:
                weight.mul_(c_out)
            else:
                weight.normal_()
        kwargs = {"grad_rows": self.rows(b["input"], 1), "padding_idx": b.get("padding_idx")}
        return self.call(U.embedding, (self.arg(node, b["input"]), self.env[b["weight"]]), kwargs), c_out

    def _layer_norm_module(self, node: fx.Node) -> tuple[fx.Node, float]:
        m = self.modules[node.target]
        x = node.args[0]
        affine = m.weight is not None
        has_bias = getattr(m, "bias", None) is not None
        c_in = self.c(x)
        c_out = (
            1.0 / self._std(node)
            if self.o.keep and self.o.rescale == "activations" and self._std(node) and affine
            else 1.0
        )
        new = unn.LayerNorm(
            m.normalized_shape,
            m.eps * c_in * c_in,
            affine,
            has_bias,
            device=None if not affine else m.weight.device,
            dtype=None if not affine else m.weight.dtype,
        )
        new.grad_rows = self.rows(x, math.prod(m.normalized_shape))
        if self.o.keep and affine:
            with torch.no_grad():
                new.weight.copy_(m.weight * c_out)
                if has_bias:
                    new.bias.copy_(m.bias * c_out)
        self.install[node.target] = new
        return self._copy(node), c_out

    def _layer_norm_function(self, node: fx.Node) -> Any:
        b = _bind(node, SIGNATURES[F.layer_norm])
        x = b["input"]
        for name in ("weight", "bias"):
            p = b.get(name)
            if p is not None and (not isinstance(p, fx.Node) or p.op != "get_attr"):
                return None
            if p is not None and not self.o.keep:
                with torch.no_grad():
                    G._fetch(self.gm, p.target).fill_(1.0 if name == "weight" else 0.0)
        eps = b.get("eps", 1e-5) * self.c(x) ** 2
        args = (
            self.arg(node, x),
            b["normalized_shape"],
            *(self.arg(node, p) if isinstance(p, fx.Node) else p for p in (b.get("weight"), b.get("bias"))),
            eps,
        )
        shape = b["normalized_shape"]
        width = math.prod((shape,) if isinstance(shape, int) else shape)
        return self.call(U.layer_norm, args, {"grad_rows": self.rows(x, width)}), 1.0

    # -- dropout ----------------------------------------------------------------------------------------

    def _dropout_module(self, node: fx.Node) -> tuple[fx.Node, Any]:
        if not self.o.keep:
            self.install[node.target] = unn.Dropout(self.modules[node.target].p)
        return self._pass(node)

    def _dropout_function(self, node: fx.Node) -> tuple[fx.Node, Any]:
        if self.o.keep:
            return self._pass(node)
        b = _bind(node, SIGNATURES[F.dropout])
        return self.call(
            U.dropout, (self.arg(node, b["input"]), b.get("p", 0.5), b.get("training", True))
        ), 1.0

    # -- nonlinearities -----------------------------------------------------------------------------------

    def _activation_module(self, node: fx.Node) -> tuple[fx.Node, float]:
        m = self.modules[node.target]
        name = ACTIVATION_MODULES[type(m)]
        x = node.args[0]
        mult, constraint = 1.0 / self.c(x), self.cons(node, x)
        kwargs: dict[str, Any] = {"mult": mult, "constraint": constraint}
        rule_name = name
        if name == "gelu":
            kwargs["approximate"] = m.approximate
            rule_name = "gelu" if m.approximate == "none" else "gelu_tanh"
        self.install[node.target] = UNIT_ACTIVATION_MODULES[name](**kwargs)
        alpha = rules.activation_rule(rule_name, mult).resolve(constraint)[0]
        return self._copy(node), alpha * self.c(x)

    def _activation(self, node: fx.Node) -> Any:
        name = ACTIVATIONS[node.target]
        x = node.args[0] if node.args else node.kwargs.get("input")
        kwargs: dict[str, Any] = {"mult": 1.0 / self.c(x), "constraint": self.cons(node, x)}
        rule_name = name
        if name == "gelu":
            approximate = _bind(node, SIGNATURES[F.gelu]).get("approximate", "none")
            kwargs["approximate"] = approximate
            rule_name = "gelu" if approximate == "none" else "gelu_tanh"
        alpha = rules.activation_rule(rule_name, kwargs["mult"]).resolve(kwargs["constraint"])[0]
        return self.call(UNIT_ACTIVATIONS[name], (self.arg(node, x),), kwargs), alpha * self.c(x)

    def _softmax(self, node: fx.Node) -> Any:
        if node.op == "call_module":
            x, dim = node.args[0], self.modules[node.target].dim
        else:
            b = _bind(node, SIGNATURES["softmax"])
            x, dim = b["input"], b.get("dim")
            if b.get("dtype") is not None:
                return None
        if dim is None:
            return None
        mult, constraint = 1.0 / self.c(x), self.cons(node, x)
        target = None
        if self.o.keep:
            shape = self._shape(x)
            target = rules.softmax_rule(shape[dim], mult).resolve(constraint)[0] if shape else 1.0
        kwargs = {"mult": mult, "constraint": constraint, "target": target}
        return self.call(softmax_at, (self.arg(node, x), dim), kwargs), target or 1.0

    def _matmul(self, node: fx.Node) -> Any:
        a, b = node.args[:2]
        if not (a in self.live and b in self.live):
            return self._mul(node)
        constraint = self.cons(node, a, b)
        target = None
        if self.o.keep:
            sa, sb = self._shape(a), self._shape(b)
            target = U.matmul_scales(sa, sb, constraint)[0] if sa and sb else 1.0
        new = self.call_new_module(
            node, MatmulAt(constraint=constraint, target=target), (self.arg(node, a), self.arg(node, b))
        )
        return new, self.c(a) * self.c(b) * (target or 1.0)

    def _sdpa(self, node: fx.Node) -> Any:
        b = _bind(node, SIGNATURES[SDPA])
        if b.get("enable_gqa"):
            return None
        q, k, v = b["query"], b["key"], b["value"]
        p = b.get("dropout_p", 0.0)
        target = None
        if self.o.keep:
            shape = self._shape(k)
            target = rules.attention_rule(shape[-2], p).alpha if shape else 1.0
        args = tuple(
            self.arg(node, t) if isinstance(t, fx.Node) else t for t in (q, k, v, b.get("attn_mask"))
        )
        module = AttentionAt(logit_factor=1.0 / (self.c(q) * self.c(k)), target=target)
        new = self.call_new_module(node, module, (*args, p, b.get("is_causal", False), b.get("scale")))
        return new, self.c(v) * (target or 1.0)

    def _cross_entropy(self, node: fx.Node) -> Any:
        b = _bind(node, SIGNATURES[F.cross_entropy])
        if b.get("weight") is not None or b.get("label_smoothing", 0.0) or b.get("size_average") is not None:
            return None
        if b.get("reduce") is not None:
            return None
        x = b["input"]
        logits = self.comp(self.arg(node, x), self.c(x))
        target = self.arg(node, b["target"]) if isinstance(b["target"], fx.Node) else b["target"]
        kwargs = {"ignore_index": b.get("ignore_index", -100), "reduction": b.get("reduction", "mean")}
        return self.call(U.cross_entropy, (logits, target), kwargs), 1.0

    # -- multi-head attention --------------------------------------------------------------------------

    def _mha(self, node: fx.Node) -> Any:
        m = self.modules[node.target]
        if m.bias_k is not None or m.add_zero_attn or len(node.args) < 3:
            return None
        q_in, k_in, v_in = node.args[:3]
        e, dev, dtype = m.embed_dim, m.out_proj.weight.device, m.out_proj.weight.dtype
        cons = self.o.constraint
        fused = q_in is k_in is v_in and m._qkv_same_embed_dim
        w_in = m.in_proj_weight
        b_in = m.in_proj_bias
        if m._qkv_same_embed_dim:
            weights = list(w_in.chunk(3))
        else:
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        biases = [None] * 3 if b_in is None else list(b_in.chunk(3))
        projections: dict[str, Any] = {}
        if fused:
            alpha = rules.linear_rule(e, 3 * e, 1).resolve(cons)[0]
            lin = unn.Linear(e, 3 * e, b_in is not None, dev, dtype, constraint=cons)
            lin.grad_rows = self.rows(q_in, e)
            c = self._mha_factor(w_in, alpha, self.c(q_in))
            self._load(lin, w_in, b_in, c, alpha, self.c(q_in))
            projections["in_proj"] = lin
            cq = ck = cv = c
        else:
            cs = []
            for name, x, w, bias in zip(
                ("q_proj", "k_proj", "v_proj"), (q_in, k_in, v_in), weights, biases, strict=True
            ):
                alpha = rules.linear_rule(w.shape[1], e, 1).resolve(cons)[0]
                lin = unn.Linear(w.shape[1], e, bias is not None, dev, dtype, constraint=cons)
                lin.grad_rows = self.rows(x, w.shape[1])
                c = self._mha_factor(w, alpha, self.c(x))
                self._load(lin, w, bias, c, alpha, self.c(x))
                projections[name] = lin
                cs.append(c)
            cq, ck, cv = cs
        target = None
        if self.o.keep:
            shape = self._shape(k_in)
            s = None if shape is None else (shape[0] if len(shape) == 2 or not m.batch_first else shape[1])
            target = rules.attention_rule(s, 0.0).alpha if s else 1.0
        c_attn = cv * (target or 1.0)
        alpha_o = rules.linear_rule(e, e, 1).resolve(cons)[0]
        out = unn.Linear(e, e, m.out_proj.bias is not None, dev, dtype, constraint=cons)
        out.grad_rows = self.rows(q_in, e)
        c_o = self._mha_factor(m.out_proj.weight, alpha_o, c_attn)
        self._load(out, m.out_proj.weight, m.out_proj.bias, c_o, alpha_o, c_attn)
        self.install[node.target] = UnitMultiheadAttention(
            e,
            m.num_heads,
            in_proj=projections.get("in_proj"),
            q_proj=projections.get("q_proj"),
            k_proj=projections.get("k_proj"),
            v_proj=projections.get("v_proj"),
            out_proj=out,
            dropout=m.dropout,
            batch_first=m.batch_first,
            logit_factor=1.0 / (cq * ck) if self.o.keep else 1.0,
            target=target,
        )
        return self._copy(node), (c_o if self.o.keep else 1.0, 1.0)

    def _mha_factor(self, weight: Tensor, alpha: float, c_in: float) -> float:
        if not self.o.keep or self.o.rescale == "none":
            return 1.0
        rms = _rms(weight)
        return alpha * c_in / rms if rms > 0 and math.isfinite(rms) else 1.0

    def _load(
        self, lin: nn.Module, w: Tensor, b: Tensor | None, c_out: float, alpha: float, c_in: float
    ) -> None:
        if not self.o.keep:
            return
        with torch.no_grad():
            lin.weight.copy_(w * (c_out / (alpha * c_in)))
            if b is not None:
                lin.bias.copy_(b * c_out)
