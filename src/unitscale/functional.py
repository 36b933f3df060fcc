"""Unit-scaled functional ops: the plain torch op plus the factors of ``unitscale.rules`` (docs/theory.md,
Ops).

Each op computes y = alpha·f(x) going forward and delivers beta_i·∂f/∂x_i to input i going back, with
(alpha, betas) taken from its rule and resolved by ``constraint`` (``"gmean"`` default, ``"to_output"``,
or ``None`` where every input edge is cut). Every matmul runs through ``(precision or EXACT)`` so that a
precision backend can cast its inputs; the scales are folded into the GEMMs there. Elementwise ops use
:func:`unitscale.scale.scaled` or a small autograd Function where that saves a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from unitscale import rules
from unitscale.eager_cache import eager_cache
from unitscale.precision.backend import EXACT
from unitscale.precision.protocol import Backend
from unitscale.scale import Constraint, check_constraint, scaled

__all__ = [
    "add",
    "batch_norm",
    "causal_conv1d",
    "conv",
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "group_norm",
    "layer_norm",
    "linear",
    "linear_readout",
    "masked_softmax",
    "matmul",
    "matmul_scales",
    "relu",
    "residual_add",
    "residual_split",
    "residual_tau",
    "rms_norm",
    "scaled_dot_product_attention",
    "sigmoid",
    "silu",
    "softmax",
    "tanh",
    "weighted_add",
]


Reduction = Literal["mean", "sum", "none"]
GeluApproximate = Literal["none", "tanh"]


def _rows(input: Tensor, width: int, grad_rows: float | None) -> float:
    """Rows summed into a weight gradient: numel/width, or the caller's static ``grad_rows``."""
    if grad_rows is None:
        return max(input.numel() // max(width, 1), 1)
    return rules.check_grad_rows(grad_rows)  # type: ignore[return-value]


# -- matmuls -------------------------------------------------------------------------------------------


def matmul_scales(
    left_shape: Sequence[int], right_shape: Sequence[int], constraint: Constraint = "gmean"
) -> tuple[float, float, float]:
    """(alpha, beta_left, beta_right) of left (…, b₀, m) @ right (…, m, n₀), from ``rules.matmul_rule``.

    The rule's b (n) is the number of terms summed into one element of ∂right (∂left): with broadcast
    batch B = broadcast(left[:-2], right[:-2]), b = b₀·ΠB/Πright[:-2] and n = n₀·ΠB/Πleft[:-2]. Then
    alpha = m^-½, beta_left = n^-½, beta_right = b^-½; gmean (both inputs constrained): (b·m·n)^-⅙.
    """
    check_constraint(constraint)
    left, right = tuple(left_shape), tuple(right_shape)
    if len(left) < 2 or len(right) < 2 or left[-1] != right[-2]:
        raise ValueError(
            f"matmul: shapes {left} and {right} cannot be multiplied (need (..., b, m) @ (..., m, n))"
        )
    try:
        batch = math.prod(torch.broadcast_shapes(left[:-2], right[:-2]))
    except RuntimeError as err:
        raise ValueError(f"matmul: batch dims of {left} and {right} do not broadcast") from err
    b = left[-2] * batch / math.prod(right[:-2])
    n = right[-1] * batch / math.prod(left[:-2])
    alpha, betas = rules.matmul_rule(b, left[-1], n).resolve(constraint)
    return alpha, betas["left"], betas["right"]


def matmul(
    left: Tensor, right: Tensor, *, constraint: Constraint = "gmean", precision: Backend | None = None
) -> Tensor:
    """Scaled matmul of two activations, left (…, b, m) @ right (…, m, n), scales from
    :func:`matmul_scales`: alpha = m^-½; beta_left = n^-½; beta_right = b^-½, where b (n) counts every term
    summed into one element of ∂right (∂left), broadcast batch dims included. gmean: (b·m·n)^-⅙.
    """
    alpha, beta_left, beta_right = matmul_scales(left.shape, right.shape, constraint)
    return (precision or EXACT).matmul(left, right, alpha=alpha, beta_a=beta_left, beta_b=beta_right)


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    constraint: Constraint = "gmean",
    grad_rows: float | None = None,
    precision: Backend | None = None,
    fan_out: int | None = None,
) -> Tensor:
    """Scaled alpha·x Wᵀ + c, weight (out, in) as in torch (the bias is added after the scale).

    alpha = in^-½, beta_input = out^-½, beta_weight = beta_bias = b^-½ with b = numel(input)/in or
    ``grad_rows``. The input is constrained (gmean: alpha = beta_input = (in·out)^-¼); weight, bias cut.
    ``fan_out`` replaces out where sibling linears read the same input (q, k, v projections): its gradient
    sums all their outputs' terms, as in one fused linear.
    """
    check_constraint(constraint)
    return _linear(input, weight, bias, rules.linear_rule, constraint, grad_rows, precision, fan_out)


