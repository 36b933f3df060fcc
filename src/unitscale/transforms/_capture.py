"""Graph capture for ``unit_scale``: ``torch.export`` (non-strict) of the model's training graph.

``torch.export.export(model, (), kwargs, strict=False)`` runs the model's own Python (Hugging Face models
included) and records the ATen ops it calls, with every parameter at its original path, each node's module
path (``nn_module_stack``) and source line (``stack_trace``). Every tensor dimension is marked
``Dim.AUTO``, so the graph stays valid at other batch sizes and sequence lengths wherever the model allows.
The example inputs are normalised to keyword arguments of the model's ``forward``; arguments left out (or
given as their default) are fixed to their defaults.

:class:`EvalSemantics` runs a captured graph deterministically (dropout off, attention dropout 0, batch
norm on its running statistics): the reference the conversion measures and checks itself against.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_map

aten = torch.ops.aten

DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
            aten.alpha_dropout.default}  # fmt: skip
BATCH_NORMS = {aten.batch_norm.default}


@dataclass
class Captured:
    """A captured model: its graph module (parameters at their original paths) and how it is called."""

    gm: fx.GraphModule
    signature: inspect.Signature
    example: dict[str, Any]  # the captured keyword inputs, by name, in the model's parameter order
    dynamic: bool  # captured with dynamic sizes (else specialised to the example's shapes)


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) from a Tensor, a tuple/list of positional inputs or a dict of keyword inputs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(
        f"example_inputs must be a Tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def keyword_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[inspect.Signature, dict[str, Any]]:
    """The model's forward signature and the example as {parameter name: value}, defaults left out."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"example inputs do not match {type(model).__name__}.forward{sig}: {err}") from None
    given: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        p = sig.parameters[name]
        if p.kind is p.VAR_KEYWORD:
            given.update(value)
        elif p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY:
            if value not in ((), None):
                raise ValueError(
                    f"unit_scale: {type(model).__name__}.forward takes {name!r} positionally only; "
                    "wrap the model in a module whose forward names its inputs"
                )
        elif value is not p.default:
            given[name] = value
    return sig, given


def _auto_dims(value: Any) -> Any:
    return tree_map(lambda v: {i: torch.export.Dim.AUTO for i in range(v.dim())} or None
                    if isinstance(v, Tensor) else None, value)  # fmt: skip


def capture(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True) -> Captured:
    """Deep-copy ``model`` (in training mode) and capture it with ``torch.export`` on the example inputs.

    The copy's parameters are the captured module's: ``unit_scale`` rewrites those, never the user's.
    With ``dynamic`` every size is ``Dim.AUTO`` (a model that cannot run with dynamic sizes is captured at
    the example's sizes); symbolic sizes make the capture several times slower. Raises ValueError naming
    the model and torch.export's reason when capture fails.
    """
    sig, given = keyword_inputs(model, args, kwargs)
    with warnings.catch_warnings():  # torch's own deprecation inside deepcopy of export's pytree specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        root = copy.deepcopy(model).train()  # training graph: dropout, batch norm follow .train()/.eval()
    dynamic_shapes = {name: _auto_dims(value) for name, value in given.items()}
    errors = []
    for symbolic in (True, False) if dynamic else (False,):
        try:
            with torch.enable_grad():
                program = torch.export.export(
                    root, (), given, dynamic_shapes=dynamic_shapes if symbolic else None, strict=False
                )
            gm = program.module()
            return Captured(gm, sig, given, symbolic)
        except Exception as err:  # torch.export raises many kinds; report the first reason
            errors.append(f"{type(err).__name__}: {_first_lines(str(err))}")
    raise ValueError(f"torch.export could not capture {type(model).__name__}: {errors[-1]}")


def _first_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[:n])


# -- where a node came from --------------------------------------------------------------------------------


