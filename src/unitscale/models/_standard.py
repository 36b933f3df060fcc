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

from unitscale.functional import masked_softmax
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
    # A backend's β replaces the chain rule: the logit scale must be on the gradients as well.
    logits = precision.matmul(query, key.transpose(-1, -2), alpha=scale, beta_a=scale, beta_b=scale)
    compute = torch.promote_types(logits.dtype, torch.float32)
    probs = F.dropout(masked_softmax(logits, attn_mask, is_causal, dtype=compute).to(value.dtype), dropout_p)
    return (precision or EXACT).matmul(probs, value)
