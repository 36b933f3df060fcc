"""Matmul backends: how a scaled linear / matmul is executed.

Every matmul of the library goes through one backend object. The model code computes the scale factors
(``unitscale.functional``); the backend decides the casts and kernels. A backend call computes

    linear:  y = alpha · (x Wᵀ) + c    ∂x = beta_x · (∂y W),  ∂W = beta_w · (∂yᵀ x),  ∂c = beta_c · Σ_rows ∂y
    matmul:  y = alpha · (a b)         ∂a = beta_a · (∂y bᵀ), ∂b = beta_b · (aᵀ ∂y)

with each factor folded into its GEMM (``torch.addmm`` ``alpha``), so eager mode pays no extra
elementwise kernel for unit scaling. ``Exact`` runs in the compute dtype; subclasses override the three cast
points (matmul inputs going forward, the output gradient going back) or the whole op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unitscale.precision.protocol import Backend, Role

__all__ = ["EXACT", "Backend", "Exact", "Role"]


_WIDE = (torch.float32, torch.float64)


def _gemm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale · (a @ b) for 2-D operands, the scale applied before the product is rounded to its dtype.

    ``addmm``'s alpha multiplies the FP32 accumulator (cuBLAS's epilogue on CUDA, the CPU kernels alike), so a
    half-precision product whose unscaled value would overflow (an fp16 weight gradient under a loss scale)
    comes out finite. FP32 on CPU: an in-place multiply of the product, measured faster than ``addmm`` with
    beta = 0; FP32 has the range to round first.
    """
    if scale == 1.0:
        return torch.mm(a, b)
    if a.is_cuda or a.dtype not in _WIDE:
        dtype = torch.promote_types(a.dtype, b.dtype)
        out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
        return torch.addmm(out, a, b, beta=0, alpha=scale)
    return torch.mm(a, b).mul_(scale)


def _matmul(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale · (a @ b) for batched, broadcasting operands (≥ 2-D), the scale applied before rounding.

    A 2-D right operand folds the batch into rows (one ``addmm``); otherwise the batch dims broadcast and
    ``baddbmm``'s alpha scales the accumulator, as in :func:`_gemm`.
    """
    if scale == 1.0 or (a.dtype in _WIDE and not a.is_cuda):
        y = torch.matmul(a, b)
        return y if scale == 1.0 else y.mul_(scale)
    if b.dim() == 2:
        return _gemm(a.reshape(-1, a.shape[-1]), b, scale).reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    a3 = a.expand(*batch, m, k).reshape(-1, m, k)
    b3 = b.expand(*batch, k, n).reshape(-1, k, n)
    out = torch.empty(a3.shape[0], m, n, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    return torch.baddbmm(out, a3, b3, beta=0, alpha=scale).reshape(*batch, m, n)


class _ScaledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, alpha, beta_x, beta_w, beta_b, backend):  # type: ignore[override]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, wq = backend.cast_forward(x2, "activation"), backend.cast_forward(weight, "weight")
        if bias is None:
            y = _gemm(xq, wq.t(), alpha)
        else:
            y = torch.addmm(bias.to(xq.dtype), xq, wq.t(), alpha=alpha)
        ctx.save_for_backward(xq, wq)
        ctx.scales = (beta_x, beta_w, beta_b)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.lead = lead
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xq, wq = ctx.saved_tensors
        beta_x, beta_w, beta_b = ctx.scales
        g = grad.reshape(-1, grad.shape[-1])
        g_raw = g
        g = ctx.backend.cast_backward(g)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _gemm(g, wq.to(g.dtype), beta_x).reshape(*ctx.lead, wq.shape[1])
        if ctx.needs_input_grad[1]:
            gw = _gemm(g.t(), xq.to(g.dtype), beta_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # The bias is not a matmul input: its gradient is a row sum of the unquantised gradient, summed
            # and scaled in at least FP32 before rounding (the unscaled sum may overflow fp16).
            acc = torch.promote_types(g_raw.dtype, torch.float32)
            gb = g_raw.sum(0, dtype=acc).mul_(beta_b).to(g_raw.dtype)
        return gx, gw, gb, None, None, None, None, None


class _ScaledMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, alpha, beta_a, beta_b, backend, roles):  # type: ignore[override]
        aq, bq = backend.cast_forward(a, roles[0]), backend.cast_forward(b, roles[1])
        ctx.save_for_backward(aq, bq)
        ctx.scales = (beta_a, beta_b)
        ctx.backend = backend
        return _matmul(aq, bq, alpha)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        aq, bq = ctx.saved_tensors
        beta_a, beta_b = ctx.scales
        g = ctx.backend.cast_backward(grad)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _reduce_to(_matmul(g, bq.to(g.dtype).transpose(-1, -2), beta_a), aq.shape)
        if ctx.needs_input_grad[1]:
            gb = _reduce_to(_matmul(aq.to(g.dtype).transpose(-1, -2), g, beta_b), bq.shape)
        return ga, gb, None, None, None, None, None


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the operand's shape (batched matmul broadcasting)."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(extra))) if extra > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under torch.autocast, matmul operands run in the autocast dtype (custom Functions are not cast)."""
    ref = tensors[0]
    assert ref is not None
    device = ref.device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class Exact:
    """Matmuls in the compute dtype, scales folded into the GEMMs. The base of every other backend."""

    name = "exact"

    def cast_forward(self, t: Tensor, role: Role) -> Tensor:
        """The value a matmul input takes going forward (identity here)."""
        return t

    def cast_backward(self, grad: Tensor) -> Tensor:
        """The value a matmul's output gradient takes going back (identity here)."""
        return grad

    def linear(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        alpha: float = 1.0,
        beta_x: float = 1.0,
        beta_w: float = 1.0,
        beta_b: float = 1.0,
    ) -> Tensor:
        """y = alpha · x Wᵀ + bias, with backward factors beta_x, beta_w, beta_b (see module docstring)."""
        if x.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"linear: input feature size {x.shape[-1]} does not match weight shape {tuple(weight.shape)}"
            )
        x, weight, bias = _autocast(x, weight, bias)
        return _ScaledLinear.apply(
            x, weight, bias, float(alpha), float(beta_x), float(beta_w), float(beta_b), self
        )

    def matmul(
        self,
        a: Tensor,
        b: Tensor,
        *,
        alpha: float = 1.0,
        beta_a: float = 1.0,
        beta_b: float = 1.0,
        roles: tuple[Role, Role] = ("activation", "activation"),
    ) -> Tensor:
        """y = alpha · a @ b (batched, broadcasting), backward factors beta_a, beta_b.

        ``roles`` say which operand is a weight (a grouped convolution's kernel) for the forward casts.
        """
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
        a, b = _autocast(a, b)
        return _ScaledMatmul.apply(a, b, float(alpha), float(beta_a), float(beta_b), self, roles)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


EXACT = Exact()