def module_stack(node: fx.Node) -> list[tuple[str, str, str]]:
    """(call key, module path, class name) from the outermost to the innermost module of ``node``'s call;
    the key tells apart two calls of one module (``relu``, ``relu@1``)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, (path, cls) in stack.items():
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        out.append((key, path, name))
    return out


def module_path(node: fx.Node) -> str:
    """Path of the innermost module whose forward ran ``node`` ('' for the root)."""
    stack = module_stack(node)
    return stack[-1][1] if stack else ""


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_LIBRARY = ("/torch/", "/unitscale/", "/transformers/utils/", "/transformers/integrations/")


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the innermost user frame that produced ``node`` ('' when unknown)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [f for f in frames if not any(part in f[0] for part in _LIBRARY)] or frames
    if not user:
        return ""
    file, line, _, code = user[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line}: {code.strip()}"


def describe_node(node: fx.Node) -> str:
    """``op at 'module.path' (file:line: code)`` for error messages."""
    target = node.target
    name = (
        str(target)
        if isinstance(target, (str, torch._ops.OpOverload))
        else getattr(target, "__name__", str(target))
    )
    where = module_path(node)
    text = f"{name} at '{where}'" if where else f"{name} (node {node.name})"
    line = source_line(node)
    return f"{text} ({line})" if line else text


# -- deterministic runs ------------------------------------------------------------------------------------


def is_counter_update(node: fx.Node) -> bool:
    """``num_batches_tracked += 1`` of a batch norm: the converted graph's batch norm does it itself."""
    if node.op != "call_function" or node.target is not aten.add_.Tensor:
        return False
    first = node.args[0]
    return (
        isinstance(first, fx.Node) and first.op == "get_attr" and first.target.endswith("num_batches_tracked")
    )


class EvalSemantics(fx.Interpreter):
    """Runs a captured graph as the model's eval mode would: dropout and SDPA dropout off, batch norm on its
    running statistics, no buffer updates. ``on_value(node, value)`` sees every node's result."""

    def __init__(self, gm: fx.GraphModule, on_value=None):
        super().__init__(gm)
        self.on_value = on_value

    def run_node(self, n: fx.Node) -> Any:
        if is_counter_update(n):
            return None
        if n.op == "call_function" and n.target in DROPOUTS:
            result = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
        elif n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = list(args), dict(kwargs)
            if len(args) > 4:
                args[4] = 0.0
            else:
                kwargs["dropout_p"] = 0.0
            result = n.target(*args, **kwargs)
        elif n.op == "call_function" and n.target in BATCH_NORMS:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = list(args)
            args[5] = False  # training
            result = n.target(*args, **kwargs)
        else:
            result = super().run_node(n)
        if self.on_value is not None:
            self.on_value(n, result)
        return result


def flat_inputs(captured: Captured) -> list[Any]:
    """The example as the flat list of the captured graph's placeholders."""
    spec = captured.gm._in_spec
    return fx._pytree.tree_flatten_spec(((), captured.example), spec)


def run_eval(gm: fx.GraphModule, flat: list[Any], on_value=None) -> Any:
    """Run ``gm``'s graph on flat inputs with :class:`EvalSemantics` (no gradient)."""
    with torch.no_grad():
        return EvalSemantics(gm, on_value).run(*flat, enable_io_processing=False)


def summarise(value: Any, with_std: bool = True) -> Any:
    """(shape, σ) of a tensor (σ in float64 over finite entries; None when not floating or not asked)."""
    if isinstance(value, Tensor):
        std = None
        if with_std and value.is_floating_point() and value.numel() > 1:
            v = value.detach().double()
            finite = torch.isfinite(v)
            std = float(v[finite].std()) if finite.sum() > 1 else None
        return (tuple(value.shape), std)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(summarise(v, with_std) for v in value)
    return None


def record(captured: Captured, with_std: bool = True) -> dict[fx.Node, Any]:
    """Per-node (shape, σ) of the captured graph on the example, with eval semantics."""
    stats: dict[fx.Node, Any] = {}
    run_eval(captured.gm, flat_inputs(captured), lambda n, v: stats.__setitem__(n, summarise(v, with_std)))
    return stats
