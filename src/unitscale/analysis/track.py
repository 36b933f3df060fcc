"""``track_scales``: one forward and backward pass of any ``nn.Module``, recording every tensor's scale.

What is recorded (``site`` groups a forward tensor with the gradient of the same op):

=========================  ===================================  ===========================================
site                       forward record                       backward record
=========================  ===================================  ===========================================
``path`` (every module)    ``path / output``                    ``path / grad_input`` (the gradient the
                                                                module sends to its input; ``[i]`` per
                                                                input when several need a gradient)
``path / op`` (functional  ``path / op``: output of ``op``      ``path / op.grad_input``
op inside a forward)       called in ``path``'s forward
``path / weight`` (param)  ``path / weight``                    ``path / weight.grad``
=========================  ===================================  ===========================================

Mechanism (no model edits; everything is removed afterwards): module forward pre-hooks and forward hooks
(outputs; a module stack naming functional ops), a ``TorchFunctionMode`` catching the functional ops of
``OPS`` called with grad enabled, and gradient probes: each differentiable input of a module or op is
replaced by a fresh alias ``x.view_as(x)`` whose tensor hook receives exactly the gradient that flows back
through that module or op (the alias has no other consumer). Unlike ``register_full_backward_hook``, an
alias of a builtin view survives in-place ops on module outputs. Ops inside a built-in ``torch.nn`` leaf
module (``F.linear`` in ``nn.Linear``) are the module itself and are not repeated; ops nested inside
another torch function (the internals of ``F.multi_head_attention_forward``) are not visible to the mode.
Custom autograd Functions are opaque: their output is recorded where a module returns it.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from unitscale.analysis.report import ScaleReport, build_records
from unitscale.analysis.stats import tensor_stats
from unitscale.formats import get_format

ROOT = "model"
LOSS = "loss_fn"


def _op_table() -> dict[Callable, str]:
    groups: dict[str, list[Any]] = {
        "matmul": [torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.mm, Tensor.mm,
                   torch.baddbmm, torch.einsum],
        "linear": [F.linear],
        "softmax": [torch.softmax, F.softmax, Tensor.softmax],
        "log_softmax": [torch.log_softmax, F.log_softmax, Tensor.log_softmax],
        "attention": [F.scaled_dot_product_attention],
        "gelu": [F.gelu],
        "relu": [F.relu, torch.relu, Tensor.relu],
        "silu": [F.silu],
        "tanh": [torch.tanh, Tensor.tanh, F.tanh],
        "sigmoid": [torch.sigmoid, Tensor.sigmoid, F.sigmoid],
        "layer_norm": [F.layer_norm],
        "rms_norm": [F.rms_norm],
        "embedding": [F.embedding],
        "dropout": [F.dropout],
        "cross_entropy": [F.cross_entropy],
        "mse_loss": [F.mse_loss],
    }
    return {fn: name for name, fns in groups.items() for fn in fns}


OPS: dict[Callable, str] = _op_table()


def _float_leaves(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def _is_nn_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None


class _Tracker:
    """Holds the hooks' state; records hold device tensors until ``report()`` copies them once."""

    def __init__(self, model: nn.Module, fmt: Any, ops: bool, params: bool) -> None:
        self.model, self.fmt, self.ops, self.params = model, fmt, ops, params
        self.paths = {m: (name or ROOT) for name, m in model.named_modules()}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.calls: dict[nn.Module, int] = defaultdict(int)
        self.op_counts: dict[tuple[str, str], int] = defaultdict(int)
        self.stack: list[tuple[nn.Module, str]] = []
        self.entries: list[dict[str, Any]] = []
        self.seen_params: dict[int, tuple[nn.Parameter, str, str]] = {}
        self.order = itertools.count()
        self.in_loss = False

    # -- recording -------------------------------------------------------------------------------------
    def record(self, t: Tensor, *, site: str, module: str, op: str, role: str, pass_: str) -> None:
        name = f"{module} / {op}"
        self.entries.append(
            {
                "name": name, "site": site, "module": module, "op": op, "role": role, "pass": pass_,
                "shape": tuple(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                "order": next(self.order), "stats": tensor_stats(t, self.fmt),
            }
        )

    def probe(self, tree: Any, *, site: str, module: str, op_prefix: str) -> Any:
        """Replace each differentiable float tensor in ``tree`` by an alias whose hook records its grad."""
        if not torch.is_grad_enabled():
            return tree
        leaves, spec = tree_flatten(tree)
        idx = [i for i, t in enumerate(leaves)
               if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
        for k, i in enumerate(idx):
            op = f"{op_prefix}grad_input" + (f"[{k}]" if len(idx) > 1 else "")
            alias = leaves[i].view_as(leaves[i])
            alias.register_hook(self._grad_hook(site=site, module=module, op=op))
            leaves[i] = alias
        return tree_unflatten(leaves, spec) if idx else tree

    def _grad_hook(self, **where: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.record(grad, role="gradient", pass_="backward", **where)

        return hook

    # -- module hooks ----------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.calls[module] += 1
        n = self.calls[module]
        path = self.paths.get(module, type(module).__name__)
        tag = path if n == 1 else f"{path}#{n}"
        self.stack.append((module, tag))
        if self.params and n == 1:
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in self.seen_params:
                    self.seen_params[id(p)] = (p, path, pname)
                    self.record(p, site=f"{path} / {pname}", module=path, op=pname, role="weight",
                                pass_="forward")
        return self.probe((args, kwargs), site=tag, module=tag, op_prefix="")

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        _, tag = self.stack.pop()
        outs = _float_leaves(output)
        for k, t in enumerate(outs):
            op = "output" + (f"[{k}]" if len(outs) > 1 else "")
            self.record(t, site=tag, module=tag, op=op, role="activation", pass_="forward")

    # -- functional ops --------------------------------------------------------------------------------
    def op_site(self, name: str) -> tuple[str, str] | None:
        """(module tag, op label) for a functional op called now, or None when it should not be recorded."""
        if self.stack:
            module, tag = self.stack[-1]
            if _is_nn_leaf(module):
                return None
        elif self.in_loss:
            tag = LOSS
        else:
            return None
        self.op_counts[(tag, name)] += 1
        n = self.op_counts[(tag, name)]
        return tag, name if n == 1 else f"{name}#{n}"

    def leftover_params(self) -> None:
        """Parameters used outside any module's own forward (never seen by a pre-hook)."""
        if not self.params:
            return
        for name, p in self.model.named_parameters():
            if id(p) not in self.seen_params and p.grad is not None:
                module, _, pname = name.rpartition(".")
                module = module or ROOT
                self.seen_params[id(p)] = (p, module, pname)
                self.record(p, site=f"{module} / {pname}", module=module, op=pname, role="weight",
                            pass_="forward")
                # Weights are read before the module that uses them: move the record next to the first
                # record of its nearest recorded ancestor, so the plot shows it beside its module.
                entry = self.entries.pop()
                self.entries.insert(self._anchor(module), entry)
        for i, entry in enumerate(self.entries):
            entry["order"] = i

    def _anchor(self, module: str) -> int:
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            for i, e in enumerate(self.entries):
                if e["module"] == prefix or e["module"].startswith(prefix + "."):
                    return i
        return len(self.entries)

    def record_param_grads(self) -> None:
        for p, module, pname in self.seen_params.values():
            if p.grad is not None:
                self.record(p.grad, site=f"{module} / {pname}", module=module, op=f"{pname}.grad",
                            role="weight_grad", pass_="backward")


class _OpMode(TorchFunctionMode):
    """Records torch functional ops, and unitscale's scaled ops as whole ops.

    A unitscale op (``unitscale.functional.*``) is recorded by its own output and input gradients, i.e.
    after its α and β; the torch functions it calls internally are not recorded, since their tensors sit
    before those factors and do not exist in the scaled model's numerics.
    """

    # Skipped: inputs that are not tensors a person would read (indices, sizes, taus).
    _UNIT_OPS = tuple(n for n in ("add", "cross_entropy", "dropout", "embedding", "gelu", "layer_norm",
                                  "linear", "linear_readout", "matmul", "relu", "residual_add", "rms_norm",
                                  "scaled_dot_product_attention", "sigmoid", "silu", "softmax", "tanh",
                                  "weighted_add"))

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.depth = 0  # > 0 while inside a unitscale op
        self.saved: dict[str, Callable] = {}

    def __enter__(self):  # type: ignore[override]
        import unitscale.functional as U

        for name in self._UNIT_OPS:
            self.saved[name] = getattr(U, name)
            setattr(U, name, self._wrap(name, self.saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[override]
        import unitscale.functional as U

        for name, fn in self.saved.items():
            setattr(U, name, fn)
        self.saved.clear()
        return super().__exit__(*exc)

    def _observe(self, name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        where = self.tracker.op_site(name) if self.depth == 0 and torch.is_grad_enabled() else None
        if where is None:
            return fn(*args, **kwargs)
        tag, label = where
        site = f"{tag} / {label}"
        args, kwargs = self.tracker.probe((args, kwargs), site=site, module=tag, op_prefix=f"{label}.")
        out = fn(*args, **kwargs)
        outs = _float_leaves(out)
        for k, t in enumerate(outs):
            op = label + (f"[{k}]" if len(outs) > 1 else "")
            self.tracker.record(t, site=site, module=tag, op=op, role="activation", pass_="forward")
        return out

    def _wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def observed(*args: Any, **kwargs: Any) -> Any:
            out = self._observe(name, self._inside(fn), args, kwargs)
            return out

        return observed

    def _inside(self, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return run

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = OPS.get(func)
        if name is None or self.depth > 0:
            return func(*args, **kwargs)
        return self._observe(name, func, args, kwargs)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def _default_backward(output: Any, seed: int) -> None:
    """Backward from the model's own loss if it returns one, else a unit-Gaussian gradient per output.

    A loss is: the output itself when 0-d; the last 0-d tensor of a tuple/list output (``(logits, loss)``);
    ``output["loss"]`` / ``output.loss`` when present. Otherwise every floating output receives a
    N(0, 1) gradient (the unit-σ incoming gradient that unit scaling assumes).
    """
    loss = None
    if isinstance(output, Tensor) and output.dim() == 0:
        loss = output
    elif isinstance(output, tuple | list):
        scalars = [t for t in output if isinstance(t, Tensor) and t.dim() == 0 and t.requires_grad]
        loss = scalars[-1] if scalars else None
    elif isinstance(output, Mapping):
        loss = output.get("loss")
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    if isinstance(loss, Tensor) and loss.requires_grad:
        loss.backward()
        return
    outs = [t for t in _float_leaves(output) if t.requires_grad]
    if not outs:
        raise ValueError("track_scales: the model output has no tensor that requires grad; pass loss_fn")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype) for t in outs]
    torch.autograd.backward(outs, grads)


def track_scales(
    model: nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    fmt: str = "e4m3",
    ops: bool = True,
    params: bool = True,
    seed: int = 0,
) -> ScaleReport:
    """Run one forward and backward pass of ``model`` and record the scale of every tensor it produces.

    ``inputs``: a tensor (``model(x)``), a tuple/list (``model(*inputs)``) or a mapping
    (``model(**inputs)``). ``loss_fn(output) -> scalar``; without it the model's own loss is used, or a
    unit-Gaussian output gradient (see ``_default_backward``; ``seed`` fixes it). ``fmt`` names the format
    (``unitscale.formats.get_format``) whose overflow / subnormal / flush-to-zero fractions are recorded.
    ``ops`` records functional ops inside module forwards; ``params`` records weights and their gradients.
    The model's mode (train/eval) is left as it is; its existing ``.grad`` values are restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"track_scales needs an nn.Module, got {type(model).__name__}")
    format_ = get_format(fmt)
    tracker = _Tracker(model, format_, ops=ops, params=params)
    saved_grads = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(tracker.post_hook, with_kwargs=True))
    mode = _OpMode(tracker) if ops else None
    try:
        with torch.enable_grad():
            if mode is not None:
                mode.__enter__()
            try:
                output = _call(model, inputs)
                if loss_fn is not None:
                    tracker.in_loss = True
                    loss = loss_fn(output)
                    tracker.in_loss = False
            finally:
                if mode is not None:
                    mode.__exit__(None, None, None)
            if loss_fn is not None:
                if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise ValueError(
                        "track_scales: loss_fn must return a one-element tensor that requires grad, "
                        f"got {type(loss).__name__}"
                    )
                loss.backward()
            else:
                _default_backward(output, seed)
        tracker.leftover_params()
        tracker.record_param_grads()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = saved_grads.get(id(p))
    return ScaleReport(build_records(tracker.entries), fmt=format_.name, model=type(model).__name__)

