"""Unit-scaled modules over :mod:`unitscale.functional`, with unit init (weights N(0,1), biases 0, gains 1).

Modules that run matmuls hold ``self.precision`` (``None`` = exact), which ``unitscale.precision.apply``
sets; modules whose weight gradients sum over tokens hold ``self.grad_rows`` (``None`` = numel/width), the
static row count for the padding alignment (docs/theory.md, Sequence length and padding);
:func:`set_grad_rows` sets it everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unitscale import functional as U
from unitscale import rules
from unitscale.precision.protocol import Backend
from unitscale.scale import Constraint, check_constraint, shared

__all__ = [
    "GELU",
    "MLP",
    "CausalConv1d",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "ReLU",
    "Residual",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "TiedReadout",
    "TransformerLayer",
    "set_grad_rows",
]


class Linear(nn.Module):
    """y = unit-scaled x Wᵀ + c (``functional.linear``, or ``linear_readout`` when ``readout``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        constraint: Constraint = "gmean",
        readout: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.constraint, self.readout = check_constraint(constraint), readout
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.precision: Backend | None = None
        self.grad_rows: float | None = None
        self.fan_out: int | None = None  # sibling linears reading the same input: see functional.linear
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if self.readout:
            return U.linear_readout(
                input, self.weight, self.bias, grad_rows=self.grad_rows, precision=self.precision,
                fan_out=self.fan_out,
            )  # fmt: skip
        return U.linear(
            input,
            self.weight,
            self.bias,
            constraint=self.constraint,
            grad_rows=self.grad_rows,
            precision=self.precision,
            fan_out=self.fan_out,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, constraint={self.constraint!r}, readout={self.readout}"
        )

    def to_plain(self) -> nn.Linear:
        """``nn.Linear`` with weight α·W (α of this module's rule; it must not depend on the row count)."""
        rule = rules.readout_rule if self.readout else rules.linear_rule
        law = rule(self.in_features, self.out_features, 1).resolve_laws(
            None if self.readout else self.constraint
        )[0]
        if any(name == "rows" for name, _ in law.exponents):
            raise ValueError(f"linear α {law} depends on the row count: it cannot be folded into the weight")
        alpha = law(fan_in=self.in_features, fan_out=self.fan_out or self.out_features)
        plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.weight.detach() * alpha, requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        return plain


class CausalConv1d(nn.Module):
    """Causal grouped 1-D convolution over (batch, length, channels) (``functional.causal_conv1d``): output
    position t sees inputs t−k+1 … t. Weight (groups, k·C/groups, C/groups) ~ N(0, 1), one matmul weight
    per group, so precision backends see a grouped matmul; ``plain_forward`` is the same map as ``F.conv1d``.
    """

    matmul_kind = "conv"

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        groups: int = 1,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        constraint: Constraint = "gmean",
    ):
        super().__init__()
        for name, value in (("channels", channels), ("kernel_size", kernel_size), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if channels % groups:
            raise ValueError(f"channels={channels} is not divisible by groups={groups}")
        self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
        self.constraint = check_constraint(constraint)
        c = channels // groups
        self.weight = nn.Parameter(torch.empty(groups, kernel_size * c, c, device=device, dtype=dtype))
        self.precision: Backend | None = None
        self.grad_rows: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return U.causal_conv1d(
            input, self.weight, constraint=self.constraint, grad_rows=self.grad_rows, precision=self.precision
        )

    def plain_forward(self, input: Tensor) -> Tensor:
        """The forward in plain torch (a causal ``F.conv1d``, α folded), for ``unitscale.export``."""
        return U.causal_conv1d.plain(input, self.weight, constraint=self.constraint, channels=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, groups={self.groups}"


class TiedReadout(nn.Module):
    """Readout whose weight is an embedding table passed at call time (stored once, by the embedding):
    ``functional.linear_readout`` on the table with its gradient scaled by uses^-½ (``scale.shared``: the
    table's gradient sums ``uses`` unit-scaled contributions). The embedding must be built with the same
    ``uses``."""

    matmul_kind = "linear"

    def __init__(self, uses: int = 2):
        super().__init__()
        self.uses = uses
        self.precision: Backend | None = None
        self.grad_rows: float | None = None

    def forward(self, input: Tensor, table: Tensor) -> Tensor:
        return U.linear_readout(
            input, shared(table, self.uses), grad_rows=self.grad_rows, precision=self.precision
        )

    def plain_forward(self, input: Tensor, table: Tensor) -> Tensor:
        return U.linear_readout.plain(input, table)


class Embedding(nn.Module):
    """Unit-initialised lookup table; weight gradient × (V/b)^½, and × uses^-½ when the table is also
    used elsewhere (a tied readout: see :class:`TiedReadout`)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        uses: int = 1,
    ):
        super().__init__()
        if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
            raise ValueError(f"uses must be a positive integer (1, or 2 for a tied readout), got {uses!r}")
        self.uses = uses
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx={padding_idx} out of range for num_embeddings={num_embeddings}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.grad_rows: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()

    def forward(self, input: Tensor) -> Tensor:
        table = shared(self.weight, self.uses) if self.uses > 1 else self.weight
        return U.embedding(input, table, grad_rows=self.grad_rows, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"

    def to_plain(self) -> nn.Embedding:
        """``nn.Embedding`` over the same table (α = 1)."""
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        plain.weight = self.weight
        return plain


def _shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


class LayerNorm(nn.Module):
    """LayerNorm with gain/bias gradients × b^-½ (gain 1, bias 0 at init)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.normalized_shape, self.eps = _shape(normalized_shape), eps
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        self.bias = (
            nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if elementwise_affine and bias else None
        )
        self.grad_rows: float | None = None

    def forward(self, input: Tensor) -> Tensor:
        return U.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, grad_rows=self.grad_rows
        )

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"

    def to_plain(self) -> nn.LayerNorm:
        """``nn.LayerNorm`` over the same gain and bias (α = 1)."""
        affine = self.weight is not None
        plain = nn.LayerNorm(
            self.normalized_shape, self.eps, affine, bias=self.bias is not None, device="meta"
        )
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class RMSNorm(nn.Module):
    """RMSNorm with gain gradient × b^-½ (gain 1 at init)."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.normalized_shape, self.eps = _shape(normalized_shape), eps
        self.weight = (
            nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
            if elementwise_affine
            else None
        )
        self.grad_rows: float | None = None

    def forward(self, input: Tensor) -> Tensor:
        return U.rms_norm(input, self.normalized_shape, self.weight, self.eps, grad_rows=self.grad_rows)

    def to_plain(self) -> nn.RMSNorm:
        """``nn.RMSNorm`` over the same gain (α = 1)."""
        plain = nn.RMSNorm(self.normalized_shape, self.eps, self.weight is not None, device="meta")
        plain.weight = self.weight
        return plain


class _Activation(nn.Module):
    fn = staticmethod(U.relu)

    def __init__(self, *, mult: float = 1.0, constraint: Constraint = "gmean"):
        super().__init__()
        self.mult, self.constraint = mult, check_constraint(constraint)

    def forward(self, input: Tensor) -> Tensor:
        return self.fn(input, constraint=self.constraint, mult=self.mult)

    def plain_forward(self, input: Tensor) -> Tensor:
        """The forward in plain torch (its op's ``plain`` form), for ``unitscale.export``."""
        return self.fn.plain(input, constraint=self.constraint, mult=self.mult)

    def extra_repr(self) -> str:
        return f"mult={self.mult}, constraint={self.constraint!r}"


class ReLU(_Activation):
    """Unit-scaled relu (alpha 1.713, beta 1.414)."""

    fn = staticmethod(U.relu)


class SiLU(_Activation):
    """Unit-scaled silu (alpha 1.787, beta 1.623)."""

    fn = staticmethod(U.silu)


class Tanh(_Activation):
    """Unit-scaled tanh (alpha 1.593, beta 1.467)."""

    fn = staticmethod(U.tanh)


class Sigmoid(_Activation):
    """Unit-scaled sigmoid (alpha 4.801, beta 4.723)."""

    fn = staticmethod(U.sigmoid)


class GELU(_Activation):
    """Unit-scaled gelu (alpha 1.701, beta 1.481), erf or tanh form."""

    def __init__(
        self, approximate: U.GeluApproximate = "none", *, mult: float = 1.0, constraint: Constraint = "gmean"
    ):
        super().__init__(mult=mult, constraint=constraint)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"unknown gelu approximate={approximate!r}; accepted: 'none', 'tanh'")
        self.approximate = approximate

    def forward(self, input: Tensor) -> Tensor:
        return U.gelu(input, constraint=self.constraint, mult=self.mult, approximate=self.approximate)

    def plain_forward(self, input: Tensor) -> Tensor:
        return U.gelu.plain(input, constraint=self.constraint, mult=self.mult, approximate=self.approximate)


class Softmax(nn.Module):
    """Unit-scaled softmax over ``dim`` (alpha s/1.31, beta s/1.65)."""

    def __init__(self, dim: int = -1, *, mult: float = 1.0, constraint: Constraint = "gmean"):
        super().__init__()
        self.dim, self.mult, self.constraint = dim, mult, check_constraint(constraint)

    def forward(self, input: Tensor) -> Tensor:
        return U.softmax(input, self.dim, constraint=self.constraint, mult=self.mult)

    def plain_forward(self, input: Tensor) -> Tensor:
        return U.softmax.plain(input, self.dim, constraint=self.constraint, mult=self.mult)


class Dropout(nn.Module):
    """Dropout scaled by √(1−p) both ways (unit σ in and out)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        rules.dropout_rule(p)
        self.p = p

    def forward(self, input: Tensor) -> Tensor:
        return U.dropout(input, self.p, self.training)

    def plain_forward(self, input: Tensor) -> Tensor:
        return U.dropout.plain(input, self.p, self.training)


ActivationName = Literal["relu", "gelu", "silu", "tanh", "sigmoid"]
_ACTIVATIONS = {"relu": ReLU, "gelu": GELU, "silu": SiLU, "tanh": Tanh, "sigmoid": Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Feed-forward block: up Linear → activation → dropout → down Linear (all constrained)."""

    def __init__(
        self,
        d_model: int,
        hidden: int | None = None,
        activation: ActivationName = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        self.up = Linear(d_model, hidden, bias)
        self.act = _activation(activation)
        self.dropout = Dropout(dropout)
        self.down = Linear(hidden, d_model, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class MultiHeadAttention(nn.Module):
    """Self-attention (batch first): fused q/k/v unit Linear (d → 3d, so ∂x sums the three paths with the
    right 1/√(3d)), unit SDPA (its two matmuls through ``self.precision``), out unit Linear."""

    matmul_kind = "attention"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        is_causal: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        rules.dropout_rule(dropout)
        self.embed_dim, self.num_heads, self.dropout, self.is_causal = (
            embed_dim,
            num_heads,
            dropout,
            is_causal,
        )
        self.qkv = Linear(embed_dim, 3 * embed_dim, bias)
        self.out = Linear(embed_dim, embed_dim, bias)
        self.precision: Backend | None = None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MultiHeadAttention expects (batch, seq, {self.embed_dim}), got {tuple(x.shape)}"
            )
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        y = U.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask,
            self.dropout if self.training else 0.0,
            self.is_causal,
            precision=self.precision,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


NormPosition = Literal["pre", "post"]


class Residual(nn.Module):
    """τ-weighted residual block around ``body`` (``functional.residual_split``/``residual_add``):

    pre:   x + f  →  √(1−τ)·x + √τ·body(norm(x))        post:  norm(√(1−τ)·x + √τ·body(x))
    ``norm`` None: no norm. The split scales the skip gradient by √(1−τ) and the branch's by √τ.
    """

    def __init__(
        self,
        body: nn.Module,
        tau: float,
        norm: nn.Module | None = None,
        *,
        norm_position: NormPosition = "pre",
    ):
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"unknown norm_position {norm_position!r}; accepted: 'pre', 'post'")
        self.body, self.tau, self.norm_position = body, rules.check_tau(tau, allow_one=True), norm_position
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        skip, branch = U.residual_split(x, self.tau)
        if self.norm_position == "pre":
            return U.residual_add(skip, self.body(self.norm(branch)), self.tau)
        return self.norm(U.residual_add(skip, self.body(branch), self.tau))

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, norm_position={self.norm_position!r}"


class TransformerLayer(nn.Module):
    """Unit-scaled twin of ``torch.nn.TransformerEncoderLayer`` (batch first) with τ-weighted residuals:

    norm_first:  x = res(x, attn(norm1(·)), τ_attn);  x = res(x, mlp(norm2(·)), τ_mlp)
    otherwise:   x = norm1(res(x, attn(·), τ_attn));  x = norm2(res(x, mlp(·), τ_mlp))
    where res(x, f, τ) = √(1−τ)·x + √τ·dropout(f(x)) with the matching split scales.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: ActivationName = "gelu",
        norm_first: bool = True,
        *,
        tau_attn: float = 0.01,
        tau_mlp: float = 0.5,
        is_causal: bool = False,
    ):
        super().__init__()
        rules.check_tau(tau_attn, allow_one=True)
        rules.check_tau(tau_mlp, allow_one=True)
        self.norm_first, self.tau_attn, self.tau_mlp = norm_first, tau_attn, tau_mlp
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout, is_causal=is_causal)
        self.mlp = MLP(d_model, dim_feedforward, activation, dropout)
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = self._residual(
            x, lambda h: self.dropout1(self.self_attn(h, attn_mask)), self.norm1, self.tau_attn
        )
        return self._residual(x, lambda h: self.dropout2(self.mlp(h)), self.norm2, self.tau_mlp)

    def _residual(self, x: Tensor, body, norm: nn.Module, tau: float) -> Tensor:
        skip, branch = U.residual_split(x, tau)
        if self.norm_first:
            return U.residual_add(skip, body(norm(branch)), tau)
        return norm(U.residual_add(skip, body(branch), tau))


def set_grad_rows(module: nn.Module, grad_rows: float | None) -> int:
    """Set ``grad_rows`` (batch × mean non-padding tokens; None = numel/width) on every submodule that has
    it; returns how many were set."""
    grad_rows = rules.check_grad_rows(grad_rows)
    count = 0
    for m in module.modules():
        if hasattr(m, "grad_rows"):
            m.grad_rows = grad_rows
            count += 1
    return count
