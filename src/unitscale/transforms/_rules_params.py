"""Rules for ops with parameters: linear (``linear``, GPT-2's ``addmm``, ``x @ W``), convolution, embedding,
layer/RMS/group/batch norm.

A parameter that the op alone uses is rescaled in place (``init="keep"``) to absorb the factors:

    linear / conv  W_u = W·c_out/(α·c_in), b_u = b·c_out      → c_out (``rescale`` picks it)
    embedding      T_u = T·c_out                             → c_out
    norms          LN(c·x; eps·c²) = LN(x; eps); batch norm running mean·c, variance·c²  → 1
A parameter used by several ops (a tie), a slice of one, or a view keeps its values: the output factor is
α·c_in and a bias gets a compensation. A single-use ``nn.Linear`` / ``nn.Embedding`` / ``nn.LayerNorm`` /
``nn.RMSNorm`` (or subclass) becomes the unit module at the same path, owning the same parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from unitscale import functional as U
from unitscale import nn as unn
from unitscale import rules
from unitscale.transforms._convert import Converter, Result, as_tensor_meta
from unitscale.transforms._graph import fetch
from unitscale.transforms._modules import BatchNormAt, ConvAt, LinearAt

aten = torch.ops.aten


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _install(cv: Converter, path: str, module: nn.Module, params: dict[str, Any]) -> None:
    for name, p in params.items():
        setattr(module, name, p)
    cv.install[path] = module


# -- linear --------------------------------------------------------------------------------------------------


def linear_like(cv: Converter, node: fx.Node, x: Any, w: Any, b: Any, transposed: bool) -> Result | None:
    """x·Wᵀ + b (``transposed``: W stored (in, out)) as a unit linear (readout when x's edge is cut)."""
    meta = as_tensor_meta(w)
    if meta is None or meta.dim() != 2 or x in cv.param_only:
        return None
    in_f, out_f = (
        (int(meta.shape[0]), int(meta.shape[1])) if transposed else (int(meta.shape[1]), int(meta.shape[0]))
    )
    readout = (x, node) in cv.cut
    constraint = cv.o.constraint
    rule = rules.readout_rule if readout else rules.linear_rule
    fan_out = _sibling_fan_out(cv, x) or out_f
    alpha = rule(in_f, fan_out, 1).resolve(None if readout else constraint)[0]
    siblings = fan_out if fan_out != out_f else None
    cv.unit_init(w, "normal")
    cv.unit_init(b, "zeros")
    owned_w = cv.direct_param(node, w)
    owned_b = cv.direct_param(node, b) if b is not None else None
    c_in, c_out = cv.c(x), 1.0
    if cv.o.keep:
        c_out = alpha * c_in
        if owned_w is not None:
            weight = owned_w[1]
            c_out = _output_factor(cv, node, weight, alpha * c_in)
            with torch.no_grad():
                weight.mul_(c_out / (alpha * c_in))
        if owned_b is not None:
            with torch.no_grad():
                owned_b[1].mul_(c_out)
    bias = None if b is None else (cv.arg(node, b) if owned_b else cv.comp(cv.arg(node, b), 1.0, c_out))
    grad_rows = cv.rows(x, in_f)
    targets = [t for t in (owned_w, owned_b) if t is not None]
    module = None
    if not transposed and owned_w is not None and (b is None or owned_b is not None):
        module = cv.owner([t for t, _ in targets], nn.Linear)
    if module is not None:
        path = owned_w[0].rpartition(".")[0]
        lin = unn.Linear(
            in_f, out_f, b is not None, "meta", meta.dtype, constraint=constraint, readout=readout
        )
        _install(cv, path, lin, {"weight": owned_w[1], "bias": owned_b[1] if owned_b else None})
        lin.grad_rows, lin.fan_out = grad_rows, siblings
        return cv.graph.call_module(path, (cv.arg(node, x),), {}), c_out
    at = LinearAt(transposed=transposed, readout=readout, constraint=constraint, grad_rows=grad_rows,
                  fan_out=siblings)  # fmt: skip
    return cv.call_new_module(node, at, (cv.arg(node, x), cv.arg(node, w), bias), "linear"), c_out


_LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}


