"""The plain-torch form of every op in :mod:`unitscale.functional`, for inference without unitscale.

Each function has its op's signature and computes the op's forward (backward factors β do not matter going
forward; precision backends are ignored) with torch ops only. ``functional`` attaches each as the op's
``plain`` attribute, which :func:`unitscale.export` inlines. Scales that depend on sizes are the rules'
laws (``rules.OpScales.resolve_laws``) evaluated on the tensors' sizes, so in a traced graph they are
computed from ``Tensor.size``/``numel`` and one exported model serves every sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unitscale import rules
from unitscale.precision.protocol import Backend


def _alpha(op: rules.OpScales, constraint: Any) -> rules.Law:
    """The law of an op's resolved α (a law does not depend on the sizes the rule was evaluated at)."""
    return op.resolve_laws(constraint)[0]


def matmul(
    left: Tensor, right: Tensor, *, constraint: Any = "gmean", precision: Backend | None = None
) -> Tensor:
    """torch.matmul · α(b, m, n), b (n) = rows of left (columns of right) × how often right (left) is reused
    over the broadcast batch, batch(t) = numel(t)/(t[-2]·t[-1])."""
    y = torch.matmul(left, right)

    def batch(t: Tensor) -> Any:
        return t.numel() / (t.shape[-2] * t.shape[-1])

    b = left.shape[-2] * batch(y) / batch(right)
    n = right.shape[-1] * batch(y) / batch(left)
    return y * _alpha(rules.matmul_rule(1, 1, 1), constraint)(b=b, m=left.shape[-1], n=n)


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, alpha: rules.Law, fan_out: Any) -> Tensor:
    y = F.linear(input, weight) * alpha(fan_in=weight.shape[1], fan_out=fan_out or weight.shape[0])
    return y if bias is None else y + bias


def linear(input, weight, bias=None, *, constraint="gmean", grad_rows=None, precision=None, fan_out=None):
    """α·x Wᵀ + c."""
    return _linear(input, weight, bias, _alpha(rules.linear_rule(1, 1, 1), constraint), fan_out)


def linear_readout(input, weight, bias=None, *, grad_rows=None, precision=None, fan_out=None) -> Tensor:
    """α·x Wᵀ + c, unconstrained."""
    return _linear(input, weight, bias, _alpha(rules.readout_rule(1, 1, 1), None), fan_out)


def embedding(input, weight, *, grad_rows=None, padding_idx=None) -> Tensor:
    return F.embedding(input, weight, padding_idx)


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, grad_rows=None) -> Tensor:
    return F.layer_norm(input, _shape(normalized_shape), weight, bias, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, grad_rows=None) -> Tensor:
    return F.rms_norm(input, _shape(normalized_shape), weight, eps)


