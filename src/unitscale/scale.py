"""The one autograd primitive of unit scaling, and the constraint rules.

``scaled(x, fwd, bwd)`` is the identity times ``fwd`` going forward and the incoming gradient times
``bwd`` going back. A scaled op is the plain op with ``scaled(., 1, beta_i)`` on each input and
``scaled(., alpha, 1)`` on its output (docs/theory.md, Scaled ops). Constraint resolvers turn an op's ideal
(alpha, betas) into the factors to use when some inputs arrive over non-cut edges, where alpha must equal
beta (docs/theory.md, Cut edges and constraints).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

Constraint = Literal["gmean", "to_output"] | None
CONSTRAINTS: tuple[Constraint, ...] = ("gmean", "to_output", None)


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        return x * fwd if fwd != 1.0 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return (grad * ctx.bwd if ctx.bwd != 1.0 else grad), None, None


def scaled(x: Tensor, fwd: float = 1.0, bwd: float = 1.0) -> Tensor:
    """Identity scaled by ``fwd`` in the forward pass and by ``bwd`` in the backward pass.

    y = fwd · x;   ∂L/∂x = bwd · ∂L/∂y   (deliberately not the chain rule when fwd ≠ bwd).
    Scales are Python floats, so torch.compile folds them into neighbouring kernels.
    """
    fwd, bwd = float(fwd), float(bwd)
    if not (math.isfinite(fwd) and math.isfinite(bwd)) or fwd <= 0 or bwd <= 0:
        raise ValueError(f"scaled() needs finite positive scales, got fwd={fwd}, bwd={bwd}")
    if fwd == 1.0 and bwd == 1.0:
        return x
    return _Scaled.apply(x, fwd, bwd)


def check_constraint(constraint: object) -> Constraint:
    """Return ``constraint`` if it names a resolver, else raise ValueError listing the accepted names."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; accepted: 'gmean', 'to_output', None")
    return constraint  # type: ignore[return-value]


def resolve(
    alpha: float,
    betas: Mapping[str, float],
    constrained: Iterable[str],
    constraint: Constraint = "gmean",
) -> tuple[float, dict[str, float]]:
    """Factors an op uses, from its ideal ``alpha`` and ``betas`` and the inputs on non-cut edges.

    The group {alpha} ∪ {beta_i : i constrained} must share one value:
      * ``"gmean"`` (default, 2023 paper): (alpha · Π beta_i)^(1/(l+1)), balancing both passes;
      * ``"to_output"`` (u-μP): alpha, so the forward stays exactly unit;
      * ``None``: no constraint (legal only when every input edge is cut).
    Betas of cut inputs are returned unchanged.
    """
    check_constraint(constraint)
    constrained = list(dict.fromkeys(constrained))
    unknown = [name for name in constrained if name not in betas]
    if unknown:
        raise ValueError(f"constrained inputs {unknown} are not among the op's inputs {sorted(betas)}")
    out = dict(betas)
    if constraint is None or not constrained:
        return float(alpha), out
    if constraint == "gmean":
        group = [alpha, *(betas[name] for name in constrained)]
        shared = math.exp(sum(math.log(v) for v in group) / len(group))
    else:
        shared = float(alpha)
    for name in constrained:
        out[name] = shared
    return shared, out


def shared(param: Tensor, uses: int) -> Tensor:
    """A parameter used by ``uses`` ops (e.g. a tied embedding/readout table), seen by one of them.

    Its gradient is the sum of one unit-scaled contribution per use, so σ grows as √uses; each use
    scales its contribution by uses^-½ (docs/theory.md, Shared parameters). Weight edges are cut, so this
    choice never breaks a constraint.
    """
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        raise ValueError(f"a shared parameter needs uses >= 1, got uses={uses!r}")
    return scaled(param, 1.0, uses**-0.5)


def _plain_scaled(x: Tensor, fwd: float = 1.0, bwd: float = 1.0) -> Tensor:
    """``scaled``'s forward in plain torch (what an exported model computes)."""
    return x * fwd if fwd != 1.0 else x


def _plain_shared(param: Tensor, uses: int) -> Tensor:
    return param


scaled.plain = _plain_scaled  # type: ignore[attr-defined]
shared.plain = _plain_shared  # type: ignore[attr-defined]