def _sibling_fan_out(cv: Converter, x: Any) -> int | None:
    """Σ out_features of the linears that read ``x`` (q, k, v projections of one input) when there are
    several: x's gradient sums all their terms, as for one fused linear (docs/convert.md)."""
    total, count = 0, 0
    for user in x.users if isinstance(x, fx.Node) else ():
        if user.target not in _LINEAR_OPS:
            continue
        addmm = user.target is aten.addmm.default
        w, x_pos = (user.args[2], user.args[1]) if addmm else (user.args[1], user.args[0])
        meta = as_tensor_meta(w)
        if x_pos is not x or w not in cv.param_only or meta is None or meta.dim() != 2:
            continue
        total += int(meta.shape[0] if user.target is aten.linear.default else meta.shape[1])
        count += 1
    return total if count > 1 else None


def _output_factor(cv: Converter, node: fx.Node, weight: torch.Tensor, natural: float) -> float:
    """c_out of a linear/conv whose weight may be rescaled: unit-RMS weight (``"weights"``), unit output on
    the example (``"activations"``) or the original output (``"none"``)."""
    if cv.o.rescale == "activations" and cv.std(node):
        return 1.0 / cv.std(node)
    if cv.o.rescale == "none":
        return 1.0
    rms = _rms(weight)
    return natural / rms if rms > 0 and math.isfinite(rms) else natural


def _linear(cv: Converter, node: fx.Node) -> Result | None:
    return linear_like(cv, node, node.args[0], node.args[1], _arg(node, 2, "bias"), transposed=False)


