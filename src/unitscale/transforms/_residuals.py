"""Residual connections of a captured graph: an add ``skip + f(skip)`` (skip an ancestor of the other
operand), and the τ each gets (docs/convert.md, options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from unitscale import functional as U

if TYPE_CHECKING:
    from unitscale.transforms._convert import Converter

aten = torch.ops.aten
ATTENTION_OPS = {aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default}


@dataclass
class Residual:
    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    branch_users: set[fx.Node]
    attention: bool
    tau: float = 0.5
    split: tuple[fx.Node, fx.Node] | None = None


def find_residuals(cv: Converter) -> dict[fx.Node, Residual]:
    found: dict[fx.Node, Residual] = {}
    skips: set[fx.Node] = set()
    adds = {aten.add.Tensor, aten.add_.Tensor}
    for node in cv.gm.graph.nodes:
        if node.target not in adds or node not in cv.live or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs.get("alpha", 1) != 1:
            continue
        for skip, branch in ((a, b), (b, a)):
            usable = skip not in cv.param_only and (skip in cv.live or skip.op == "placeholder")
            if usable and branch in cv.live and skip not in skips and cv.ancestor(skip, branch):
                users = {u for u in skip.users if u is branch or cv.ancestor(u, branch)}
                attention = any(
                    n.target in ATTENTION_OPS
                    for n in cv.gm.graph.nodes
                    if n is branch or (cv.ancestor(skip, n) and cv.ancestor(n, branch))
                )
                found[node] = Residual(node, skip, branch, users, attention)
                skips.add(skip)
                break
    for i, r in enumerate(found.values()):
        r.tau = _tau(cv, i, r)
    return found


def _tau(cv: Converter, i: int, r: Residual) -> float:
    tau = cv.o.tau
    if isinstance(tau, float):
        return tau
    if tau == "running_mean":
        return U.residual_tau(i, "running_mean", offset=2)
    if tau == "match":
        s, b = cv.std(r.skip), cv.std(r.branch)
        if s and b:
            ratio = b / s
            return min(max(ratio * ratio / (1 + ratio * ratio), 1e-3), 1 - 1e-3)
    return cv.o.tau_attention if r.attention else cv.o.tau_mlp
