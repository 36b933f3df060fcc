"""Node-by-node rewrite of a captured ATen graph into unit ops, by forward-factor propagation.

Every tensor of the new graph equals c × the original tensor for a static constant c (the *factor*; 1 for
inputs, masks, positions and sizes). Each rule (``_rules_*``) emits unit ops and returns the factor of its
output; docs/convert.md tabulates them. With ``init="unit"`` every factor is 1: the same rules give the
unit-scaled model of that architecture. Compensations are ``scaled(x, k, k)`` (legal on any edge); outputs
are brought back to factor 1. A rule applies per call site, so a module or function called twice gets the
factor of each call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from unitscale import functional as U
from unitscale.scale import scaled, shared
from unitscale.transforms import _graph as G
from unitscale.transforms._capture import Captured, describe_node, is_counter_update, module_path
from unitscale.transforms._graph import as_tensor_meta  # noqa: F401  (the rules import it from here)
from unitscale.transforms._residuals import find_residuals

aten = torch.ops.aten
Result = tuple[Any, float]
Rule = Callable[["Converter", fx.Node], "Result | None"]


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
    rules: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Info:
    """What the conversion did: residual τ's, unsupported ops, ops per rule, tied parameters, parameters
    re-drawn by ``init="unit"`` that no rule owns (cls tokens, position tables), capture mode, and for each
    node of the converted graph that holds an original op's value: the rule and the op."""

    residuals: list[dict[str, Any]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    rules: dict[str, int] = field(default_factory=dict)
    ties: list[tuple[str, ...]] = field(default_factory=list)
    unit_initialised: list[str] = field(default_factory=list)
    dynamic: bool = True
    ops: dict[str, tuple[str, str]] = field(default_factory=dict)  # converted node → (rule, original op)


class Converter:
    """One pass over the captured graph's nodes in order, building the unit-scaled graph."""

    def __init__(self, captured: Captured, model: nn.Module, opts: Options, stats: dict[fx.Node, Any]):
        from unitscale.transforms import _regions

        self.gm, self.model, self.o, self.stats = captured.gm, model, opts, stats
        self.original = self.gm.graph  # the module gets the new graph; the checks walk this one
        self.live = G.live_nodes(self.gm)
        self.index, self.anc = G.ancestors(self.gm.graph)
        self.cut = G.cut_edges(self.gm.graph, self.live)
        self.param_only = self._param_only()
        self.uses = self._param_uses()
        self._tie_edges: dict[tuple[fx.Node, fx.Node], list[str]] = {}
        for target, edges in self.uses.items():
            for edge in edges if len(edges) > 1 else ():
                self._tie_edges.setdefault(edge, []).append(target)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.factor: dict[fx.Node, float] = {}
        self.install: dict[str, nn.Module] = {}
        self.initialised: set[str] = set()
        self.tie_nodes: dict[str, list[fx.Node]] = {}
        self._wrapped: dict[tuple[fx.Node, fx.Node], fx.Node] = {}
        self.terms: dict[fx.Node, int] = {}  # independent unit terms summed by nested adds (init="unit")
        self.info = Info(dynamic=captured.dynamic)
        self.residuals = find_residuals(self)
        self._residual_of_skip = {r.skip: r for r in self.residuals.values()}
        self.absorbed: set[fx.Node] = set()
        self.special: dict[fx.Node, Rule] = {}
        _regions.plan(self)

    # -- analysis ----------------------------------------------------------------------------------------

    def _param_only(self) -> set[fx.Node]:
        """Live nodes computed from parameters alone, not from the inputs' values (a parameter, its views,
        slices, expansions to the batch size)."""
        from_inputs: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" or (
                not G.is_metadata(node) and any(a in from_inputs for a in G.node_args(node))
            ):
                from_inputs.add(node)
        return {n for n in self.live if n not in from_inputs}

    def _param_uses(self) -> dict[str, list[tuple[fx.Node, fx.Node]]]:
        """Per parameter: the edges (u → op) where it, or a view of it (slice, transpose, expand …),
        enters an op. Two or more uses make it tied (its gradient sums one contribution per use)."""
        chains: dict[fx.Node, set[str]] = {}
        uses: dict[str, list[tuple[fx.Node, fx.Node]]] = {}
        for node in self.gm.graph.nodes:
            if G.is_param(self.gm, node):
                chains[node] = {node.target}
                continue
            inputs = [a for a in dict.fromkeys(G.node_args(node)) if a in chains]
            if node in self.param_only and G.is_view(node) and inputs:
                chains[node] = set().union(*(chains[a] for a in inputs))
                continue
            for a in inputs:
                for target in chains[a]:
                    uses.setdefault(target, []).append((a, node))
        return uses

    def ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """a is a strict ancestor of b."""
        return bool((self.anc[b] >> self.index[a]) & 1)

    def stat(self, node: Any) -> Any:
        s = self.stats.get(node) if isinstance(node, fx.Node) else None
        return s if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple) else None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        s = self.stat(node)
        return None if s is None else s[0]

    def std(self, node: Any) -> float | None:
        s = self.stat(node)
        return None if s is None or not s[1] else s[1]

    # -- factors and emission helpers --------------------------------------------------------------------

    def c(self, node: Any) -> float:
        """Factor of an original node's converted value (1 for non-live nodes, constants, unit mode)."""
        if not self.o.keep or not isinstance(node, fx.Node):
            return 1.0
        return self.factor.get(node, 1.0)

    def arg(self, user: fx.Node, a: Any) -> Any:
        """New node standing for ``a`` as seen by ``user``: residual splits route skip vs branch users;
        a parameter used by several ops enters each through its own node (see :meth:`_tie_input`)."""
        if not isinstance(a, fx.Node):
            return a
        r = self._residual_of_skip.get(a)
        if r is not None and (user is r.add or user in r.branch_users):
            if r.split is None:
                split = self.call(U.residual_split, (self.env[a], r.tau))
                r.split = (self.call(operator.getitem, (split, 0)), self.call(operator.getitem, (split, 1)))
            return r.split[0] if user is r.add else r.split[1]
        targets = self._tie_edges.get((a, user))
        return self._tie_input(user, a, targets) if targets else self.env[a]

    def _tie_input(self, user: fx.Node, a: fx.Node, targets: list[str]) -> fx.Node:
        key = (a, user)
        if key not in self._wrapped:
            if (
                self.o.keep
            ):  # backward factor set by _check.calibrate_ties: one gradient constant per parameter
                node = self.call(scaled, (self.env[a], 1.0, 1.0))
            elif a.op == "get_attr":  # the same tensor used k times: each use × k^-½ (scale.shared)
                node = self.call(shared, (self.env[a], len(self.uses[a.target])))
            else:  # disjoint slices of one tensor: nothing to share
                node = self.env[a]
            for t in targets:
                self.tie_nodes.setdefault(t, []).append(node)
            self._wrapped[key] = node
        return self._wrapped[key]

    def args(self, node: fx.Node) -> tuple[tuple, dict]:
        return fx.node.map_arg((node.args, node.kwargs), lambda a: self.arg(node, a))  # type: ignore[return-value]

    def comp(self, new: Any, c_from: float, c_to: float = 1.0, bwd: float | None = None) -> Any:
        """scaled(new, k, k) with k = c_to/c_from (forward factor c_from → c_to); nothing when equal."""
        if not isinstance(new, fx.Node) or not self.o.keep or math.isclose(c_from, c_to, rel_tol=1e-15):
            return new
        k = c_to / c_from
        return self.call(scaled, (new, k, k if bwd is None else bwd))

    def cons(self, node: fx.Node, *inputs: Any) -> str | None:
        """The op's constraint: none when every live input edge is cut
        (docs/theory.md, Cut edges and constraints)."""
        edges = [(a, node) for a in inputs if isinstance(a, fx.Node) and a in self.live]
        return None if edges and all(e in self.cut for e in edges) else self.o.constraint

    def rows(self, node: Any, width: int) -> float | None:
        """Static grad_rows for a token-level op (example rows equal to the token count), else None."""
        if self.o.grad_rows is None:
            return None
        shape = self.shape(node)
        if self.o.token_rows is None or shape is None:
            return self.o.grad_rows
        return self.o.grad_rows if math.prod(shape) // max(width, 1) == self.o.token_rows else None

    def call(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(target, args, kwargs or {})

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda a: self.arg(node, a))

    def call_new_module(
        self, node: fx.Node, module: nn.Module, args: tuple, name: str | None = None
    ) -> fx.Node:
        """Call ``module``, installed beside the code ``node`` came from (its module scope) and named after
        the op, e.g. ``encoder.layer.0.attention.self.scaled_dot_product_attention``."""
        scope = module_path(node)
        base = name or op_name(node.target)
        owner = _get(self.gm, scope)
        name, i = base, 0
        while (path := f"{scope}.{name}" if scope else name) in self.install or hasattr(owner, name):
            i += 1  # a second op of that kind in the scope, or an attribute of that name
            name = f"{base}_{i}"
        self.install[path] = module
        return self.graph.call_module(path, args, {})

    def count(self, rule: str) -> None:
        self.info.rules[rule] = self.info.rules.get(rule, 0) + 1

    # -- parameters --------------------------------------------------------------------------------------

    def direct_param(self, node: fx.Node, a: Any) -> tuple[str, nn.Parameter] | None:
        """(target, parameter) when ``a`` fetches a trainable parameter that ``node`` alone uses."""
        if not G.is_param(self.gm, a) or [u for u in a.users] != [node]:
            return None
        return a.target, G.fetch(self.gm, a.target)

    def owner(self, targets: list[str], cls: type | tuple[type, ...]) -> nn.Module | None:
        """The original module owning exactly the parameters ``targets`` (a ``cls`` instance with no other
        parameter, buffer or child), so a unit module can take its place."""
        path = targets[0].rpartition(".")[0]
        if any(t.rpartition(".")[0] != path for t in targets):
            return None
        module = _get(self.model, path)
        if not isinstance(module, cls) or list(module.children()) or list(module.buffers()):
            return None
        names = {f"{path}.{n}" if path else n for n, _ in module.named_parameters()}
        return module if names == set(targets) else None

    def unit_init(self, a: Any, kind: str) -> None:
        """init="unit": draw the parameter behind ``a`` (a fetch or a view of one) as ``kind`` (normal,
        zeros, ones), once."""
        if self.o.keep or not isinstance(a, fx.Node) or a not in self.param_only:
            return
        roots = [n for n in self.gm.graph.nodes if n.op == "get_attr" and (n is a or self.ancestor(n, a))]
        for root in roots:
            if root.target in self.initialised or not G.is_param(self.gm, root):
                continue
            self.initialised.add(root.target)
            with torch.no_grad():
                p = G.fetch(self.gm, root.target)
                if kind == "ones":
                    p.fill_(1.0)
                else:
                    p.normal_() if kind == "normal" else p.zero_()

    # -- the pass ----------------------------------------------------------------------------------------

    def run(self) -> fx.Graph:
        from unitscale.transforms._rules import RULES

        self._rules = RULES
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self._output(node)
                continue
            new, factor = self._convert(node)
            self.env[node] = new
            self.factor[node] = factor
        if not self.o.keep:
            self._init_leftovers()
        tied = [t for t, edges in self.uses.items() if len(edges) > 1 and t in self.tie_nodes]
        self.info.ties = sorted(self._aliases(t) for t in tied)
        return self.graph

    def _aliases(self, target: str) -> tuple[str, ...]:
        """Every name of the parameter at ``target`` (a tied table has two)."""
        p = G.fetch(self.gm, target)
        return tuple(sorted(n for n, q in self.gm.named_parameters(remove_duplicate=False) if q is p))

    def _output(self, node: fx.Node) -> None:
        def back(a: fx.Node) -> Any:
            new = self.arg(node, a)
            return self.comp(new, self.c(a), 1.0, bwd=1.0) if a in self.live else new

        self.graph.output(fx.node.map_arg(node.args[0], back))

    def _convert(self, node: fx.Node) -> Result:
        if node in self.absorbed or is_counter_update(node):
            return None, 1.0
        if node in self.special:
            result = self.special[node](self, node)
            if result is not None:
                self._record(node, result, "module/pattern/user rule")
                return result
            return self.unsupported(node)
        if G.is_metadata(node) and any(a in self.absorbed for a in G.node_args(node)):
            return None, 1.0  # an assertion on a tensor a pattern rule replaced
        if node.op in ("placeholder", "get_attr") or node not in self.live or G.is_metadata(node):
            return self.copy(node), 1.0
        rule = self._rules.get(node.target) or self._rules.get(getattr(node.target, "overloadpacket", None))
        if rule is not None:
            result = rule(self, node)
            if result is not None:
                self.count(rule.__name__.strip("_"))
                self._record(node, result, rule.__name__.strip("_"))
                return result
        return self.unsupported(node)

    def _record(self, node: fx.Node, result: Result, rule: str) -> None:
        if isinstance(result[0], fx.Node):
            self.info.ops[result[0].name] = (rule, describe_node(node))

    def unsupported(self, node: fx.Node, why: str = "") -> Result:
        """Report ``node``; keep it plain, its live inputs brought back to factor 1 (outputs still match)."""
        self.info.unsupported.append(describe_node(node) + (f": {why}" if why else ""))
        args, kwargs = fx.node.map_arg(
            (node.args, node.kwargs),
            lambda a: self.comp(self.arg(node, a), self.c(a)) if a in self.live else self.arg(node, a),
        )
        return self.graph.create_node(node.op, node.target, args, kwargs, node.name), 1.0

    def _init_leftovers(self) -> None:
        """init="unit": parameters no rule initialised (cls tokens, position tables, …) become N(0, 1)."""
        for node in self.gm.graph.nodes:
            if G.is_param(self.gm, node) and node.target not in self.initialised and node in self.live:
                self.unit_init(node, "normal")
                self.info.unit_initialised.append(node.target)


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__.rstrip("_")
    return target if isinstance(target, str) else getattr(target, "__name__", "op")


def _get(root: nn.Module, path: str) -> Any:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None