def _addmm(cv: Converter, node: fx.Node) -> Result | None:
    """GPT-2's ``Conv1D``: addmm(b, x, W) with W stored (in, out)."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    b, x, w = node.args[:3]
    if w not in cv.param_only or b not in cv.param_only:
        return None
    return linear_like(cv, node, x, w, b, transposed=True)


def _mm(cv: Converter, node: fx.Node) -> Result | None:
    """x @ W with W a parameter (in, out): a linear; two activations: the unit matmul."""
    from unitscale.transforms._rules_ops import matmul

    a, b = node.args[:2]
    if b in cv.param_only and a not in cv.param_only:
        return linear_like(cv, node, a, b, None, transposed=True)
    if a in cv.param_only or b in cv.param_only:
        return None
    return matmul(cv, node)


# -- convolution ---------------------------------------------------------------------------------------------


def _conv(cv: Converter, node: fx.Node) -> Result | None:
    x, w = node.args[:2]
    b = _arg(node, 2, "bias")
    meta = as_tensor_meta(w)
    if meta is None or x in cv.param_only:
        return None
    nd = meta.dim() - 2
    stride, padding, dilation = (_arg(node, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0),
                                                                    (5, "dilation", 1)))  # fmt: skip
    groups = _arg(node, 6, "groups", 1)
    cv.unit_init(w, "normal")
    cv.unit_init(b, "zeros")
    constraint = cv.cons(node, x) or cv.o.constraint
    kernel = math.prod(int(s) for s in meta.shape[2:])
    strides = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    rule = rules.conv_rule(int(meta.shape[1]), int(meta.shape[0]) // groups, kernel, math.prod(strides), 1)
    alpha = rule.resolve(constraint)[0]
    owned_w, owned_b = cv.direct_param(node, w), cv.direct_param(node, b) if b is not None else None
    c_out = 1.0
    if cv.o.keep:
        c_out = alpha * cv.c(x)
        if owned_w is not None:
            c_out = _output_factor(cv, node, owned_w[1], c_out)
            with torch.no_grad():
                owned_w[1].mul_(c_out / (alpha * cv.c(x)))
        if owned_b is not None:
            with torch.no_grad():
                owned_b[1].mul_(c_out)
    bias = None if b is None else (cv.arg(node, b) if owned_b else cv.comp(cv.arg(node, b), 1.0, c_out))
    module = ConvAt(stride=stride, padding=padding, dilation=dilation, groups=groups, constraint=constraint)
    return cv.call_new_module(node, module, (cv.arg(node, x), cv.arg(node, w), bias), "conv"), c_out


# -- embedding -----------------------------------------------------------------------------------------------


def _embedding(cv: Converter, node: fx.Node) -> Result | None:
    w, idx = node.args[:2]
    padding_idx = _arg(node, 2, "padding_idx", -1)
    if _arg(node, 3, "scale_grad_by_freq", False) or _arg(node, 4, "sparse", False):
        return None
    meta = as_tensor_meta(w)
    if meta is None or meta.dim() != 2:
        return None
    padding = None if padding_idx is None or padding_idx < 0 else int(padding_idx)
    cv.unit_init(w, "normal")
    owned = cv.direct_param(node, w)
    if not cv.o.keep and owned is not None and padding is not None:
        with torch.no_grad():
            owned[1][padding].zero_()
    c_out = 1.0
    if cv.o.keep and owned is not None:
        std = cv.std(node)
        if cv.o.rescale == "activations" and std:
            c_out = 1.0 / std
        elif cv.o.rescale != "none" and 0 < _rms(owned[1]) < math.inf:
            c_out = 1.0 / _rms(owned[1])
        with torch.no_grad():
            owned[1].mul_(c_out)
    grad_rows = cv.rows(idx, 1)
    module = cv.owner([owned[0]], nn.Embedding) if owned is not None else None
    if module is not None and module.max_norm is None:
        path = owned[0].rpartition(".")[0]
        emb = unn.Embedding(int(meta.shape[0]), int(meta.shape[1]), padding, "meta", meta.dtype)
        _install(cv, path, emb, {"weight": owned[1]})
        emb.grad_rows = grad_rows
        return cv.graph.call_module(path, (cv.arg(node, idx),), {}), c_out
    kwargs = {"grad_rows": grad_rows, "padding_idx": padding}
    return cv.call(U.embedding, (cv.arg(node, idx), cv.arg(node, w)), kwargs), c_out


# -- norms ---------------------------------------------------------------------------------------------------


def _affine(cv: Converter, node: fx.Node, params: list[Any]) -> tuple[bool, float]:
    """Initialise (unit) or rescale (keep) a norm's gain and bias: (owns them all, output factor). The
    output factor is 1, or 1/σ on the example with ``rescale="activations"`` when the norm owns them."""
    for p, kind in zip(params, ("ones", "zeros"), strict=False):
        cv.unit_init(p, kind)
    owned = [cv.direct_param(node, p) for p in params if p is not None]
    owns = all(o is not None for o in owned)
    std = cv.std(node)
    c_out = 1.0 / std if cv.o.keep and cv.o.rescale == "activations" and std and owned and owns else 1.0
    if c_out != 1.0:
        with torch.no_grad():
            for _, p in owned:
                p.mul_(c_out)
    return owns, c_out


def _layer_norm(cv: Converter, node: fx.Node) -> Result | None:
    x, shape = node.args[:2]
    w, b, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    shape = tuple(shape)
    owned, c_out = _affine(cv, node, [w, b])
    eps_u = eps * cv.c(x) ** 2
    grad_rows = cv.rows(x, math.prod(shape))
    targets = [cv.direct_param(node, p)[0] for p in (w, b) if p is not None] if owned else []
    module = cv.owner(targets, nn.LayerNorm) if targets and w is not None else None
    if module is not None:
        path = targets[0].rpartition(".")[0]
        ln = unn.LayerNorm(shape, eps_u, True, b is not None, "meta")
        _install(cv, path, ln, {"weight": fetch(cv.gm, targets[0]),
                                "bias": fetch(cv.gm, targets[1]) if b is not None else None})  # fmt: skip
        ln.grad_rows = grad_rows
        return cv.graph.call_module(path, (cv.arg(node, x),), {}), c_out
    args = (cv.arg(node, x), shape, cv.arg(node, w), cv.arg(node, b), eps_u)
    return cv.call(U.layer_norm, args, {"grad_rows": grad_rows}), c_out


def rms_norm(cv: Converter, node: fx.Node, x: Any, shape: tuple, w: Any, eps: float | None) -> Result:
    """Unit RMSNorm of x (factor c) with eps·c²: RMS(c·x; eps·c²) = RMS(x; eps)."""
    meta = as_tensor_meta(x)
    if eps is None:
        eps = torch.finfo(meta.dtype if meta is not None else torch.float32).eps
    owned, c_out = _affine(cv, node, [w])
    eps_u = eps * cv.c(x) ** 2
    grad_rows = cv.rows(x, math.prod(shape))
    target = cv.direct_param(node, w)[0] if owned and w is not None else None
    if target is not None and cv.owner([target], nn.RMSNorm) is not None:
        path = target.rpartition(".")[0]
        rms = unn.RMSNorm(shape, eps_u, True, "meta")
        _install(cv, path, rms, {"weight": fetch(cv.gm, target)})
        rms.grad_rows = grad_rows
        return cv.graph.call_module(path, (cv.arg(node, x),), {}), c_out
    args = (cv.arg(node, x), shape, cv.arg(node, w), eps_u)
    return cv.call(U.rms_norm, args, {"grad_rows": grad_rows}), c_out


def _rms_norm(cv: Converter, node: fx.Node) -> Result | None:
    x, shape = node.args[:2]
    return rms_norm(cv, node, x, tuple(shape), _arg(node, 2, "weight"), _arg(node, 3, "eps"))


def _group_norm(cv: Converter, node: fx.Node) -> Result | None:
    x, groups = node.args[:2]
    w, b, eps = _arg(node, 2, "weight"), _arg(node, 3, "bias"), _arg(node, 4, "eps", 1e-5)
    _, c_out = _affine(cv, node, [w, b])
    args = (cv.arg(node, x), groups, cv.arg(node, w), cv.arg(node, b), eps * cv.c(x) ** 2)
    return cv.call(U.group_norm, args, {"grad_rows": None}), c_out


def _batch_norm(cv: Converter, node: fx.Node) -> Result | None:
    x, w, b, mean, var = (_arg(node, i, n) for i, n in enumerate(("input", "weight", "bias", "running_mean",
                                                                  "running_var")))  # fmt: skip
    momentum, eps = _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    c_in = cv.c(x)
    _, c_out = _affine(cv, node, [w, b])
    counter = None
    if isinstance(mean, fx.Node) and mean.op == "get_attr":
        path = mean.target.rpartition(".")[0]
        original = _submodule(cv.model, path)
        if isinstance(original, nn.modules.batchnorm._BatchNorm):
            momentum = original.momentum  # None (cumulative average) is not in the captured graph
        name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
        counter = next((n for n in cv.gm.graph.nodes if n.op == "get_attr" and n.target == name), None)
        with torch.no_grad():
            stats = (fetch(cv.gm, mean.target), fetch(cv.gm, var.target))
            if cv.o.keep:  # batch statistics of c·x are c·mean, c²·var
                stats[0].mul_(c_in)
                stats[1].mul_(c_in * c_in)
            else:
                stats[0].zero_()
                stats[1].fill_(1.0)
    module = BatchNormAt(momentum=momentum, eps=eps * c_in * c_in, grad_rows=None)
    args = tuple(cv.arg(node, a) for a in (x, mean, var, w, b, counter))
    return cv.call_new_module(node, module, args, "batch_norm"), c_out


def _submodule(root: nn.Module, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


RULES = {
    aten.linear.default: _linear,
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.matmul.default: _mm,
    aten.bmm.default: _mm,
    aten.conv1d.default: _conv,
    aten.conv2d.default: _conv,
    aten.conv3d.default: _conv,
    aten.embedding.default: _embedding,
    aten.layer_norm.default: _layer_norm,
    aten.rms_norm.default: _rms_norm,
    aten.group_norm.default: _group_norm,
    aten.batch_norm.default: _batch_norm,
}