def linear_readout(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    grad_rows: float | None = None,
    precision: Backend | None = None,
    fan_out: int | None = None,
) -> Tensor:
    """alpha·x Wᵀ + c after the last residual block (all edges cut): alpha = in^-½, beta_input = out^-½,
    beta_weight = beta_bias = b^-½, unconstrained."""
    return _linear(input, weight, bias, rules.readout_rule, None, grad_rows, precision, fan_out)


def _linear(input, weight, bias, rule, constraint, grad_rows, precision, fan_out=None) -> Tensor:
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input feature size {input.shape[-1]} does not match weight shape "
            f"{tuple(weight.shape)} (expected (out, in))"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"linear: bias shape {tuple(bias.shape)} does not match out_features={weight.shape[0]}"
        )
    out_f, in_f = weight.shape
    alpha, betas = _resolved_scales(rule, in_f, fan_out or out_f, _rows(input, in_f, grad_rows), constraint)
    return (precision or EXACT).linear(
        input, weight, bias, alpha=alpha, beta_x=betas["input"], beta_w=betas["weight"], beta_b=betas["bias"]
    )


@eager_cache(maxsize=4096)
def _resolved_scales(rule: Callable[..., rules.OpScales], *args: Any) -> tuple[float, dict[str, float]]:
    """``rule(*sizes).resolve(constraint)`` for args = (*sizes, constraint), once per args in eager mode: a
    module's scales are built and validated when its shapes change, not on every call (torch.compile folds
    them at trace time). Callers must not mutate the dict."""
    *sizes, constraint = args
    return rule(*sizes).resolve(constraint)


# -- embedding and norms -------------------------------------------------------------------------------


def embedding(
    input: Tensor, weight: Tensor, *, grad_rows: float | None = None, padding_idx: int | None = None
) -> Tensor:
    """Table lookup: alpha = 1 (table ~ N(0,1)), beta_weight = (V/b)^½ with b = numel(input) or
    ``grad_rows`` (cut edge). ``padding_idx`` rows receive no gradient, as in torch."""
    if weight.dim() != 2:
        raise ValueError(f"embedding: weight must be (num_embeddings, dim), got shape {tuple(weight.shape)}")
    r = rules.embedding_rule(weight.shape[0], _rows(input, 1, grad_rows))
    return F.embedding(input, scaled(weight, 1.0, r.betas["weight"]), padding_idx)


def _normalized(input: Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise ValueError(
            f"normalized_shape {shape} does not match the trailing dims of input {tuple(input.shape)}"
        )
    return shape


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    grad_rows: float | None = None,
) -> Tensor:
    """LayerNorm: alpha = 1, beta_input = 1, beta_weight = beta_bias = b^-½ (b rows; w, c cut)."""
    shape = _normalized(input, normalized_shape)
    r = rules.layer_norm_rule(_rows(input, math.prod(shape), grad_rows))
    w = None if weight is None else scaled(weight, 1.0, r.betas["weight"])
    c = None if bias is None else scaled(bias, 1.0, r.betas["bias"])
    return F.layer_norm(input, shape, w, c, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    grad_rows: float | None = None,
) -> Tensor:
    """RMSNorm: alpha = 1, beta_input = 1, beta_weight = b^-½ (b rows; w cut)."""
    shape = _normalized(input, normalized_shape)
    r = rules.rms_norm_rule(_rows(input, math.prod(shape), grad_rows))
    w = None if weight is None else scaled(weight, 1.0, r.betas["weight"])
    return F.rms_norm(input, shape, w, eps)


# -- nonlinearities ------------------------------------------------------------------------------------


def _elementwise(input: Tensor, fn, rule: rules.OpScales, constraint: Constraint) -> Tensor:
    alpha, betas = rule.resolve(check_constraint(constraint))
    return scaled(fn(scaled(input, 1.0, betas["input"])), alpha, 1.0)