_ACTIVATIONS = {"relu": torch.relu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _activation(name: str, input: Tensor, mult: float, constraint: Any, approximate: str = "none") -> Tensor:
    """α·f(mult·x)/mult as f(mult·x) · (α/mult)."""
    rule = name if approximate == "none" else "gelu_tanh"
    alpha = rules.activation_rule(rule, mult).resolve(constraint)[0]
    h = input * mult if mult != 1.0 else input
    y = F.gelu(h, approximate=approximate) if name == "gelu" else _ACTIVATIONS[name](h)
    return y * (alpha / mult)


def relu(input, *, constraint="gmean", mult=1.0) -> Tensor:
    return _activation("relu", input, mult, constraint)


def gelu(input, *, constraint="gmean", mult=1.0, approximate="none") -> Tensor:
    return _activation("gelu", input, mult, constraint, approximate)


def silu(input, *, constraint="gmean", mult=1.0) -> Tensor:
    return _activation("silu", input, mult, constraint)


def tanh(input, *, constraint="gmean", mult=1.0) -> Tensor:
    return _activation("tanh", input, mult, constraint)


def sigmoid(input, *, constraint="gmean", mult=1.0) -> Tensor:
    return _activation("sigmoid", input, mult, constraint)


def softmax(input, dim=-1, *, constraint="gmean", mult=1.0) -> Tensor:
    """softmax(mult·x) · α(s), s = input.shape[dim]."""
    y = torch.softmax(input * mult if mult != 1.0 else input, dim)
    return y * _alpha(rules.softmax_rule(1, mult), constraint)(s=input.shape[dim])


def cross_entropy(input, target, *, ignore_index=-100, reduction="mean", grad_rows=None) -> Tensor:
    """The ordinary cross-entropy over the last dim; "mean" divides by the non-ignored rows (at least 1,
    so 0, not NaN, when every row is ignored) or by ``grad_rows``."""
    flat, labels = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    if reduction == "none":
        return F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction="none").reshape(
            target.shape
        )
    total = F.cross_entropy(flat, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    if grad_rows is not None:
        return total / float(grad_rows)
    return total / (labels != ignore_index).sum().clamp(min=1)


def dropout(input, p=0.5, training=True) -> Tensor:
    if not training or p == 0:
        return input
    return F.dropout(input, p, True) * rules.dropout_rule(p).alpha


def add(left, right, *, constraint="gmean") -> Tensor:
    """(x + y) · α(broadcast factors), a broadcast factor = numel(out)/numel(input)."""
    y = left + right
    law = _alpha(rules.add_rule(1, 1), constraint)
    return y * law(left=y.numel() / left.numel(), right=y.numel() / right.numel())


def weighted_add(left, right, left_weight, right_weight, *, cut=()) -> Tensor:
    return torch.add(left * left_weight, right, alpha=right_weight)


def residual_split(input, tau=0.5) -> tuple[Tensor, Tensor]:
    return input, input


def residual_add(skip, branch, tau=0.5) -> Tensor:
    if tau == 1:
        return branch
    r = rules.residual_rule(tau)
    return weighted_add(skip, branch, r.betas["skip"], r.betas["branch"])


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, precision=None
) -> Tensor:
    """F.scaled_dot_product_attention · α(s), s = key length."""
    y = F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    return y * rules.attention_rule(1, dropout_p).law()(s=key.shape[-2])


def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, constraint="gmean",
         grad_rows=None) -> Tensor:  # fmt: skip
    nd = weight.dim() - 2
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    strides = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    rule = rules.conv_rule(weight.shape[1], weight.shape[0] // groups, math.prod(weight.shape[2:]),
                           math.prod(strides), 1)  # fmt: skip
    return fn(input, weight * rule.resolve(constraint)[0], bias, stride, padding, dilation, groups)


def causal_conv1d(
    input, weight, *, constraint="gmean", grad_rows=None, precision=None, channels=None
) -> Tensor:
    """The same map as a causal ``F.conv1d`` over the left-padded input: window row j·C_in/G + i of W[g]
    (tap j, group channel i) is conv weight[g·C_out/G + o, i, j] = α·W[g, j·C_in/G + i, o], α folded in
    (it does not depend on the row count). ``channels`` (C_in, a module knows it) keeps the kernel size a
    Python int where ``input`` is traced."""
    g, c_out = weight.shape[0], weight.shape[2]
    c_in = (channels or input.shape[-1]) // g
    k = weight.shape[1] // c_in
    alpha = rules.conv_rule(c_in, c_out, k, 1, 1).resolve(constraint)[0]
    w = weight.reshape(g, k, c_in, c_out).permute(0, 3, 2, 1).reshape(g * c_out, c_in, k)
    y = F.conv1d(F.pad(input.transpose(1, 2), (k - 1, 0)), w * alpha, groups=g)
    return y.transpose(1, 2)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, grad_rows=None) -> Tensor:  # fmt: skip
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, grad_rows=None) -> Tensor:
    return F.group_norm(input, num_groups, weight, bias, eps)
