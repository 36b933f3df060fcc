"""Modules and ops that converted graphs call.

A converted model keeps, for every tensor, a *static* factor c = converted / original, so weights can absorb
it. Softmax, activation-activation matmuls and SDPA have an α that depends on run-time sizes (softmax width,
key length); the ``*_at`` ops below therefore run the unit op and then a compensation ``scaled(y, k, k)``
with k = target / α(run-time sizes), so the output factor is the static ``target`` at every size (the α of
the reference sizes seen at conversion). A compensation with forward = backward factor is legal on any
edge (it keeps Theorem 5.2). ``target=None`` skips it: the plain unit op (``init="unit"``).

Matmuls and ops whose behaviour follows ``.train()``/``.eval()`` (dropout, attention dropout, batch norm)
are modules, placed at the path of the code they came from: ``precision.apply`` reaches the matmuls (their
``precision``), recipe overrides name them, and the training flag is read at run time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unitscale import functional as U
from unitscale import rules
from unitscale.precision.protocol import Backend
from unitscale.scale import Constraint, scaled

__all__ = [
    "AttentionAt",
    "BatchNormAt",
    "ConvAt",
    "DropoutAt",
    "LinearAt",
    "MatmulAt",
    "attention_at",
    "matmul_at",
    "softmax_at",
]


def _compensate(y: Tensor, target: float | None, alpha: float) -> Tensor:
    if target is None:
        return y
    k = target / alpha
    return scaled(y, k, k)


def softmax_at(
    input: Tensor, dim: int = -1, *, mult: float = 1.0, constraint: Constraint = "gmean", target: float | None
) -> Tensor:
    """Unit softmax(mult·x), output factor pinned to ``target`` (α of the reference width)."""
    y = U.softmax(input, dim, constraint=constraint, mult=mult)
    return _compensate(y, target, rules.softmax_rule(input.shape[dim], mult).resolve(constraint)[0])


def matmul_at(
    left: Tensor,
    right: Tensor,
    *,
    constraint: Constraint = "gmean",
    target: float | None,
    precision: Backend | None = None,
) -> Tensor:
    """Unit matmul of two activations, output factor pinned to ``target``."""
    y = U.matmul(left, right, constraint=constraint, precision=precision)
    return _compensate(y, target, U.matmul_scales(left.shape, right.shape, constraint)[0])


def _repeat_heads(query: Tensor, kv: Tensor) -> Tensor:
    """Grouped-query attention: each key/value head serves ``heads(q)/heads(kv)`` query heads."""
    if query.dim() < 3 or kv.shape[-3] == query.shape[-3]:
        return kv
    if query.shape[-3] % kv.shape[-3]:
        raise ValueError(
            f"attention: {query.shape[-3]} query heads are not a multiple of {kv.shape[-3]} kv heads"
        )
    return kv.repeat_interleave(query.shape[-3] // kv.shape[-3], dim=-3)


def attention_at(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    logit_factor: float = 1.0,
    target: float | None,
    precision: Backend | None = None,
) -> Tensor:
    """Unit SDPA on q, k carrying factors c_q, c_k: the logit scale (1/√d or ``scale``) is multiplied by
    ``logit_factor`` = 1/(c_q·c_k), so the logits equal the original's; output factor c_v·``target``.
    With ``enable_gqa`` each key/value head is repeated for its group of query heads."""
    if enable_gqa:
        key, value = _repeat_heads(query, key), _repeat_heads(query, value)
    base = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    y = U.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=base * logit_factor, precision=precision
    )
    return _compensate(y, target, rules.attention_rule(key.shape[-2], dropout_p).alpha)


class MatmulAt(nn.Module):
    """``matmul_at`` as a module, so that ``precision.apply`` reaches the matmul (its ``precision``) and a
    recipe override can name it by path; converted graphs call it where the original multiplied two
    activations."""

    matmul_kind = "attention"

    def __init__(self, *, constraint: Constraint = "gmean", target: float | None = None):
        super().__init__()
        self.constraint, self.target = constraint, target
        self.precision: Backend | None = None

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        p = self.precision
        return matmul_at(left, right, constraint=self.constraint, target=self.target, precision=p)

    def plain_forward(self, left: Tensor, right: Tensor) -> Tensor:
        return matmul_at.plain(left, right, constraint=self.constraint, target=self.target)

    def extra_repr(self) -> str:
        return f"constraint={self.constraint!r}, target={self.target}"


class AttentionAt(nn.Module):
    """``attention_at`` as a module (same arguments as ``F.scaled_dot_product_attention``), so that
    ``precision.apply`` reaches its QKᵀ and PV matmuls; converted graphs call it in place of SDPA. The
    captured dropout probability applies in training mode only."""

    matmul_kind = "attention"

    def __init__(self, *, logit_factor: float = 1.0, target: float | None = None):
        super().__init__()
        self.logit_factor, self.target = logit_factor, target
        self.precision: Backend | None = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        p = dropout_p if self.training else 0.0
        return attention_at(
            query, key, value, attn_mask, p, is_causal, scale, enable_gqa,
            logit_factor=self.logit_factor, target=self.target, precision=self.precision,
        )  # fmt: skip

    def plain_forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False) -> Tensor:  # fmt: skip
        p = dropout_p if self.training else 0.0
        return attention_at.plain(query, key, value, attn_mask, p, is_causal, scale, enable_gqa,
                                  logit_factor=self.logit_factor, target=self.target)  # fmt: skip

    def extra_repr(self) -> str:
        return f"logit_factor={self.logit_factor:.6g}, target={self.target}"


class LinearAt(nn.Module):
    """A unit linear whose weight (and bias) arrive as inputs: a parameter used by several ops (tied
    embedding/readout, a module called twice), a slice of a parameter, or a weight stored (in, out) as in
    GPT-2's ``Conv1D`` (``transposed``). Same maths as ``unitscale.nn.Linear``."""

    matmul_kind = "linear"

    def __init__(
        self, *, transposed: bool = False, readout: bool = False, constraint: Constraint = "gmean",
        grad_rows: float | None = None, fan_out: int | None = None,
    ):  # fmt: skip
        super().__init__()
        self.transposed, self.readout, self.constraint = transposed, readout, constraint
        self.grad_rows, self.fan_out = grad_rows, fan_out
        self.precision: Backend | None = None

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        w = weight.t() if self.transposed else weight
        kw = {"grad_rows": self.grad_rows, "precision": self.precision, "fan_out": self.fan_out}
        if self.readout:
            return U.linear_readout(input, w, bias, **kw)
        return U.linear(input, w, bias, constraint=self.constraint, **kw)

    def plain_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        w = weight.t() if self.transposed else weight
        if self.readout:
            return U.linear_readout.plain(input, w, bias, fan_out=self.fan_out)
        return U.linear.plain(input, w, bias, constraint=self.constraint, fan_out=self.fan_out)

    def extra_repr(self) -> str:
        return f"transposed={self.transposed}, readout={self.readout}, constraint={self.constraint!r}"


