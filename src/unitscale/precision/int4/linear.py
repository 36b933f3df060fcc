"""Int4Linear: the per-layer INT4 matmul backend (HQ + LSQ forward, bit split + LSS backward).

Forward (docs/theory.md, Hadamard quantiser), X [N, D], W [C, D], H = BlockDiag(H_g):
    X̂ = int_{s_X}(XH),  Ŵ = int_{s_W}(WH),   Y = alpha · s_X·s_W · (X̂ Ŵᵀ) + bias
with the integer GEMM exact. Backward (§5.2, eq. 4), ∇Y ≈ Σ_k σ_k·D_k (bit-split digits D_k, scales σ_k):
    ∇X̂deq = beta_x · s_W · Σ_k σ_k·diag(w_k)·(D_k Ŵ)            ∇X = (I_X ⊙ ∇X̂deq)·Hᵀ
    ∇Ŵdeq = beta_w · s_X · Σ_k σ_k·(diag(w'_k) D_k)ᵀ X̂          ∇W = (I_W ⊙ ∇Ŵdeq)·Hᵀ
    ∂L/∂s_X = g_s · Σ ∇X̂deq ⊙ δ_X,   ∂L/∂s_W = g_s · Σ ∇Ŵdeq ⊙ δ_W,   ∇bias = beta_b · Σ_rows ∇Y
where w, w' are the LSS row weights m/p (all 1 in the default "keep_nonzero" mode, where they are skipped:
dropping all-zero rows changes nothing). The forward codes are reused; only ∇Y is freshly quantised. The
LSQ step sizes follow their operand's edge: s_X's gradient carries beta_x, s_W's carries beta_w.

Bernoulli LSS for the weight gradient samples rows of the reduction dimension, so its 1/p weights cannot be
applied in a GEMM epilogue: that one product is computed in float64 on (m/p)·D_k instead of on integers.
The forward, both "keep_nonzero" backward GEMMs and the Bernoulli input-gradient GEMM are exact integer GEMMs.

Non-finite values are never hidden: a NaN/inf in X or W gives NaN in the affected output rows/columns (a
Hadamard block mixes an inf with finite values into NaN/inf, and NaN codes propagate through the float64
GEMM), and a non-finite ∇Y makes every gradient this layer returns NaN. A non-finite tensor at the first
call (LSQ initialisation) raises ValueError.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unitscale.precision.backend import EXACT
from unitscale.precision.int4.config import Int4Config
from unitscale.precision.int4.gemm import int_gemm
from unitscale.precision.int4.hadamard import block_hadamard, block_sizes
from unitscale.precision.int4.quantise import (
    GradDigits,
    bit_split,
    lsq_codes,
    lsq_grad_scale,
    lsq_init_scale,
    lsq_inside,
    single_digit,
)
from unitscale.precision.int4.sampling import row_weights

_TINY = 1e-30


class _Int4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, s_x, s_w, alpha, beta_x, beta_w, beta_b, layer):  # type: ignore[override]
        cfg: Int4Config = layer.config
        qn, qp = cfg.qbounds
        work = layer.work_dtype
        lead, d = x.shape[:-1], x.shape[-1]
        sx, sw = s_x.detach().to(work), s_w.detach().to(work)
        qx, dx = lsq_codes(block_hadamard(x.reshape(-1, d).to(work), layer.block), sx, qn, qp)
        qw, dw = lsq_codes(block_hadamard(weight.to(work), layer.block), sw, qn, qp)
        y = int_gemm(qx, qw.t(), cfg.gemm) * (sx.double() * sw.double() * alpha)
        if bias is not None:
            y = y + bias.double()
        ctx.save_for_backward(qx, dx, qw, dw, sx, sw)
        ctx.meta = (layer, lead, x.dtype, weight.dtype, beta_x, beta_w, beta_b, bias is not None)
        ctx.s_shapes = (s_x.shape, s_x.dtype, s_w.shape, s_w.dtype)
        return y.to(x.dtype).reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qx, dx, qw, dw, sx, sw = ctx.saved_tensors
        layer, lead, x_dtype, w_dtype, beta_x, beta_w, beta_b, has_bias = ctx.meta
        cfg: Int4Config = layer.config
        qp = cfg.qbounds[1]
        need_x, need_w, need_b, need_sx, need_sw = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        digits = layer.quantise_grad(g2.to(layer.work_dtype))
        gx = gw = gb = gsx = gsw = None
        # Non-finite ∇Y: amax is NaN, which the scales carry into every product below.
        if need_x or need_sx:
            gxq = _dgrad(digits, qw, cfg, layer.generator(g2.device)) * (sw.double() * beta_x)
            if need_sx:
                gsx = (gxq * dx).sum() * lsq_grad_scale(dx.numel(), qp)
                gsx = gsx.to(ctx.s_shapes[1]).reshape(ctx.s_shapes[0])
            if need_x:
                gx = block_hadamard(torch.where(lsq_inside(dx), gxq, 0.0), layer.block)
                gx = gx.to(x_dtype).reshape(*lead, qx.shape[-1])
        if need_w or need_sw:
            gwq = _wgrad(digits, qx, cfg, layer.generator(g2.device)) * (sx.double() * beta_w)
            if need_sw:
                gsw = (gwq * dw).sum() * lsq_grad_scale(dw.numel(), qp)
                gsw = gsw.to(ctx.s_shapes[3]).reshape(ctx.s_shapes[2])
            if need_w:
                gw = block_hadamard(torch.where(lsq_inside(dw), gwq, 0.0), layer.block).to(w_dtype)
        if has_bias and need_b:
            gb = (g2.double().sum(0) * beta_b).to(grad.dtype)
        return gx, gw, gb, gsx, gsw, None, None, None, None, None


def _dgrad(digits: GradDigits, qw: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·diag(w_k)·(D_k Ŵ) in float64; LSS scores c_i = ‖σ_k D_k,i‖ over all digit rows jointly."""
    weights = _lss_weights(digits, None, cfg, gen)
    out = torch.zeros((), dtype=torch.float64, device=qw.device)
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        prod = int_gemm(d, qw, cfg.gemm)
        if weights is not None:
            prod = prod * weights[k].double()[:, None]  # output-row scale: the GEMM itself stays integer
        out = out + s.double() * prod
    return out


