"""Facts the conversion needs about each node of a captured (ATen) graph.

* ``live``: the node depends on a trainable parameter (masks, positions, sizes, raw inputs and buffers do
  not; they pass through the conversion unchanged, factor 1);
* ancestors (as bit sets), to tell a residual ``skip + f(skip)`` from an add of independent tensors;
* cut edges: an edge u → v between activations is cut when removing it disconnects the undirected graph of
  live nodes and the output (a bridge, found by Tarjan's algorithm); an op whose live inputs all arrive over
  cut edges may be unconstrained (docs/theory.md, Cut edges and constraints). Parameters are left out of
  this graph: a parameter's edges are cut by definition, and a parameter used by several ops (a tie) gets one
  gradient constant by the tie rule of the conversion, not by constraining the activations between its uses.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

aten = torch.ops.aten

# Ops whose result depends only on their inputs' sizes, dtypes or devices (never on values).
METADATA_OPS = frozenset({
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
})  # fmt: skip


# Ops that only rearrange, select or re-type values: a parameter seen through them is still that parameter.
VIEW_OPS = frozenset({
    aten.view, aten._unsafe_view, aten.reshape, aten.transpose, aten.permute, aten.t, aten.expand,
    aten.expand_as, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
    aten.narrow, aten.unsqueeze, aten.squeeze, aten.flatten, aten.unflatten, aten.contiguous, aten.clone,
    aten.alias, aten.to, aten._to_copy, aten.detach, operator.getitem,
})  # fmt: skip


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "overloadpacket", node.target) in VIEW_OPS


def node_args(node: fx.Node) -> Iterator[fx.Node]:
    """Every node occurrence in ``node``'s args and kwargs (with multiplicity)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return iter(found)


def fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_metadata(node: fx.Node) -> bool:
    """Nodes returning sizes / asserting dtypes: never live, whatever their input."""
    if node.op == "call_function":
        return node.target in METADATA_OPS or node.target is getattr
    return node.op == "call_module"  # the captured graph's only module call is its guard function


def is_param(gm: fx.GraphModule, node: Any) -> bool:
    """``node`` fetches a trainable parameter."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = fetch(gm, node.target)
    return isinstance(value, nn.Parameter) and value.requires_grad


def live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that depend on a trainable parameter."""
    live: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output" or is_metadata(node):
            continue
        if is_param(gm, node) or any(a in live for a in node_args(node)):
            live.add(node)
    return live


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
    """Pairs (u, v) whose single edge u → v is a bridge of the undirected graph of live activations
    (parameter fetches left out) and the output."""
    nodes = [n for n in graph.nodes if (n in live and n.op != "get_attr") or n.op == "output"]
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


def as_tensor_meta(node: Any) -> torch.Tensor | None:
    """The fake tensor torch.export recorded for ``node`` (shape with symbolic sizes, dtype)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None
