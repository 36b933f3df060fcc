"""Int4Linear: the per-layer INT4 matmul backend (HQ + LSQ forward, bit split + LSS backward).

Forward (docs/theory.md, Hadamard quantiser), X [N, D], W [C, D], H = BlockDiag(H_g):
    X̂ = int_{s_X}(XH),  Ŵ = int_{s_W}(WH),   Y = alpha · s_X·s_W · (X̂ Ŵᵀ) + bias
with the integer GEMM exact. Backward (§5.2, eq. 4), ∇Y ≈ Σ_k σ_k·D_k (bit-split digits D_k, scales σ_k):
    ∇X̂deq = beta_x · s_W · Σ_k σ_k·diag(w_k)·(D_k Ŵ)            ∇X = (I_X ⊙ ∇X̂deq)·Hᵀ
    ∇Ŵdeq = beta_w · s_X · Σ_k σ_k·(diag(w'_k) D_k)ᵀ X̂          ∇W = (I_W ⊙ ∇Ŵdeq)·Hᵀ
    ∂L/∂s_X = g_s · Σ ∇X̂deq ⊙ δ_X,   ∂L/∂s_W = g_s · Σ ∇Ŵdeq ⊙ δ_W,   ∇bias = beta_b · Σ_rows ∇Y
where w, w' are the LSS row weights m/p (all 1 in the default "keep_nonzero" mode, where they are skipped:
dropping all-zero rows changes nothing). The forward codes are reused (the weight's are computed once per
optimizer step, ``weight_cache.py``); only ∇Y is freshly quantised. The LSQ step sizes follow their
operand's edge: s_X's gradient carries beta_x, s_W's carries beta_w. The backward GEMMs: ``backward.py``.

Every integer GEMM is exact (``gemm.py``: fp32 accumulation in chunks proven exact); the codes, scales and
dequantised products are in the work dtype (float32, or float64 when an operand is float64).

Non-finite values are never hidden: a NaN/inf in X or W gives NaN in the affected output rows/columns (a
Hadamard block mixes an inf with finite values into NaN/inf, and NaN codes propagate through the
GEMM), and a non-finite ∇Y makes every gradient this layer returns NaN. A non-finite tensor at the first
call (LSQ initialisation) raises ValueError.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from unitscale.precision.backend import EXACT
from unitscale.precision.int4.backward import can_fold, dgrad, fold, folded_dgrad, folded_wgrad, wgrad
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
from unitscale.precision.int4.triton_hq import hadamard_quantise, triton_available
from unitscale.precision.int4.weight_cache import WeightCache

_TINY = 1e-30
_LEARNING = -1  # ``lsq_calls`` once the step sizes are learned (cold start over, or none)


class _Int4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, s_x, s_w, alpha, beta_x, beta_w, beta_b, layer):  # type: ignore[override]
        cfg: Int4Config = layer.config
        work = layer.work_dtype(x, weight)
        lead, d = x.shape[:-1], x.shape[-1]
        sx, sw = s_x.detach().to(work), s_w.detach().to(work)
        qx, dx = layer.codes(x.reshape(-1, d).to(work), sx)
        qw, dw = layer.weight_codes(weight, sw, work)
        y = int_gemm(qx, qw.t(), cfg.gemm, out_dtype=work) * (sx * sw * alpha)
        if bias is not None:
            y = y + bias.to(work)
        ctx.save_for_backward(qx, dx, qw, dw, sx, sw)
        ctx.meta = (layer, lead, d, x.dtype, weight.dtype, beta_x, beta_w, beta_b, bias is not None)
        ctx.s_shapes = (s_x.shape, s_x.dtype, s_w.shape, s_w.dtype)
        return y.to(x.dtype).reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qx, dx, qw, dw, sx, sw = ctx.saved_tensors
        layer, lead, d, x_dtype, w_dtype, beta_x, beta_w, beta_b, has_bias = ctx.meta
        cfg: Int4Config = layer.config
        qp = cfg.qbounds[1]
        need_x, need_w, need_b, need_sx, need_sw = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        gen = layer.generator(g2.device)
        if can_fold(cfg):
            f = fold(g2.to(qx.dtype), cfg, gen)
            dx_fn, wx_fn = (lambda: folded_dgrad(f, qw)), (lambda: folded_wgrad(f, qx))
        else:
            digits = layer.quantise_grad(g2.to(qx.dtype))
            dx_fn, wx_fn = (lambda: dgrad(digits, qw, cfg, gen)), (lambda: wgrad(digits, qx, cfg, gen))
        gx = gw = gb = gsx = gsw = None
        # Non-finite ∇Y: amax is NaN, which the scales carry into every product below.
        if need_x or need_sx:
            gxq = dx_fn() * (sw * beta_x)
            if need_sx:
                gsx = (gxq * dx).sum() * lsq_grad_scale(dx.numel(), qp)
                gsx = gsx.to(ctx.s_shapes[1]).reshape(ctx.s_shapes[0])
            if need_x:
                gx = layer.unrotate(gxq * lsq_inside(dx), d)
                gx = gx.to(x_dtype).reshape(*lead, d)
        if need_w or need_sw:
            gwq = wx_fn() * (sx * beta_w)
            if need_sw:
                gsw = (gwq * dw).sum() * lsq_grad_scale(dw.numel(), qp)
                gsw = gsw.to(ctx.s_shapes[3]).reshape(ctx.s_shapes[2])
            if need_w:
                gw = layer.unrotate(gwq * lsq_inside(dw), d).to(w_dtype)
        if has_bias and need_b:
            gb = (g2.double().sum(0) * beta_b).to(grad.dtype)
        return gx, gw, gb, gsx, gsw, None, None, None, None, None


class Int4Linear(nn.Module):
    """INT4 backend of one linear layer; owns the LSQ step sizes s_x, s_w as log-steps.

    ``linear(x, weight, bias, alpha=, beta_x=, beta_w=, beta_b=)`` has the meaning of ``Exact.linear``;
    ``matmul`` runs in high precision (attention matmuls are not quantised, as in the paper).

    Step sizes: s = s0·exp(θ) with θ = ``log_s_x`` / ``log_s_w`` (0-d nn.Parameters, 0 at initialisation)
    and s0 = ``s_x0`` / ``s_w0`` (buffers): the first call sets s0 = 2·mean(|·H|)/√Q_P (and again every
    training call during ``lsq_cold_start_steps``). An optimizer step on θ changes s by a *relative* amount:
    AdamW moves θ by about LR per step, so s changes by a factor ≈ e^{±LR} and can never reach 0 or change
    sign (a step-size parameter trained directly, at the weights' LR, crosses 0 when s ≈ LR). Give θ no
    weight decay (decay pulls s towards s0).

    Fan-in not a multiple of the Hadamard block g: x and W are zero-padded to the next multiple of g. The
    padding is exact ([x, 0]·H·Hᵀ·[w, 0]ᵀ = x·wᵀ); it only adds zero entries to the quantised tensors.
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
        self.log_s_x = nn.Parameter(torch.zeros((), device=device))
        self.log_s_w = nn.Parameter(torch.zeros((), device=device))
        self.register_buffer("s_x0", torch.ones((), device=device))
        self.register_buffer("s_w0", torch.ones((), device=device))
        self.register_buffer("block_size", torch.tensor(self.block, device=device))
        self.initialised = False
        # Training calls made during the cold start, or _LEARNING once the step sizes are learned: a buffer,
        # so a resumed run neither repeats nor skips any of it, and a checkpoint whose steps were learned is
        # never re-initialised; ``calls`` and the flag ``cold`` mirror it (see ``linear``).
        self.register_buffer("lsq_calls", torch.zeros((), dtype=torch.int64, device=device))
        self.calls = 0
        self.cold = cfg.lsq_cold_start_steps > 0
        self.weight_cache = WeightCache()
        self._generators: dict[str, torch.Generator] = {}

    @property
    def s_x(self) -> Tensor:
        """The input step size s_x = s_x0·exp(log_s_x) (differentiable w.r.t. log_s_x)."""
        return self.s_x0 * self.log_s_x.exp()

    @property
    def s_w(self) -> Tensor:
        """The weight step size s_w = s_w0·exp(log_s_w) (differentiable w.r.t. log_s_w)."""
        return self.s_w0 * self.log_s_w.exp()

    @property
    def padded_features(self) -> int:
        """The fan-in after zero-padding to a multiple of the Hadamard block."""
        return -(-self.in_features // self.block) * self.block

    def work_dtype(self, *tensors: Tensor) -> torch.dtype:
        """float64 when an operand is float64 (exact float64 checks), else float32: the codes, scales and
        dequantised products are computed in this dtype; the integer GEMMs are exact in either."""
        if self.config.gemm == "reference" and any(t.dtype == torch.float64 for t in tensors):
            return torch.float64
        return torch.float32

    def rotate(self, t: Tensor) -> Tensor:
        """t [.., D] → [.., D'] zero-padded to the block, times BlockDiag(H_g)."""
        pad = self.padded_features - t.shape[-1]
        if pad:
            t = torch.nn.functional.pad(t, (0, pad))
        return block_hadamard(t, self.block)

    def unrotate(self, t: Tensor, d: int) -> Tensor:
        """Adjoint of :meth:`rotate`: ·Hᵀ (= ·H), then drop the padded columns."""
        t = block_hadamard(t, self.block)
        return t[..., :d] if t.shape[-1] != d else t

    def codes(self, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """(q, δ) = lsq_codes(rotate(t), s): on CUDA one fused Triton pass (``triton_hq.py``), else torch."""
        qn, qp = self.config.qbounds
        fused = t.is_cuda and triton_available() and t.dtype == torch.float32 and t.dim() == 2
        if fused and self.block >= 16 and self.padded_features == t.shape[-1]:
            q, delta, _ = hadamard_quantise(t, s, self.block, qn, qp)
            return q, delta
        return lsq_codes(self.rotate(t), s, qn, qp)

    def weight_codes(self, weight: Tensor, sw: Tensor, work: torch.dtype) -> tuple[Tensor, Tensor]:
        """(q, δ) of int_{s_w}(WH): computed once per optimizer step and reused (``weight_cache.py``)."""
        extra = (self.log_s_w._version, self.s_w0._version, self.block, work, self.training)
        return self.weight_cache.get(weight, extra, lambda: self.codes(weight.to(work), sw))

    def clear_cache(self) -> None:
        """Forget the cached weight codes (needed only after mutating ``weight.data`` outside a step)."""
        self.weight_cache.clear()

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
        """(Re)choose the Hadamard block (if searching); s0 = 2·mean(|·H|)/√Q_P from x, weight; θ = 0."""
        work = self.work_dtype(x, weight)
        x2, w = x.detach().reshape(-1, x.shape[-1]).to(work), weight.detach().to(work)
        if not (torch.isfinite(x2).all() and torch.isfinite(w).all()):
            raise ValueError("INT4 LSQ initialisation got non-finite inputs or weights (NaN/inf)")
        qn, qp = self.config.qbounds
        if self.config.search_block:
            self.block = self._search_block(x2, w, qn, qp)
            self.block_size.fill_(self.block)
        for s0, theta, t in ((self.s_x0, self.log_s_x, x2), (self.s_w0, self.log_s_w, w)):
            s = lsq_init_scale(self.rotate(t), qp)
            # An all-zero tensor (e.g. zero-initialised weights) gives s = 0: fall back to the unit scale.
            s0.copy_(torch.where(s > 0, s, torch.ones_like(s)))
            theta.zero_()
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
        for v in ("x", "w"):  # checkpoints from before the log-step parametrisation held s directly
            old = state_dict.pop(prefix + f"s_{v}", None)
            if old is not None and prefix + f"log_s_{v}" not in state_dict:
                state_dict[prefix + f"s_{v}0"] = old.detach().abs().clamp_min(_TINY)
                state_dict[prefix + f"log_s_{v}"] = torch.zeros_like(old)
        if prefix + "lsq_calls" not in state_dict and prefix + "log_s_x" in state_dict:
            # checkpoints from before the counter was saved: their step sizes were learned, so no cold start
            state_dict[prefix + "lsq_calls"] = torch.tensor(_LEARNING)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + k in state_dict for k in ("log_s_x", "log_s_w", "s_x0", "s_w0")):
            self.initialised = True
        if prefix + "lsq_calls" in state_dict:
            n = int(state_dict[prefix + "lsq_calls"])
            steps = self.config.lsq_cold_start_steps
            self.calls = min(n, steps) if n >= 0 else steps
            self.cold = 0 <= n < steps
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
        # A flag, not a comparison with the call counter: torch.compile guards on what the forward reads,
        # and a counter read on every call would recompile the layer at every step.
        cold = self.training and self.cold
        if not self.initialised or cold:
            self.reinitialise(x, weight)
            if not cold:  # first call without a cold start: the steps are learned from now on
                self.lsq_calls.fill_(_LEARNING)
        if cold:
            self.calls += 1
            self.cold = self.calls < self.config.lsq_cold_start_steps
            self.lsq_calls.fill_(self.calls if self.cold else _LEARNING)
        # s0·exp(θ) > 0 always; the clamp only guards exp underflow of an absurd θ (< −69).
        s_x = self.s_x.clamp_min(_TINY)
        s_w = self.s_w.clamp_min(_TINY)
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
            f"in_features={self.in_features}, block={self.block if c.hadamard else 'off'}"
            + (f" (padded to {self.padded_features})" if self.padded_features != self.in_features else "")
            + ", "
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