def _wgrad(digits: GradDigits, qx: Tensor, cfg: Int4Config, gen: torch.Generator | None) -> Tensor:
    """Σ_k σ_k·(diag(w'_k) D_k)ᵀ X̂ in float64; LSS scores c_i = ‖σ_k D_k,i‖·‖X̂_i‖."""
    weights = _lss_weights(digits, qx, cfg, gen)
    out = torch.zeros((), dtype=torch.float64, device=qx.device)
    for k, (d, s) in enumerate(zip(digits.digits, digits.scales)):
        if weights is None:
            prod = int_gemm(d.t(), qx, cfg.gemm)
        else:
            prod = (d.double() * weights[k].double()[:, None]).t() @ qx.double()
        out = out + s.double() * prod
    return out


def _lss_weights(
    digits: GradDigits, qx: Tensor | None, cfg: Int4Config, gen: torch.Generator | None
) -> list[Tensor] | None:
    """Per-digit row weights m/p from one water-fill over the stacked rows ∇↕Y; None = keep every row."""
    if cfg.sampling == "keep_nonzero":
        return None
    norms = [d.double().norm(dim=1) * s.double().abs() for d, s in zip(digits.digits, digits.scales)]
    if qx is not None:
        xnorm = qx.double().norm(dim=1)
        norms = [n * xnorm for n in norms]
    scores = torch.nan_to_num(torch.cat(norms), nan=0.0, posinf=0.0)
    w = row_weights(scores, cfg.sampling, cfg.sample_ratio, generator=gen)
    return list(w.split([n.numel() for n in norms]))


