"""The object ``unit_scale`` returns: an ``fx.GraphModule`` called like the original model.

It keeps the original's parameter names (its submodule tree is the original's, with unit modules in place of
the converted ``nn.Linear`` / ``nn.Embedding`` / norms), its forward signature (``inspect.signature``
shows the original's; calls are bound to it) and its output type (a Hugging Face ``ModelOutput`` stays
one), and exposes the original's public attributes (``config`` …). The graph was captured for the
arguments the example gave: calling it with another set of arguments, or other values of non-tensor
arguments (``is_causal=True``), raises ValueError saying so.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from unitscale.transforms._capture import Captured


class _SignatureCodeGen(_PyTreeCodeGen):
    """``def forward(self, *args, **kwargs)``, bound to the original signature by ``_unit_inputs``."""

    def gen_fn_def(
        self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False
    ) -> str:
        names = [
            v.split(":")[0].split("#")[0].strip() for v in free_vars if v.split(":")[0].strip() != "self"
        ]
        head = "def forward(self, *args, **kwargs):"
        return head + (f"\n    {', '.join(names)}, = self._unit_inputs(args, kwargs)" if names else "")


class UnitScaled(fx.GraphModule):
    """A unit-scaled model produced by :func:`unitscale.unit_scale` (see the module docstring)."""

    unit_signature: inspect.Signature
    unit_inputs: tuple[str, ...]

    def _unit_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        sig = self.unit_signature
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}") from None
        given: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            p = sig.parameters[name]
            if p.kind is p.VAR_KEYWORD:
                given.update(value)
            elif p.kind is not p.VAR_POSITIONAL and value is not p.default:
                given[name] = value
        given = {k: v for k, v in given.items() if not (v is None and k not in self.unit_inputs)}
        for name in self.unit_inputs:  # a constant argument left at its default: compared below
            p = sig.parameters.get(name)
            if name not in given and p is not None and p.default is not p.empty and p.default is not None:
                given[name] = p.default
        if set(given) != set(self.unit_inputs):
            raise ValueError(
                f"{type(self).__name__} was converted for the arguments ({', '.join(self.unit_inputs)}) "
                f"and called with ({', '.join(given)}): convert again with example_inputs that give the "
                "same arguments"
            )
        example = {k: given[k] for k in self.unit_inputs}
        for (path, want), (_, got) in zip(self._unit_constants, _leaves(example), strict=False):
            if want is not _TENSOR and not isinstance(got, Tensor) and got != want:
                raise ValueError(
                    f"{type(self).__name__} was converted with {path} = {want!r}, called with {got!r}: "
                    "the graph is specialised to it; convert again with that value"
                )  # fmt: skip
        return fx._pytree.tree_flatten_spec(((), example), self._in_spec)

    def to_plain(self) -> fx.GraphModule:
        """This model in plain torch (``unitscale.export``), e.g. when it is a submodule of another."""
        from unitscale.export import export

        return export(self)

    def recompile(self):
        code = super().recompile()
        self._sign_forward()
        return code

    def _sign_forward(self) -> None:
        """Give the generated forward the original's signature (with `self`, which inspect drops)."""
        if "unit_signature" in self.__dict__:
            params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            sig = self.unit_signature
            type(self).forward.__signature__ = sig.replace(parameters=params + list(sig.parameters.values()))

    def __deepcopy__(self, memo: dict[int, Any]) -> UnitScaled:
        with warnings.catch_warnings():  # torch's own deprecation inside deepcopy of pytree specs
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            res = super().__deepcopy__(memo)
        for name in _EXTRA:
            if name in self.__dict__:
                setattr(res, name, copy.deepcopy(self.__dict__[name], memo))
        type(res).__name__ = type(self).__name__
        res._sign_forward()
        return res


_TENSOR = object()
_EXTRA = ("unit_signature", "unit_inputs", "_unit_constants", "unit_scale_info", "original_class", "config")


def _leaves(example: dict[str, Any]) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(example)
    return [(pytree.keystr(path), value) for path, value in flat]


def build(captured: Captured, model: nn.Module, graph: fx.Graph, install: dict[str, nn.Module]) -> UnitScaled:
    """Turn the captured module into the unit-scaled one: install ``install`` (path → module), give it
    ``graph`` with the original's call signature, and the original's public attributes."""
    gm = captured.gm
    for name in ("train", "eval"):  # torch.export's module refuses both; the converted model follows them
        gm.__dict__.pop(name, None)
    gm._forward_pre_hooks.clear()  # export's input checks expect its own call convention
    gm._forward_pre_hooks_with_kwargs.clear()
    gm._forward_hooks.clear()
    gm._forward_hooks_always_called.clear()
    for path, module in sorted(install.items(), key=lambda item: item[0].count(".")):
        _set(gm, path, module)
    # One class per instance, as fx makes them (qualname GraphModuleImpl: copies derive from UnitScaled).
    cls = type(f"Unit{type(model).__name__}", (UnitScaled,), {"__module__": UnitScaled.__module__})
    cls.__qualname__ = "GraphModuleImpl"
    gm.__class__ = cls
    gm.unit_signature = captured.signature
    gm.unit_inputs = tuple(captured.example)
    gm._unit_constants = [
        (p, v if not isinstance(v, Tensor) else _TENSOR) for p, v in _leaves(captured.example)
    ]
    gm.original_class = type(model)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:  # parameters that unit modules now call themselves
            graph.erase_node(node)
    graph.set_codegen(_SignatureCodeGen(captured.gm.graph._codegen.pytree_info))
    gm.graph = graph  # recompiles
    gm.graph.lint()
    for name, value in vars(model).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)
    return gm


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    *scopes, name = path.split(".")
    owner = root
    for scope in scopes:  # a module scope the capture did not need (no parameters): create it
        if not hasattr(owner, scope):
            owner.add_module(scope, nn.Module())
        owner = getattr(owner, scope)
    setattr(owner, name, module)
