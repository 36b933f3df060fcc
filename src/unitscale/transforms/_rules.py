"""The table of op rules: ATen op (overload or packet) → rule, from the ``_rules_*`` modules.

In-place variants (``add_``, ``relu_``, …) use the rule of their out-of-place op when nothing reads the
mutated tensor afterwards (the converted graph computes out of place).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from unitscale.transforms import _rules_elementwise, _rules_ops, _rules_params
from unitscale.transforms._convert import Converter, Result, Rule

aten = torch.ops.aten

_INPLACE = {aten.add_: aten.add, aten.sub_: aten.sub, aten.mul_: aten.mul, aten.div_: aten.div,
            aten.masked_fill_: aten.masked_fill}  # fmt: skip


def _inplace(rule: Rule) -> Rule:
    def checked(cv: Converter, node: fx.Node) -> Result | None:
        mutated = node.args[0]
        later = [u for u in mutated.users if u is not node and cv.index[u] > cv.index[node]]
        if later:
            return cv.unsupported(node, f"in-place op on a tensor that {later[0].name} reads afterwards")
        return rule(cv, node)

    checked.__name__ = rule.__name__
    return checked


def _table() -> dict:
    table: dict = {}
    for module in (_rules_elementwise, _rules_ops, _rules_params):
        table.update(module.RULES)
    for inplace, plain in _INPLACE.items():
        table[inplace] = _inplace(table[plain])
    for name in ("relu_", "gelu_", "silu_", "tanh_", "sigmoid_", "dropout_"):
        op = getattr(aten, name)
        for key in list(table):
            if key is op or getattr(key, "overloadpacket", None) is op:
                table[key] = _inplace(table[key])
    return table


RULES = _table()