def _with_mult(fn, mult: float):
    return fn if mult == 1.0 else (lambda x: fn(x * mult) / mult)


def relu(input: Tensor, *, constraint: Constraint = "gmean", mult: float = 1.0) -> Tensor:
    """relu(mult·x)/mult: alpha = 1.713, beta = 1.414 (derived); constrained (gmean 1.556)."""
    return _elementwise(input, _with_mult(torch.relu, mult), rules.activation_rule("relu", mult), constraint)


def gelu(
    input: Tensor,
    *,
    constraint: Constraint = "gmean",
    mult: float = 1.0,
    approximate: GeluApproximate = "none",
) -> Tensor:
    """gelu(mult·x)/mult: alpha = 1.701, beta = 1.481 (derived; tanh form equal to 3 decimals);
    constrained (gmean 1.587)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"unknown gelu approximate={approximate!r}; accepted: 'none', 'tanh'")
    name = "gelu" if approximate == "none" else "gelu_tanh"
    fn = _with_mult(lambda x: F.gelu(x, approximate=approximate), mult)
    return _elementwise(input, fn, rules.activation_rule(name, mult), constraint)


def silu(input: Tensor, *, constraint: Constraint = "gmean", mult: float = 1.0) -> Tensor:
    """silu(mult·x)/mult: alpha = 1.787, beta = 1.623 (derived); constrained (gmean 1.703)."""
    return _elementwise(input, _with_mult(F.silu, mult), rules.activation_rule("silu", mult), constraint)


def tanh(input: Tensor, *, constraint: Constraint = "gmean", mult: float = 1.0) -> Tensor:
    """tanh(mult·x)/mult: alpha = 1.593, beta = 1.467 (derived); constrained (gmean 1.529)."""
    return _elementwise(input, _with_mult(torch.tanh, mult), rules.activation_rule("tanh", mult), constraint)


def sigmoid(input: Tensor, *, constraint: Constraint = "gmean", mult: float = 1.0) -> Tensor:
    """sigmoid(mult·x)/mult: alpha = 4.801, beta = 4.723 (derived); constrained (gmean 4.762).
    alpha normalises σ, not the mean: the scaled output has mean ≈ 2.4."""
    return _elementwise(
        input, _with_mult(torch.sigmoid, mult), rules.activation_rule("sigmoid", mult), constraint
    )


def softmax(input: Tensor, dim: int = -1, *, constraint: Constraint = "gmean", mult: float = 1.0) -> Tensor:
    """softmax(mult·x) over width s = input.shape[dim]: alpha = s/√(e^{mult²}−1) (s/1.311),
    beta = s/(mult·e^{mult²/2}) (s/1.649); constrained (gmean ≈ s/1.47)."""
    rule = rules.softmax_rule(input.shape[dim], mult)
    return _elementwise(input, lambda x: torch.softmax(x * mult if mult != 1.0 else x, dim), rule, constraint)


# -- loss ----------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, beta, divisor):  # type: ignore[override]
        v = logits.shape[-1]
        # Half-precision logits are normalised in float32; float32/float64 stay as they are.
        compute = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits.reshape(-1, v), dim=-1, dtype=compute)
        t = target.reshape(-1)
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        nll = -logp.gather(1, safe[:, None]).squeeze(1) * valid
        if reduction == "none":
            loss = nll.reshape(target.shape)
        elif reduction == "sum":
            loss = nll.sum()
        else:
            count = valid.sum().clamp(min=1) if divisor is None else divisor
            loss = nll.sum() / count
        ctx.save_for_backward(logp, safe, valid)
        ctx.beta, ctx.reduction, ctx.shape, ctx.dtype = beta, reduction, logits.shape, logits.dtype
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        logp, safe, valid = ctx.saved_tensors
        g = logp.exp()
        g.scatter_add_(1, safe[:, None], -torch.ones_like(g[:, :1]))
        scale = valid.to(g.dtype) * ctx.beta
        scale = scale * grad.reshape(-1).to(g.dtype) if ctx.reduction == "none" else scale * grad.to(g.dtype)
        return (g * scale[:, None]).reshape(ctx.shape).to(ctx.dtype), None, None, None, None, None


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    grad_rows: float | None = None,
) -> Tensor:
    """Fused log-softmax + NLL over the last dim of N-D logits (target: the leading dims).

    Forward: the ordinary cross-entropy (alpha = 1); ``"mean"`` divides by the number of non-ignored rows
    (or by the static ``grad_rows`` when given; 0 when no row counts). Backward: per-row softmax − onehot
    times beta = V/√(V−1), *not* divided by the number of rows (cut edge); ignored rows get zero gradient.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; accepted: 'mean', 'sum', 'none'")
    if input.dim() < 1 or tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"cross_entropy: target shape {tuple(target.shape)} must equal the logits' leading "
            f"dims {tuple(input.shape[:-1])} (logits {tuple(input.shape)})"
        )
    if target.dtype.is_floating_point:
        raise ValueError(f"cross_entropy: target must hold class indices (integer dtype), got {target.dtype}")
    divisor = None if grad_rows is None else _rows(input, 1, grad_rows)
    beta = rules.cross_entropy_rule(input.shape[-1]).betas["input"]
    return _CrossEntropy.apply(input, target, ignore_index, reduction, beta, divisor)


