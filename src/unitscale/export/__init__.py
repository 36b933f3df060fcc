"""Export a unit-scaled model to plain PyTorch: every static unit scale folded, no unitscale at inference.

``export(model, *example_args)`` walks the model's graph and replaces each unitscale node by the plain form
its op or module owns (``to_plain`` / ``plain_forward`` / the op's ``plain`` attribute; see
``unitscale.functional_plain`` for the functional ops). Inference semantics: backward factors β do not
matter, precision backends are dropped, dropout is off. A model from ``unit_scale`` (an ``fx.GraphModule``)
is walked as it is; any other model is traced with torch.fx first, unitscale's ops as leaves.

Scales that depend on activation sizes (key length, softmax width, matmul dims, broadcast ratios) are the
rules' laws (``rules.Law``) evaluated in the graph on ``Tensor.size``/``numel``, so one exported model
serves every sequence length. Where the model's Python code branches on a traced value (a shape check, an
RNN unrolled over the sequence), the trace needs example inputs and specialises on them; each
specialisation becomes a ``torch._assert`` guard in the graph, so a mismatching input fails loudly.

``export_program(model, example_args)`` goes one step further, to a ``torch.export.ExportedProgram``.
The module is callable: ``unitscale.export(model, x)`` is ``unitscale.export.export(model, x)``.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen

from unitscale.export._inline import to_plain
from unitscale.export._trace import Tracer, forget_examples

__all__ = ["export", "export_program", "unitscale_references"]


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


def _graph_of(model: nn.Module, args: tuple, kwargs: dict) -> fx.Graph:
    """A converted model's own graph (copied, called as its capture was), or a trace of ``model``."""
    if isinstance(model, fx.GraphModule):
        graph = fx.Graph()
        graph.output(graph.graph_copy(model.graph, {}))
        info = getattr(model.graph._codegen, "pytree_info", None)
        if info is not None:
            graph.set_codegen(_PyTreeCodeGen(info))
        return graph
    examples, concrete = _root_inputs(model, args, kwargs)
    graph = Tracer(examples).trace(model, concrete_args=concrete or None)
    forget_examples(graph)
    return graph


def export(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> fx.GraphModule:
    """``model`` as a plain-torch ``fx.GraphModule`` with every unit scale folded (inference semantics).

    Example inputs (as for ``model(*example_args, **example_kwargs)``) are optional for traced models;
    without them the trace is purely symbolic and fails with ValueError where the model's Python code
    branches on a traced value. Forward parameters not given keep their defaults (e.g. ``targets=None``).
    A model from ``unit_scale`` is called as it was captured. The exported model runs in the dtype of the
    weights, drops precision backends and dropout, and has fresh copies of the tensors.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export needs an nn.Module, got {type(model).__name__}")
    training = {m: m.training for m in model.modules()}
    backends = {m: m.precision for m in model.modules() if hasattr(m, "precision")}
    try:
        model.eval()
        for m in backends:
            m.precision = None  # inference in the compute dtype: no backend, no cast
        # enable_grad: rules.activation_constants differentiates numerically, even under a caller's no_grad
        with torch.enable_grad():
            graph = _graph_of(model, example_args, example_kwargs)
            root = to_plain(graph, model, type(model).__name__ + "Exported")
    finally:
        for m, backend in backends.items():
            m.precision = backend
        for m, mode in training.items():
            m.training = mode
    leftover = unitscale_references(root)
    if leftover:
        raise ValueError(f"export: no plain-torch form for {', '.join(leftover)}")
    return root


def unitscale_references(module: nn.Module) -> list[str]:
    """Everything in an exported module that still needs unitscale: node targets, submodule classes, code."""
    found = []
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            origin = str(getattr(node.target, "__module__", ""))
            if node.op == "call_function" and origin.startswith("unitscale"):
                found.append(f"{node.name} ({origin}.{node.target.__name__})")
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


# Importing the package makes `unitscale.export` this module (Python sets the attribute on import): keep
# `unitscale.export(model, ...)` a call either way.
sys.modules[__name__].__class__ = _CallableModule