class ConvAt(nn.Module):
    """``functional.conv`` as a module, so that ``precision.plan``/``apply`` see the convolution and report
    that no backend reaches its matmul (it stays in the compute dtype), instead of missing it."""

    matmul_kind = "unreachable"

    def __init__(self, *, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
                 constraint: Constraint = "gmean"):  # fmt: skip
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.constraint = constraint
        self.precision: Backend | None = None

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups)
        return U.conv(input, weight, bias, *args, constraint=self.constraint)

    def plain_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        args = (self.stride, self.padding, self.dilation, self.groups)
        return U.conv.plain(input, weight, bias, *args, constraint=self.constraint)


class DropoutAt(nn.Module):
    """Dropout with probability ``p`` in training mode, identity in eval mode. ``unit``: the unit op
    (α = β = √(1−p)); otherwise torch's (the converted model keeps the original's scale, ``init="keep"``)."""

    def __init__(self, p: float, *, unit: bool = False):
        super().__init__()
        rules.dropout_rule(p)
        self.p, self.unit = p, unit

    def forward(self, input: Tensor) -> Tensor:
        if self.unit:
            return U.dropout(input, self.p, self.training)
        return F.dropout(input, self.p, self.training)

    def plain_forward(self, input: Tensor) -> Tensor:
        if self.unit:
            return U.dropout.plain(input, self.p, self.training)
        return F.dropout(input, self.p, self.training) if self.training else input

    def extra_repr(self) -> str:
        return f"p={self.p}, unit={self.unit}"


class BatchNormAt(nn.Module):
    """Unit batch norm (``functional.batch_norm``): batch statistics in training mode (updating the
    running ones, which the caller passes in), running statistics in eval mode, as ``nn.BatchNorm``."""

    def __init__(self, *, momentum: float | None, eps: float, grad_rows: float | None = None):
        super().__init__()
        self.momentum, self.eps, self.grad_rows = momentum, eps, grad_rows

    def forward(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        num_batches_tracked: Tensor | None = None,
    ) -> Tensor:
        momentum = self.momentum
        use_batch = self.training or running_mean is None
        if self.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(num_batches_tracked)
        return U.batch_norm(
            input, running_mean, running_var, weight, bias, use_batch, momentum or 0.0, self.eps,
            grad_rows=self.grad_rows,
        )  # fmt: skip

    def plain_forward(self, input, running_mean, running_var, weight, bias, num_batches_tracked=None):
        """Inference: the running statistics."""
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps:.3g}"


# -- plain forms (inference in plain torch, for unitscale.export) -----------------------------------------


def _plain_softmax_at(input, dim=-1, *, mult=1.0, constraint="gmean", target):
    if target is None:
        return U.softmax.plain(input, dim, constraint=constraint, mult=mult)
    return torch.softmax(input * mult if mult != 1.0 else input, dim) * target


def _plain_matmul_at(left, right, *, constraint="gmean", target, precision=None):
    if target is None:
        return U.matmul.plain(left, right, constraint=constraint)
    return torch.matmul(left, right) * target


def _plain_attention_at(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, *, logit_factor=1.0, target, precision=None):  # fmt: skip
    """F.scaled_dot_product_attention with logit scale (``scale`` or d^-½)·logit_factor, times the static
    ``target`` or (target None) the attention rule's α(s), s = key length."""
    if enable_gqa:
        key, value = (t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3) for t in (key, value))
    base = query.shape[-1] ** -0.5 if scale is None else scale
    y = F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale=base * logit_factor)  # fmt: skip
    if target is None:
        return y * rules.attention_rule(1, dropout_p).law()(s=key.shape[-2])
    return y * target


softmax_at.plain = _plain_softmax_at  # type: ignore[attr-defined]
matmul_at.plain = _plain_matmul_at  # type: ignore[attr-defined]
attention_at.plain = _plain_attention_at  # type: ignore[attr-defined]