# -- dropout, adds, residuals --------------------------------------------------------------------------


def dropout(input: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Dropout with alpha = beta = √(1−p): y = x·mask/√(1−p), whose true gradient already carries beta.
    Identity when not training or p = 0."""
    r = rules.dropout_rule(p)
    if not training or p == 0:
        return input
    return F.dropout(input, p, True) * r.alpha


def add(left: Tensor, right: Tensor, *, constraint: Constraint = "gmean") -> Tensor:
    """x + y: alpha = 2^-½, beta_i = (broadcast factor_i)^-½; both constrained (gmean 2^-⅙ for equal shapes).
    Prefer :func:`weighted_add` (recipe step 4)."""
    check_constraint(constraint)
    try:
        out = math.prod(torch.broadcast_shapes(left.shape, right.shape))
    except RuntimeError as err:
        raise ValueError(
            f"add: shapes {tuple(left.shape)} and {tuple(right.shape)} do not broadcast"
        ) from err
    rule = rules.add_rule(out / max(left.numel(), 1), out / max(right.numel(), 1))
    alpha, betas = rule.resolve(constraint)
    return scaled(scaled(left, 1.0, betas["left"]) + scaled(right, 1.0, betas["right"]), alpha, 1.0)


def weighted_add(
    left: Tensor, right: Tensor, left_weight: float, right_weight: float, *, cut: tuple[str, ...] = ()
) -> Tensor:
    """a·x + c·y with a² + c² = 1 (checked). Going back an input over a non-cut edge gets its weight (the
    true gradient), an input named in ``cut`` ("left", "right": e.g. token and position embeddings, added
    once) gets the output gradient unscaled (``rules.weighted_add_rule``)."""
    r = rules.weighted_add_rule(left_weight, right_weight, cut)
    try:
        torch.broadcast_shapes(left.shape, right.shape)
    except RuntimeError as err:
        raise ValueError(
            f"weighted_add: shapes {tuple(left.shape)} and {tuple(right.shape)} do not broadcast"
        ) from err
    if not cut:  # the true gradient: one fused add
        return torch.add(left * left_weight, right, alpha=right_weight)
    return scaled(left, left_weight, r.betas["left"]) + scaled(right, right_weight, r.betas["right"])


class _ResidualSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip_scale, branch_scale):  # type: ignore[override]
        ctx.scales = (skip_scale, branch_scale)
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, g_skip, g_branch):  # type: ignore[override]
        a, c = ctx.scales
        if g_skip is None:
            return g_branch * c, None, None
        if g_branch is None:
            return g_skip * a, None, None
        return torch.add(g_skip * a, g_branch, alpha=c), None, None


class _ResidualAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, skip, branch, skip_scale, branch_scale):  # type: ignore[override]
        return torch.add(skip * skip_scale, branch, alpha=branch_scale)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, g, None, None


def residual_split(input: Tensor, tau: float = 0.5) -> tuple[Tensor, Tensor]:
    """Split x into (skip, branch_input), both equal to x; going back the skip gradient is scaled by
    √(1−τ) and the branch-input gradient by √τ, then summed. τ in (0, 1]; τ = 1 drops the skip."""
    r = rules.residual_rule(tau)
    if tau == 1:
        return input.detach(), input
    return _ResidualSplit.apply(input, r.betas["skip"], r.betas["branch"])


def residual_add(skip: Tensor, branch: Tensor, tau: float = 0.5) -> Tensor:
    """√(1−τ)·skip + √τ·branch going forward; both gradients pass unscaled (the split applied them)."""
    r = rules.residual_rule(tau)
    if skip.shape != branch.shape:
        raise ValueError(
            f"residual_add: skip shape {tuple(skip.shape)} != branch shape {tuple(branch.shape)}"
        )
    if tau == 1:
        return branch
    return _ResidualAdd.apply(skip, branch, r.betas["skip"], r.betas["branch"])


ResidualRule = Literal["fixed", "running_mean", "ratio"]
RESIDUAL_RULES: tuple[str, ...] = get_args(ResidualRule)


def residual_tau(index: int, rule: ResidualRule = "fixed", tau: float = 0.5, offset: int = 1) -> float:
    """τ of residual block ``index`` (0-based).

    ``"fixed"``: ``tau`` in (0, 1). ``"running_mean"``: τ_l = 1/(l + offset) (offset 1: τ_0 = 1, the first
    block drops the embedding from the skip; offset 2 keeps it as term 0). ``"ratio"``: ``tau`` is the
    u-μP ratio τ' > 0 (larger favours the branch), converted to τ'²/(1+τ'²).
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"residual index must be a non-negative integer, got index={index!r}")
    if rule == "fixed":
        return rules.check_tau(tau)
    if rule == "running_mean":
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 1:
            raise ValueError(f"running-mean offset must be an integer >= 1, got offset={offset!r}")
        return rules.check_tau(1.0 / (index + offset), allow_one=True)
    if rule == "ratio":
        return rules.tau_from_ratio(tau)
    raise ValueError(f"unknown residual rule {rule!r}; accepted: {', '.join(RESIDUAL_RULES)}")


# -- attention -----------------------------------------------------------------------------------------


def masked_softmax(
    logits: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Attention weights softmax(logits + mask) over the last dim of logits (…, L, S), masked as torch's
    ``F.scaled_dot_product_attention`` masks: ``is_causal`` lets query i see keys j ≤ i (top-left aligned,
    ``torch.ones(L, S).tril(0)``, also when L ≠ S); a boolean ``attn_mask`` keeps True, a float one is
    added; not both. A row with no key left gives weights 0 (and gradients 0), not NaN, as torch does.
    The one mask of every unfused attention path."""
    _check_mask(attn_mask, is_causal)
    if is_causal:
        s_q, s_k = logits.shape[-2:]
        keep = torch.ones(s_q, s_k, dtype=torch.bool, device=logits.device).tril(diagonal=0)
        # Key 0 is visible to every query, so no row is empty.
        return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1, dtype=dtype)
    if attn_mask is None:
        return torch.softmax(logits, dim=-1, dtype=dtype)
    if attn_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    else:
        logits = logits + attn_mask
    # Empty rows: softmax over finite stand-ins, then 0 (torch's safe softmax) keeps NaN out of the
    # backward as well.
    empty = (logits == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1, dtype=dtype)
    return probs.masked_fill(empty, 0.0)


def _check_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    if is_causal and attn_mask is not None:
        raise ValueError(
            "attention: attn_mask and is_causal=True are both given; torch's scaled_dot_product_attention "
            "accepts one (fold the causal mask into attn_mask)"
        )


def _activation_format(precision: Backend | None) -> Any:
    """The format a backend casts matmul activations to (``formats["activation"]`` of the simulate and fp8
    backends: a Format or torch dtype), or None when it does not say."""
    formats = getattr(precision, "formats", None)
    return formats.get("activation") if isinstance(formats, dict) else None


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
    """softmax(q kᵀ·scale + mask)·v with scale = 1/√d by default (US-2023 rule); masks as torch's SDPA.

    Output and q/k/v gradients are scaled by √(s/e·(1−p)), s = key length (equal by construction):
    with unit q, k, v and near-uniform attention the plain output has σ ≈ √(e/s). With ``is_causal`` row i
    sees i+1 keys, so the output σ is larger than 1 (≈ √(ln s) averaged over rows): pair with τ_attn = 0.01.
    Without a backend torch's fused kernel runs; with one, QKᵀ and PV go through ``precision.matmul``,
    the weights of :func:`masked_softmax` entering PV times ``rules.attention_probs_scale`` of the
    backend's activation format, so low-precision casts keep them normal and never saturate.
    """
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2] or query.dim() < 2:
        raise ValueError(
            f"attention: incompatible query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)} (need (..., L, d), (..., s, d), (..., s, d_v))"
        )
    _check_mask(attn_mask, is_causal)
    f = rules.attention_rule(key.shape[-2], dropout_p).alpha
    if precision is None:
        q, k, v = (scaled(t, 1.0, f) for t in (query, key, value))
        return scaled(
            F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale), f, 1.0
        )
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    # A backend's beta replaces the chain-rule alpha, so the logit scale goes into the betas as well.
    logits = precision.matmul(query, key.transpose(-1, -2), alpha=scale, beta_a=f * scale, beta_b=f * scale)
    compute = torch.promote_types(logits.dtype, torch.float32)
    # P·c enters the backend; α = f/c and β_P = 1/c, β_V = f/c give the same output and gradients as f·(P V).
    c = rules.attention_probs_scale(_activation_format(precision))
    probs = (masked_softmax(logits, attn_mask, is_causal, dtype=compute) * c).to(value.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return precision.matmul(probs, value, alpha=f / c, beta_a=1 / c, beta_b=f / c)


# -- convolution, batch and group norm (ops of converted CNNs) -----------------------------------------


def conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    constraint: Constraint = "gmean",
    grad_rows: float | None = None,
) -> Tensor:
    """Scaled N-d convolution (weight (C_out, C_in/g, *kernel)): a linear over each window, by
    ``rules.conv_rule``: alpha = (C_in/g·K)^-½, beta_input = (C_out/g·K/S)^-½ (K kernel elements, S the
    stride product: each input element meets ≈ K/S windows), beta_weight = beta_bias = b^-½ with b the
    output positions N·ΠH_out (or ``grad_rows``). Input constrained; weight and bias cut."""
    check_constraint(constraint)
    nd = weight.dim() - 2
    if nd not in (1, 2, 3) or input.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"conv: weight {tuple(weight.shape)} and input {tuple(input.shape)} are not a 1/2/3-d conv"
        )
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    strides = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    kernel = math.prod(weight.shape[2:])
    out_f, in_per_group = weight.shape[0], weight.shape[1]
    batch = input.shape[0] if input.dim() == nd + 2 else 1
    rows = (
        grad_rows
        if grad_rows is not None
        else batch * _conv_positions(input, weight, strides, padding, dilation)
    )
    rows = _rows(input, 1, rows)
    rule = rules.conv_rule(in_per_group, out_f // groups, kernel, math.prod(strides), rows)
    alpha, betas = rule.resolve(constraint)
    # Plain conv on scaled edges (a conv has no backend yet: its matmul stays in the compute dtype).
    x = scaled(input, 1.0, betas["input"])
    w = scaled(weight, 1.0, betas["weight"])
    y = scaled(fn(x, w, None, stride, padding, dilation, groups), alpha, 1.0)
    if bias is None:
        return y
    shape = (1, -1) + (1,) * nd if input.dim() == nd + 2 else (-1,) + (1,) * nd
    return y + scaled(bias, 1.0, betas["bias"]).reshape(shape)


def causal_conv_shapes(input_channels: int, weight_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """(groups G, kernel k, C_in/G, C_out/G) of a causal conv weight (G, k·C_in/G, C_out/G); ValueError if
    the weight does not fit ``input_channels``."""
    if (
        len(weight_shape) != 3
        or input_channels % weight_shape[0]
        or weight_shape[1] % (input_channels // weight_shape[0])
    ):
        raise ValueError(
            f"causal_conv1d: weight {tuple(weight_shape)} does not fit {input_channels} input channels "
            "(expected (groups, kernel·C_in/groups, C_out/groups))"
        )
    g = weight_shape[0]
    return g, weight_shape[1] // (input_channels // g), input_channels // g, weight_shape[2]


def causal_conv1d(
    input: Tensor,
    weight: Tensor,
    *,
    constraint: Constraint = "gmean",
    grad_rows: float | None = None,
    precision: Backend | None = None,
) -> Tensor:
    """Causal grouped 1-D convolution of ``input`` (batch, t, C_in) with kernel k: output position t sees
    inputs t−k+1 … t. ``weight`` (G, k·C_in/G, C_out/G) is one matmul weight per group over the unfolded
    windows (rows: tap j, group channel i at j·C_in/G + i), so each group is the matmul
    (b·t × k·C_in/G) @ (k·C_in/G × C_out/G) and backends see an ordinary matmul.

    Scales by ``rules.conv_rule`` (stride 1): alpha = (k·C_in/G)^-½; each input meets k windows and C_out/G
    outputs, so beta_input = (k·C_out/G)^-½; beta_weight = (b·t)^-½ (or ``grad_rows``). Input constrained
    (gmean: (k²·C_in·C_out/G²)^-¼); weight cut. See docs/theory.md, Causal convolution.
    """
    if input.dim() != 3:
        raise ValueError(f"causal_conv1d expects input (batch, length, channels), got {tuple(input.shape)}")
    b, t, c = input.shape
    g, k, c_in, c_out = causal_conv_shapes(c, weight.shape)
    rows = _rows(input, c, grad_rows)
    alpha, betas = _resolved_scales(rules.conv_rule, c_in, c_out, k, 1, rows, check_constraint(constraint))
    windows = F.pad(input, (0, 0, k - 1, 0)).unfold(1, k, 1)  # (b, t, c, k): window ends at position t
    windows = windows.reshape(b * t, g, c_in, k).permute(1, 0, 3, 2).reshape(g, b * t, k * c_in)
    y = (precision or EXACT).matmul(
        windows,
        weight,
        alpha=alpha,
        beta_a=betas["input"],
        beta_b=betas["weight"],
        roles=("activation", "weight"),
    )
    return y.permute(1, 0, 2).reshape(b, t, g * c_out)


def _conv_positions(input: Tensor, weight: Tensor, strides: tuple, padding: Any, dilation: Any) -> int:
    """Output positions per sample: Π ⌊(n + 2p − d(k−1) − 1)/s⌋ + 1 over the spatial dims."""
    nd = weight.dim() - 2
    sizes, kernel = input.shape[-nd:], weight.shape[2:]
    if padding == "same":
        return math.prod(sizes)
    pads = (
        (0,) * nd if padding == "valid" else (padding,) * nd if isinstance(padding, int) else tuple(padding)
    )
    dils = (dilation,) * nd if isinstance(dilation, int) else tuple(dilation)
    return math.prod(
        max((n + 2 * p - d * (k - 1) - 1) // s + 1, 1)
        for n, p, d, k, s in zip(sizes, pads, dils, kernel, strides, strict=True)
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    grad_rows: float | None = None,
) -> Tensor:
    """Batch norm over the channel dim 1 (``F.batch_norm``): alpha = 1, beta_input = 1, beta_weight =
    beta_bias = b^-½ with b = numel/C (``rules.layer_norm_rule``: a normalisation with a cut gain and bias).
    In training mode with running statistics, they are updated as torch does."""
    if input.dim() < 2:
        raise ValueError(f"batch_norm needs (N, C, ...) input, got shape {tuple(input.shape)}")
    r = rules.layer_norm_rule(_rows(input, input.shape[1], grad_rows))
    w = None if weight is None else scaled(weight, 1.0, r.betas["weight"])
    c = None if bias is None else scaled(bias, 1.0, r.betas["bias"])
    return F.batch_norm(input, running_mean, running_var, w, c, training, momentum, eps)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    grad_rows: float | None = None,
) -> Tensor:
    """Group norm (``F.group_norm``): alpha = 1, beta_input = 1, beta_weight = beta_bias = b^-½ with
    b = numel/C (``rules.layer_norm_rule``)."""
    if input.dim() < 2:
        raise ValueError(f"group_norm needs (N, C, ...) input, got shape {tuple(input.shape)}")
    r = rules.layer_norm_rule(_rows(input, input.shape[1], grad_rows))
    w = None if weight is None else scaled(weight, 1.0, r.betas["weight"])
    c = None if bias is None else scaled(bias, 1.0, r.betas["bias"])
    return F.group_norm(input, num_groups, w, c, eps)


# Each op's plain-torch form (inference without unitscale), which unitscale.export inlines.
from unitscale import functional_plain as _plain  # noqa: E402

for _name in __all__:
    if hasattr(_plain, _name):
        globals()[_name].plain = getattr(_plain, _name)
