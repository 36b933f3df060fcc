"""The graph ``export`` starts from: torch.fx with unitscale's ops as leaves.

Modules that own a plain form (``to_plain`` / ``plain_forward``) and functions that have one (a ``plain``
attribute) are leaves; everything else is traced through. With example inputs the tracer also runs every
node on them, so Python control flow on traced values (a shape check, an RNN unrolled over the sequence)
is resolved on the example and guarded in the graph (``torch._assert``), instead of failing.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import Node, map_arg
from torch.utils._pytree import tree_map

_VALUE = "unitscale_example_value"  # node.meta key: the value the node took on the example inputs


def has_plain_form(obj: Any) -> bool:
    """A unitscale module or op that says how to compute its forward in plain torch."""
    if isinstance(obj, nn.Module):
        return callable(getattr(obj, "to_plain", None)) or callable(getattr(obj, "plain_forward", None))
    return callable(getattr(obj, "plain", None))


def leaf_functions() -> list[Any]:
    """The ops with a plain form, in the namespaces models call them from."""
    from unitscale import functional, scale, transforms

    found = {
        id(f): f for mod in (functional, scale, transforms) for f in vars(mod).values() if has_plain_form(f)
    }
    return [f for f in found.values() if not isinstance(f, (type, nn.Module))]


def fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


class _Proxy(fx.Proxy):
    """A proxy that can become a Python int/length when the tracer knows its example value."""

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "an integer", guard=True))


class Tracer(fx.Tracer):
    """fx tracer with unitscale's ops as leaves, evaluating every node on the example inputs (if any)."""

    def __init__(self, examples: dict[str, Any] | None) -> None:
        from unitscale import functional, scale

        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(leaf_functions()))
        self._autowrap_search.extend([functional, scale])  # `U.linear(...)` reaches it through the module
        self.examples = examples
        self._evaluating = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if has_plain_form(m):
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
                value = fetch(self.root, node.target)
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


def forget_examples(graph: fx.Graph) -> None:
    for node in graph.nodes:
        node.meta.pop(_VALUE, None)
