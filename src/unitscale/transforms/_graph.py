"""Graph side of the conversion: tracing, and the facts the rules need about each fx node.

* ``live``: the node depends on a trainable parameter (masks, positions, sizes and raw inputs do not;
  they pass through the conversion unchanged, factor 1).
* ancestors (as bit sets), to tell a residual ``skip + f(skip)`` from an add of independent tensors;
* cut edges: an edge u → v is cut when removing it disconnects the undirected graph of live nodes and the
  output (a bridge, found by Tarjan's algorithm); ops consuming only cut edges may be unconstrained
  (REFERENCE §1.3);
* example statistics (shape, σ in float64) of every node, recorded by running the original graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from unitscale.transforms._modules import UnitMultiheadAttention

# Module types converted by a module rule (kept whole as fx leaves).
LEAF_TYPES: tuple[type, ...] = (
    nn.Linear,
    nn.Embedding,
    nn.LayerNorm,
    nn.Dropout,
    nn.MultiheadAttention,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softmax,
    nn.Identity,
    nn.Flatten,
)
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"})
METADATA_METHODS = frozenset({"size", "dim", "numel", "type", "get_device"})


class UnitTracer(fx.Tracer):
    """Leaves: the convertible module types, and any other parameter-free-of-children torch.nn / unitscale
    module (so that unsupported ones, e.g. nn.Conv2d, appear by name). Containers are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (*LEAF_TYPES, UnitMultiheadAttention)):
            return True
        origin = type(m).__module__
        if origin.startswith(("unitscale.nn", "unitscale.precision")):
            return True  # already unit-scaled / quantised: reported, never converted twice
        return origin.startswith("torch.nn") and not isinstance(
            m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        )


def node_args(node: fx.Node) -> Iterator[fx.Node]:
    """Every node occurrence in ``node``'s args and kwargs (with multiplicity)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return iter(found)


def is_metadata(node: fx.Node) -> bool:
    """Ops returning sizes / dtypes / devices: never live, whatever their input."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in METADATA_ATTRS
    return node.op == "call_method" and node.target in METADATA_METHODS


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on a trainable parameter."""
    modules = dict(gm.named_modules())
    live: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output" or is_metadata(node):
            continue
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, nn.Parameter) and value.requires_grad:
                live.add(node)
            continue
        if node.op == "call_module" and any(p.requires_grad for p in modules[node.target].parameters()):
            live.add(node)
            continue
        if any(a in live for a in node_args(node)):
            live.add(node)
    return live


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def ancestors(graph: fx.Graph) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """(index of each node, bit set of its strict ancestors)."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    anc: dict[fx.Node, int] = {}
    for n in graph.nodes:
        bits = 0
        for a in n.all_input_nodes:
            bits |= anc[a] | (1 << index[a])
        anc[n] = bits
    return index, anc


def cut_edges(graph: fx.Graph, live: set[fx.Node]) -> set[tuple[fx.Node, fx.Node]]:
    """Pairs (u, v) whose single edge u → v is a bridge of the undirected graph of live nodes + output."""
    nodes = [n for n in graph.nodes if n in live or n.op == "output"]
    pos = {n: i for i, n in enumerate(nodes)}
    edges: list[tuple[int, int]] = []
    count: dict[tuple[fx.Node, fx.Node], int] = {}
    for v in nodes:
        for u in node_args(v):
            if u in pos:
                edges.append((pos[u], pos[v]))
                count[(u, v)] = count.get((u, v), 0) + 1
    bridges = {(nodes[a], nodes[b]) for a, b in (edges[e] for e in _bridges(len(nodes), edges))}
    return {pair for pair in bridges if count[pair] == 1}


def _bridges(n: int, edges: list[tuple[int, int]]) -> set[int]:
    """Indices of bridge edges (Tarjan, iterative; parallel edges are never bridges)."""
    adj: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for e, (u, v) in enumerate(edges):
        adj[u].append((v, e))
        adj[v].append((u, e))
    disc, low, out, clock = [-1] * n, [0] * n, set(), 0
    for root in range(n):
        if disc[root] != -1:
            continue
        disc[root] = low[root] = clock
        clock += 1
        stack = [(root, -1, iter(adj[root]))]
        while stack:
            u, parent_edge, it = stack[-1]
            for v, e in it:
                if e == parent_edge:
                    continue
                if disc[v] == -1:
                    disc[v] = low[v] = clock
                    clock += 1
                    stack.append((v, e, iter(adj[v])))
                    break
                low[u] = min(low[u], disc[v])
            else:
                stack.pop()
                if stack:
                    p = stack[-1][0]
                    low[p] = min(low[p], low[u])
                    if low[u] > disc[p]:
                        out.add(parent_edge)
    return out


def summarise(value: Any) -> Any:
    """(shape, σ) of a tensor (σ in float64, None when not floating), recursively for tuples/lists."""
    if isinstance(value, Tensor):
        std = None
        if value.is_floating_point() and value.numel() > 1:
            v = value.detach().double()
            std = float(v[torch.isfinite(v)].std()) if torch.isfinite(v).any() else None
        return (tuple(value.shape), std)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(summarise(v) for v in value)
    return None


class Recorder(fx.Interpreter):
    """Runs the original graph on example inputs, keeping each node's :func:`summarise`."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.stats: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.stats[n] = summarise(result)
        return result


def record(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[fx.Node, Any]:
    """Per-node example statistics; kwargs are matched to placeholders by name."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"example inputs {unknown} are not arguments of the model; accepted: {names}")
    full = list(args)
    for name in names[len(args) :]:
        if name in kwargs:
            full.append(kwargs[name])
        else:
            default = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name).args
            full.append(default[0] if default else None)
    rec = Recorder(gm)
    with torch.no_grad():
        rec.run(*full)
    return rec.stats