class Int4Linear(nn.Module):
    """INT4 backend of one linear layer; owns the LSQ step sizes ``s_x``, ``s_w`` (nn.Parameters, 0-d).

    ``linear(x, weight, bias, alpha=, beta_x=, beta_w=, beta_b=)`` has the meaning of ``Exact.linear``;
    ``matmul`` runs in high precision (attention matmuls are not quantised, as in the paper).
    Step sizes are initialised on the first call to 2·mean(|·H|)/√Q_P (and re-initialised every training
    call during ``lsq_cold_start_steps``); give them no weight decay.
    """

    name = "int4"

    def __init__(
        self,
        in_features: int,
        config: Int4Config | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = Int4Config.hq_lss() if config is None else config
        if not isinstance(self.config, Int4Config):
            raise ValueError(f"config must be an Int4Config, got {type(self.config).__name__}")
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        cfg = self.config
        self.block = cfg.block_size if cfg.hadamard else 1
        if cfg.hadamard and not cfg.search_block and in_features % self.block:
            raise ValueError(
                f"in_features {in_features} is not a multiple of the Hadamard block size {self.block}; "
                f"accepted: a block_size in {block_sizes(in_features)}, search_block=True or hadamard=False"
            )
        self.s_x = nn.Parameter(torch.ones((), device=device))
        self.s_w = nn.Parameter(torch.ones((), device=device))
        self.register_buffer("block_size", torch.tensor(self.block, device=device))
        self.initialised = False
        self.calls = 0
        self._generators: dict[str, torch.Generator] = {}

    @property
    def work_dtype(self) -> torch.dtype:
        """float64 for the exact reference path, float32 around the FP8 carrier."""
        return torch.float64 if self.config.gemm == "reference" else torch.float32

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The layer's generator on ``device`` (seeded from config.seed), or None for the global RNG."""
        if self.config.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[key]

    def quantise_grad(self, grad: Tensor) -> GradDigits:
        """∇Y as INT4 digits: bit split (default) or one SR digit (naive)."""
        cfg = self.config
        gen = self.generator(grad.device)
        if cfg.bit_split:
            radix, levels, clamp = cfg.split
            return bit_split(grad, radix=radix, levels=levels, digit_max=clamp, generator=gen)
        return single_digit(grad, levels=cfg.grad_levels, generator=gen)

    # Initialisation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reinitialise(self, x: Tensor, weight: Tensor) -> None:
        """(Re)choose the Hadamard block (if searching); set s_x, s_w = 2·mean(|·H|)/√Q_P from x, weight."""
        work = self.work_dtype
        x2, w = x.detach().reshape(-1, x.shape[-1]).to(work), weight.detach().to(work)
        if not (torch.isfinite(x2).all() and torch.isfinite(w).all()):
            raise ValueError("INT4 LSQ initialisation got non-finite inputs or weights (NaN/inf)")
        qn, qp = self.config.qbounds
        if self.config.search_block:
            self.block = self._search_block(x2, w, qn, qp)
            self.block_size.fill_(self.block)
        for param, t in ((self.s_x, x2), (self.s_w, w)):
            s = lsq_init_scale(block_hadamard(t, self.block), qp)
            # An all-zero tensor (e.g. zero-initialised weights) gives s = 0: fall back to the unit scale.
            param.copy_(torch.where(s > 0, s, torch.ones_like(s)))
        self.initialised = True

    def _search_block(self, x: Tensor, w: Tensor, qn: int, qp: int) -> int:
        best, best_err = 1, math.inf
        for g in block_sizes(x.shape[-1]):
            err = 1.0
            for t in (x, w):
                th = block_hadamard(t, g)
                s = lsq_init_scale(th, qp)
                s = torch.where(s > 0, s, torch.ones_like(s))
                q, _ = lsq_codes(th, s, qn, qp)
                err *= float((block_hadamard(q * s, g) - t).pow(2).mean())
            if err < best_err:
                best, best_err = g, err
        return best

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "s_x" in state_dict and prefix + "s_w" in state_dict:
            self.initialised = True
        if prefix + "block_size" in state_dict:
            self.block = int(self.block_size)

    # Backend protocol -----------------------------------------------------------------------------------
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
        """y = alpha · s_x s_w · int(XH) int(WH)ᵀ + bias; backward factors beta_x, beta_w, beta_b."""
        if weight.dim() != 2 or x.shape[-1] != weight.shape[-1] or weight.shape[-1] != self.in_features:
            raise ValueError(
                f"linear: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not match this layer's "
                f"in_features={self.in_features}"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(
                f"linear: bias shape {tuple(bias.shape)} does not match {weight.shape[0]} outputs"
            )
        cold = self.training and self.calls < self.config.lsq_cold_start_steps
        if not self.initialised or cold:
            self.reinitialise(x, weight)
        if self.training:
            self.calls += 1
        s_x = self.s_x.abs().clamp_min(_TINY)
        s_w = self.s_w.abs().clamp_min(_TINY)
        if cold:  # cold start: s is reset every call, not learned
            s_x, s_w = s_x.detach(), s_w.detach()
        return _Int4LinearFn.apply(
            x, weight, bias, s_x, s_w, float(alpha), float(beta_x), float(beta_w), float(beta_b), self
        )

    def matmul(
        self, a: Tensor, b: Tensor, *, alpha: float = 1.0, beta_a: float = 1.0, beta_b: float = 1.0
    ) -> Tensor:
        """alpha · a @ b in high precision (attention BMMs stay unquantised, INT4-paper §5.3)."""
        return EXACT.matmul(a, b, alpha=alpha, beta_a=beta_a, beta_b=beta_b)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, **scales: float) -> Tensor:
        return self.linear(x, weight, bias, **scales)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, block={self.block if c.hadamard else 'off'}, "
            f"qrange={c.qrange}, "
            f"grad={'bit-split ' + c.split_mode if c.bit_split else f'1 digit ±{c.grad_levels}'}, "
            f"sampling={c.sampling}"
            + (f"@{c.sample_ratio}" if c.sampling == "bernoulli" else "")
            + f", gemm={c.gemm}"
        )


def int4_backend_for(
    module_or_shape: nn.Module | int | tuple[int, ...], config: Int4Config | None = None
) -> Int4Linear:
    """An Int4Linear for a linear module (uses its fan-in and device), a fan-in, or a weight shape (C, D)."""
    device = None
    if isinstance(module_or_shape, nn.Module):
        weight = getattr(module_or_shape, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"int4_backend_for: {type(module_or_shape).__name__} has no 2-D weight")
        d, device = weight.shape[1], weight.device
    elif isinstance(module_or_shape, int) and not isinstance(module_or_shape, bool):
        d = module_or_shape
    elif isinstance(module_or_shape, (tuple, list, torch.Size)) and len(module_or_shape) == 2:
        d = int(module_or_shape[1])
    else:
        raise ValueError(
            f"int4_backend_for: expected a linear module, fan-in or (out, in) shape, got {module_or_shape!r}"
        )
    return Int4Linear(d, config, device=device)
