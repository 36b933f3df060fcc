"""Modules and ops that converted graphs call: unit attention, and unit ops whose α depends on sizes.

A converted model keeps, for every tensor, a *static* factor c = converted / original, so weights can absorb
it. Softmax, activation-activation matmuls and SDPA have an α that depends on run-time sizes (softmax width,
key length); the ``*_at`` ops below therefore run the unit op and then a compensation ``scaled(y, k, k)``
with k = target / α(run-time sizes), so the output factor is the static ``target`` at every size (the α of
the reference sizes seen at conversion). A compensation with forward = backward factor is legal on any
edge (it keeps Theorem 5.2). ``target=None`` skips it: the plain unit op (``init="unit"``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from unitscale import functional as U
from unitscale import rules
from unitscale.nn import Linear
from unitscale.scale import Constraint, scaled

__all__ = [
    "AttentionAt",
    "MatmulAt",
    "TraceableTransformerEncoder",
    "TraceableTransformerEncoderLayer",
    "UnitMultiheadAttention",
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
    precision: Any = None,
) -> Tensor:
    """Unit matmul of two activations, output factor pinned to ``target``."""
    y = U.matmul(left, right, constraint=constraint, precision=precision)
    return _compensate(y, target, U.matmul_scales(left.shape, right.shape, constraint)[0])


def attention_at(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    logit_factor: float = 1.0,
    target: float | None,
    precision: Any = None,
) -> Tensor:
    """Unit SDPA on q, k carrying factors c_q, c_k: the logit scale (1/√d or ``scale``) is multiplied by
    ``logit_factor`` = 1/(c_q·c_k), so the logits equal the original's; output factor c_v·``target``."""
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
        self.precision: Any = None

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        p = self.precision
        return matmul_at(left, right, constraint=self.constraint, target=self.target, precision=p)

    def extra_repr(self) -> str:
        return f"constraint={self.constraint!r}, target={self.target}"


class AttentionAt(nn.Module):
    """``attention_at`` as a module (same arguments as ``F.scaled_dot_product_attention``), so that
    ``precision.apply`` reaches its QKᵀ and PV matmuls; converted graphs call it in place of SDPA."""

    matmul_kind = "attention"

    def __init__(self, *, logit_factor: float = 1.0, target: float | None = None):
        super().__init__()
        self.logit_factor, self.target = logit_factor, target
        self.precision: Any = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> Tensor:
        return attention_at(
            query, key, value, attn_mask, dropout_p, is_causal, scale,
            logit_factor=self.logit_factor, target=self.target, precision=self.precision,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"logit_factor={self.logit_factor:.6g}, target={self.target}"


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """nn.MultiheadAttention convention (bool True = *masked*) → additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class UnitMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same call signature and outputs) from unit linears + unit SDPA.

    q, k, v = unit projections (one fused d → 3d Linear for self-attention, as ``nn.MultiheadAttention``
    stores them) carrying factor ``c_in_proj``; logits use ``logit_factor`` = 1/c² so they equal the
    original's; the SDPA output factor is pinned to ``target`` and absorbed by ``out_proj``'s weight.
    ``need_weights`` returns the original (plain) attention probabilities, recomputed from the same logits.
    """

    matmul_kind = "attention"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        in_proj: Linear | None,
        q_proj: Linear | None = None,
        k_proj: Linear | None = None,
        v_proj: Linear | None = None,
        out_proj: Linear,
        dropout: float = 0.0,
        batch_first: bool = False,
        logit_factor: float = 1.0,
        target: float | None = None,
    ):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = (
            embed_dim,
            num_heads,
            dropout,
            batch_first,
        )
        self.in_proj, self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            in_proj,
            q_proj,
            k_proj,
            v_proj,
            out_proj,
        )
        self.logit_factor, self.target = logit_factor, target
        self.precision: Any = None

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self.in_proj is not None:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        batch, heads, length, src = q.shape[0], self.num_heads, q.shape[-2], k.shape[-2]
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(batch, heads, length, src)
        pad = _float_mask(key_padding_mask, q.dtype)
        if pad is not None:
            pad = pad.view(batch, 1, 1, src)
            mask = pad if mask is None else mask + pad
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        y = attention_at(
            q,
            k,
            v,
            mask,
            p,
            causal,
            logit_factor=self.logit_factor,
            target=self.target,
            precision=self.precision,
        )
        out = self.out_proj(y.transpose(1, 2).flatten(2))
        out = out.squeeze(0) if unbatched else out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = self._weights(q, k, mask, causal)
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def _weights(self, q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        logits = (q @ k.transpose(-1, -2)) * (self.logit_factor / math.sqrt(q.shape[-1]))
        if causal:
            keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits if mask is None else logits + mask, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, logit_factor={self.logit_factor:.6g}, target={self.target}"
        )


class TraceableTransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s maths without its fast-path checks (which defeat torch.fx), over the
    very same submodules, so parameter names are unchanged."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        for name in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(self, name, getattr(layer, name))
        self.activation = layer.activation
        self.norm_first = layer.norm_first

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff(x))

    def _sa(self, x: Tensor, mask: Tensor | None, pad: Tensor | None, is_causal: bool) -> Tensor:
        y = self.self_attn(
            x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False, is_causal=is_causal
        )
        return self.dropout1(y[0])

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TraceableTransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` without the nested-tensor fast path: layers in turn, then ``norm``."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(
            TraceableTransformerEncoderLayer(m) if type(m) is nn.TransformerEncoderLayer else m
            for m in encoder.layers
        )
        self.norm = encoder.norm

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask, is_causal is True)  # `is`: no bool() of a proxy
        return x if self.norm is None else self.norm(x)


def traceable(module: nn.Module) -> nn.Module:
    """Replace (in place, recursively) torch transformer containers by their traceable twins; returns the
    possibly replaced root."""
    kinds = {
        nn.TransformerEncoder: TraceableTransformerEncoder,
        nn.TransformerEncoderLayer: TraceableTransformerEncoderLayer,
    }
    if type(module) in kinds:
        return kinds[type(module)](module)
    for name, child in list(module.named_children()):
        new = traceable(child)
        if new is not child:
            setattr(module, name, new)
    return module
