"""Replace every unitscale node of a graph by the plain form its op or module owns.

* a module with ``to_plain()`` becomes that torch module (``unitscale.nn.Linear`` → ``nn.Linear`` with α·W);
* a module with ``plain_forward`` and a function with a ``plain`` attribute are traced inline: their plain
  form runs on proxies of the node's inputs (parameters as the tensors themselves, so their sizes are static),
  so size-dependent scales become graph ops on ``Tensor.size``/``numel``;
* other modules (torch's own) are copied.
Every tensor of the result is a fresh copy, one per original tensor (tied weights stay tied).
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import Node

from unitscale.export._trace import fetch


class _Inliner(fx.Tracer):
    """Appends the ops of a plain form to ``graph`` at its insertion point; tensors become attributes."""

    def __init__(self, graph: fx.Graph, attrs: dict[str, Any], names: dict[int, str], prefix: str):
        super().__init__()
        self.graph, self.attrs, self.names, self.prefix = graph, attrs, names, prefix

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            if id(a) not in self.names:  # a tensor the plain form computed (a folded weight)
                name = f"{self.prefix}_plain_{len(self.attrs)}".replace(".", "_")
                self.names[id(a)] = name
                self.attrs[name] = a  # kept alive: its id stays its own
            return self.graph.get_attr(self.names[id(a)])
        return super().create_arg(a)


class _Builder:
    def __init__(self, graph: fx.Graph, root: nn.Module):
        self.graph, self.root = graph, root
        self.attrs: dict[str, Any] = {}  # target → module or tensor of the exported root
        self.names: dict[int, str] = {}  # id(original tensor) → its target in the exported root
        for name, t in [
            *root.named_parameters(remove_duplicate=False),
            *root.named_buffers(remove_duplicate=False),
        ]:
            self.names.setdefault(id(t), name)

    def value(self, a: Any) -> Any:
        """A get_attr argument as its tensor (static sizes in the plain form), other nodes as themselves."""
        if isinstance(a, Node) and a.op == "get_attr":
            value = fetch(self.root, a.target)
            if isinstance(value, Tensor):
                return value
        return a

    def inline(self, node: Node, fn: Any) -> Any:
        tracer = _Inliner(
            self.graph, self.attrs, self.names, str(node.target) if node.op == "call_module" else node.name
        )
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: a)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda a: fx.Proxy(a, tracer) if isinstance(a, Node) and a.op != "get_attr" else self.value(a),
            (args, kwargs),
        )
        with self.graph.inserting_before(node):
            out = fn(*args, **kwargs)

            # a plain form may hand back a tensor it was given (a parameter through ``scaled``): fetch it
            def node_of(v: Any) -> Any:
                if isinstance(v, fx.Proxy):
                    return v.node
                return tracer.create_arg(v) if isinstance(v, Tensor) else v

            return torch.utils._pytree.tree_map(node_of, out)


def _replace(graph: fx.Graph, node: Node, new: Any) -> None:
    if isinstance(new, (tuple, list)):
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise ValueError(f"export: {node.name} returns a tuple used as a whole by {user.name}")
            user.replace_all_uses_with(new[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(new)
    graph.erase_node(node)


def to_plain(graph: fx.Graph, root: nn.Module, class_name: str) -> fx.GraphModule:
    """``graph`` (over ``root``) with every unitscale node replaced by its plain form, as a GraphModule."""
    b = _Builder(graph, root)
    plain_modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and callable(getattr(node.target, "plain", None)):
            _replace(graph, node, b.inline(node, node.target.plain))
        elif node.op == "call_module":
            module = root.get_submodule(node.target)
            if callable(getattr(module, "to_plain", None)):
                plain_modules[node.target] = module.to_plain()
            elif callable(getattr(module, "plain_forward", None)):
                _replace(graph, node, b.inline(node, module.plain_forward))
            else:
                plain_modules[node.target] = module
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:  # e.g. a weight a unit module now holds
            graph.erase_node(node)
    for node in graph.nodes:
        node.type = None  # postponed (string) annotations of the source would break pickling
        if node.op == "get_attr" and node.target not in b.attrs:
            b.attrs[node.target] = fetch(root, node.target)
    # The tracer class would be pickled by reference: keep it out, so loading needs torch only.
    graph._tracer_cls, graph._tracer_extras = None, {}
    owner = fx.GraphModule({**b.attrs, **plain_modules}, graph, class_name=class_name)
    owner.graph.eliminate_dead_code()
    used = {n.target for n in owner.graph.nodes if n.op in ("call_module", "get_attr")}
    attrs = {t: v for t, v in {**b.attrs, **plain_modules}.items() if t in used}
    out = fx.GraphModule(_fresh(attrs), owner.graph, class_name=class_name)
    out.graph.lint()
    return out


def _fresh(attrs: dict[str, Any]) -> dict[str, Any]:
    """Deep copies sharing one copy per original tensor, so ties survive and nothing aliases the model."""
    memo: dict[int, Any] = {}
    out = {}
    for target, value in attrs.items():
        if isinstance(value, Tensor):
            if id(value) not in memo:
                memo[id(value)] = (
                    nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
                    if isinstance(value, nn.Parameter)
                    else value.detach().clone()
                )
            out[target] = memo[id(value)]
        else:
            with warnings.catch_warnings():  # torch's own deprecation inside deepcopy of pytree specs
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                out[target] = copy.deepcopy(value, memo)
    return out
