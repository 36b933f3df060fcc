"""Ordinary (not unit-scaled) ops with the same signatures as their unitscale.functional twins.

Only ops whose standard form is not a torch one-liner live here; matmuls still go through a backend so
precision recipes reach them in standard models too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unitscale.precision.backend import EXACT


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    precision: Any = None,
) -> Tensor:
    """softmax(q kᵀ/√d + mask) v: torch's fused kernel, or both matmuls through the given backend."""
    if precision is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = precision.matmul(query, key.transpose(-1, -2), alpha=scale)
    s_q, s_k = query.shape[-2], key.shape[-2]
    if is_causal:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device).tril(s_k - s_q)
        logits = logits.masked_fill(~mask, float("-inf"))
    if attn_mask is not None:
        logits = (
            logits.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else logits + attn_mask
        )
    probs = F.dropout(torch.softmax(logits.float(), dim=-1).to(value.dtype), dropout_p)
    return (precision or EXACT).matmul(probs, value)
