"""Ordinary (not unit-scaled) twins of the ``unitscale.nn`` blocks and ``unitscale.functional`` ops that the
char-LMs use, with the same names and signatures, so one model file builds either twin.

Plain torch maths and init. Matmuls that are not an ``nn.Linear`` (attention, the causal convolution, a
tied readout) run through ``self.precision`` when a recipe sets it, so precision recipes reach standard
models as they reach unit ones; ``nn.Linear`` layers are reached by ``precision.apply``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unitscale.functional import causal_conv_shapes, masked_softmax
from unitscale.precision.protocol import Backend

# functional twins: the plain ops
add = torch.add
cross_entropy = F.cross_entropy
relu = F.relu
gelu = F.gelu


def weighted_add(
    left: Tensor, right: Tensor, left_weight: float, right_weight: float, *, cut: tuple[str, ...] = ()
) -> Tensor:
    """The standard twin of a weighted add is the plain sum (ordinary models add embeddings)."""
    return left + right


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    precision: Backend | None = None,
) -> Tensor:
    """softmax(q kᵀ/√d + mask) v: torch's fused kernel, or both matmuls through the given backend."""
    if precision is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    # A backend's β replaces the chain rule: the logit scale must be on the gradients as well.
    logits = precision.matmul(query, key.transpose(-1, -2), alpha=scale, beta_a=scale, beta_b=scale)
    compute = torch.promote_types(logits.dtype, torch.float32)
    probs = F.dropout(masked_softmax(logits, attn_mask, is_causal, dtype=compute).to(value.dtype), dropout_p)
    return precision.matmul(probs, value)


# module twins ----------------------------------------------------------------------------------------


def Linear(in_features: int, out_features: int, bias: bool = True, *, readout: bool = False) -> nn.Linear:
    """``nn.Linear`` (``readout`` only matters to the unit twin)."""
    return nn.Linear(in_features, out_features, bias)


def Embedding(num_embeddings: int, embedding_dim: int, *, uses: int = 1) -> nn.Embedding:
    """``nn.Embedding`` (``uses`` only matters to the unit twin)."""
    return nn.Embedding(num_embeddings, embedding_dim)


LayerNorm = nn.LayerNorm


class MLP(nn.Module):
    """up Linear → activation → down Linear."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True):  # fmt: skip
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {activation!r}; accepted: relu, gelu")
        self.up = nn.Linear(d_model, hidden, bias)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, d_model, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class MultiHeadAttention(nn.Module):
    """Self-attention (batch first): fused q/k/v Linear, SDPA (matmuls through ``self.precision``), out."""

    matmul_kind = "attention"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, *,
                 is_causal: bool = False):  # fmt: skip
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.is_causal = (
            embed_dim,
            num_heads,
            dropout,
            is_causal,
        )
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias)
        self.precision: Backend | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y = scaled_dot_product_attention(
            q, k, v, None, self.dropout if self.training else 0.0, self.is_causal, precision=self.precision
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CausalConv1d(nn.Module):
    """Causal grouped 1-D convolution, the same layout and windows as ``unitscale.nn.CausalConv1d``, without
    scales; the grouped matmul runs through ``self.precision`` when set."""

    matmul_kind = "conv"

    def __init__(self, channels: int, kernel_size: int, groups: int = 1):
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels={channels} is not divisible by groups={groups}")
        self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
        c = channels // groups
        self.weight = nn.Parameter(torch.empty(groups, kernel_size * c, c))
        nn.init.normal_(self.weight)  # the model's init overwrites it (same RNG use as the unit twin)
        self.precision: Backend | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        g, k, c_in, c_out = causal_conv_shapes(c, self.weight.shape)
        windows = F.pad(x, (0, 0, k - 1, 0)).unfold(1, k, 1)  # (b, t, c, k): window ends at position t
        windows = windows.reshape(b * t, g, c_in, k).permute(1, 0, 3, 2).reshape(g, b * t, k * c_in)
        if self.precision is None:
            y = torch.matmul(windows, self.weight)
        else:
            y = self.precision.matmul(windows, self.weight, roles=("activation", "weight"))
        return y.permute(1, 0, 2).reshape(b, t, g * c_out)


class TiedReadout(nn.Module):
    """x · tableᵀ with the embedding's table passed at call time; through ``self.precision`` when set."""

    matmul_kind = "linear"

    def __init__(self, uses: int = 2):
        super().__init__()
        self.precision: Backend | None = None

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return F.linear(x, table) if self.precision is None else self.precision.linear(x, table)


class Residual(nn.Module):
    """x + body(norm(x)) (pre), norm(x + body(x)) (post); ``tau`` only matters to the unit twin."""

    def __init__(self, body: nn.Module, tau: float, norm: nn.Module | None = None, *,
                 norm_position: str = "pre"):  # fmt: skip
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"unknown norm_position {norm_position!r}; accepted: 'pre', 'post'")
        self.body, self.norm_position = body, norm_position
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_position == "pre":
            return x + self.body(self.norm(x))
        return self.norm(x + self.body(x))
