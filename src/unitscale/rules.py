"""Scale rules of the unit-scaling ops compendium (docs/theory.md, Ops), each written once.

Every rule is a small pure function of shapes and hyper-parameters returning the op's *ideal*
(unconstrained) factors as an :class:`OpScales`: ``alpha`` multiplies the forward output, ``betas[name]``
the gradient delivered to input ``name``, and ``constrained`` names the inputs that arrive over non-cut
edges when the op sits inside a residual block (they must share one value with alpha; see
:func:`unitscale.scale.resolve`). ``functional.py`` and the docs table (:func:`render_ops_markdown`) both
read these functions, so a rule changes in one place only.

Nonlinearity constants are derived, not typed in: for unit-Gaussian x and g(x) = f(mult·x)/mult,
alpha = 1/std[g(x)] and beta = 1/rms[g'(x)] (the incoming gradient is zero-mean and unit), computed by
Gauss-Legendre quadrature of the Gaussian integrals in float64, split at 0 where relu has its kink.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from unitscale.eager_cache import eager_cache
from unitscale.formats import Format, get_format
from unitscale.scale import Constraint, resolve

WEIGHT_GRAD_EXPONENT = 0.5
"""Default exponent e of the weight/bias gradient factor rows^-e (paper: ½; US-2023: ¾; TF demo: 1)."""

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
TABLE_DOC_PATH = "docs/ops.md"
"""Where the generated compendium lives, relative to the repository root."""


@dataclass(frozen=True)
class Law:
    """A scale as a power law of named sizes, c · Π n_i^k_i (unit-scaling's ``scale_power``).

    Called with numbers it gives the scale; called with traced sizes (fx proxies) it builds the scale in a
    graph, which is how ``unitscale.export`` keeps size-dependent scales without re-deriving any rule.
    """

    coefficient: float = 1.0
    exponents: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, coefficient: float = 1.0, **exponents: float) -> Law:
        return cls(float(coefficient), tuple(sorted((k, float(v)) for k, v in exponents.items() if v != 0)))

    def __call__(self, **sizes: Any) -> Any:
        value: Any = self.coefficient
        for name, k in self.exponents:
            n = sizes[name]
            value = value * (n if k == 1 else n**k)
        return value


@dataclass(frozen=True)
class OpScales:
    """Ideal factors of one scaled op: y = alpha·f(x), ∂x_i = betas[i]·f_grad(x)_i.

    ``laws`` states the factors that depend on sizes as power laws (key "alpha" or a beta's name); a factor
    without one is a constant."""

    alpha: float
    betas: dict[str, float] = field(default_factory=dict)
    constrained: tuple[str, ...] = ()
    note: str = ""
    laws: dict[str, Law] = field(default_factory=dict)

    @classmethod
    def from_laws(
        cls, laws: dict[str, Law], sizes: dict[str, float], constrained: tuple[str, ...] = (), note: str = ""
    ) -> OpScales:
        """The factors at ``sizes`` of an op whose every factor is one of ``laws``."""
        betas = {name: law(**sizes) for name, law in laws.items() if name != "alpha"}
        return cls(laws["alpha"](**sizes), betas, constrained, note, dict(laws))

    def resolve(self, constraint: Constraint = "gmean") -> tuple[float, dict[str, float]]:
        """The factors actually used under ``constraint`` (see :func:`unitscale.scale.resolve`)."""
        return resolve(self.alpha, self.betas, self.constrained, constraint)

    def law(self, name: str = "alpha") -> Law:
        """The ideal factor ``name`` as a law (a constant law when it does not depend on sizes)."""
        return self.laws.get(name) or Law.of(self.alpha if name == "alpha" else self.betas[name])

    def resolve_laws(self, constraint: Constraint = "gmean") -> tuple[Law, dict[str, Law]]:
        """:meth:`resolve` on laws: the same resolver applied to the coefficients, and to 2^k for the
        exponent k of each size (a geometric mean of laws multiplies coefficients, averages exponents)."""
        laws = {name: self.law(name) for name in ("alpha", *self.betas)}
        coefficient, beta_coefficients = resolve(
            laws["alpha"].coefficient,
            {n: laws[n].coefficient for n in self.betas},
            self.constrained,
            constraint,
        )
        exponents: dict[str, dict[str, float]] = {name: {} for name in laws}
        for size in sorted({s for law in laws.values() for s, _ in law.exponents}):
            powers = {name: 2.0 ** dict(law.exponents).get(size, 0.0) for name, law in laws.items()}
            alpha, betas = resolve(
                powers["alpha"], {n: powers[n] for n in self.betas}, self.constrained, constraint
            )
            for name, value in (("alpha", alpha), *betas.items()):
                exponents[name][size] = _snap(math.log2(value))
        return Law.of(coefficient, **exponents["alpha"]), {
            n: Law.of(beta_coefficients[n], **exponents[n]) for n in self.betas
        }


def _snap(k: float) -> float:
    """Exponents of the compendium are multiples of 1/24 (¼, ⅙ and their combinations)."""
    snapped = round(k * 24) / 24
    return snapped if abs(k - snapped) < 1e-12 else k


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1 or value != int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _check_exponent(weight_grad_exponent: float) -> float:
    if not isinstance(weight_grad_exponent, (int, float)) or not 0 <= weight_grad_exponent <= 1:
        raise ValueError(
            f"weight_grad_exponent must lie in [0, 1] (paper: 0.5), got {weight_grad_exponent!r}"
        )
    return float(weight_grad_exponent)


# -- matmuls -------------------------------------------------------------------------------------------


def matmul_rule(b: float, m: int, n: float) -> OpScales:
    """A(b×m)·B(m×n), both activations: alpha = m^-½, beta_left = n^-½, beta_right = b^-½.

    ``b`` and ``n`` are the number of terms summed into each element of ∂B and ∂A (with batch
    broadcasting they include the broadcast batch size). Both inputs are constrained: gmean (b·m·n)^-⅙.
    """
    b, m, n = _positive("b", b), _positive_int("m", m), _positive("n", n)
    laws = {"alpha": Law.of(m=-0.5), "left": Law.of(n=-0.5), "right": Law.of(b=-0.5)}
    return OpScales.from_laws(
        laws, {"b": b, "m": m, "n": n}, ("left", "right"), "both inputs activations (QKᵀ, PV)"
    )


def linear_rule(
    fan_in: int, fan_out: int, rows: float, *, weight_grad_exponent: float = WEIGHT_GRAD_EXPONENT
) -> OpScales:
    """X(rows×fan_in)·Wᵀ + c: alpha = fan_in^-½, beta_input = fan_out^-½, beta_weight = beta_bias = rows^-e.

    The input is constrained (gmean (fan_in·fan_out)^-¼); weight and bias are cut edges.
    """
    fan_in, fan_out = _positive_int("fan_in", fan_in), _positive_int("fan_out", fan_out)
    rows, e = _positive("rows", rows), _check_exponent(weight_grad_exponent)
    laws = {"alpha": Law.of(fan_in=-0.5), "input": Law.of(fan_out=-0.5), "weight": Law.of(rows=-e),
            "bias": Law.of(rows=-e)}  # fmt: skip
    sizes = {"fan_in": fan_in, "fan_out": fan_out, "rows": rows}
    return OpScales.from_laws(laws, sizes, ("input",), "weight and bias edges are cut")


def readout_rule(
    fan_in: int, fan_out: int, rows: float, *, weight_grad_exponent: float = WEIGHT_GRAD_EXPONENT
) -> OpScales:
    """Linear after the last residual block: the linear rule with every edge cut (unconstrained)."""
    r = linear_rule(fan_in, fan_out, rows, weight_grad_exponent=weight_grad_exponent)
    return OpScales(r.alpha, r.betas, (), "all edges cut: unconstrained", r.laws)


def conv_rule(
    in_per_group: int,
    out_per_group: int,
    kernel: int,
    stride: int,
    rows: float,
    *,
    weight_grad_exponent: float = WEIGHT_GRAD_EXPONENT,
) -> OpScales:
    """Convolution as a linear over each window of ``kernel`` elements: fan-in C_in/g·K; an input element
    meets ≈ K/S windows (S = stride product), so its gradient sums C_out/g·K/S terms; ``rows`` output
    positions. alpha = (C_in/g·K)^-½, beta_input = (C_out/g·K/S)^-½, beta_weight = beta_bias = rows^-e."""
    k, s = _positive_int("kernel", kernel), _positive_int("stride", stride)
    fan_in = _positive_int("in_per_group", in_per_group) * k
    fan_out = max(round(_positive_int("out_per_group", out_per_group) * k / s), 1)
    return linear_rule(fan_in, fan_out, rows, weight_grad_exponent=weight_grad_exponent)


def sum_rule(n: int) -> OpScales:
    """Sum over n unit elements: alpha = n^-½, beta = 1 (constrained: gmean n^-¼)."""
    return OpScales(
        _positive_int("n", n) ** -0.5, {"input": 1.0}, ("input",), "a mean is a sum followed by α"
    )


# -- nonlinearities ------------------------------------------------------------------------------------

_QUAD_POINTS = 256
_QUAD_HALF_WIDTH = 12.0  # φ(12) ≈ 5e-32: the tails beyond are far below float64 rounding


@lru_cache(maxsize=1)
def _gauss_nodes() -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[h(x)], x ~ N(0,1): Gauss-Legendre on [-L, 0] and [0, L] times φ."""
    t, w = np.polynomial.legendre.leggauss(_QUAD_POINTS)
    half = _QUAD_HALF_WIDTH / 2
    x = np.concatenate([half * (t - 1), half * (t + 1)])  # [-L, 0] then [0, L]
    weights = np.concatenate([w, w]) * half * np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    return x, weights


def _torch_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu,
        "gelu": lambda x: torch.nn.functional.gelu(x, approximate="none"),
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }
    if name not in fns:
        raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")
    return fns[name]


@eager_cache(maxsize=256)
@torch.compiler.assume_constant_result  # pure function of Python constants: torch.compile evaluates it once
def activation_constants(name: str, mult: float = 1.0) -> tuple[float, float]:
    """(alpha, beta) of g(x) = f(mult·x)/mult for x ~ N(0, 1), by Gaussian quadrature in float64.

    alpha = 1/std[g(x)],  beta = 1/√E[g'(x)²] = 1/√E[f'(mult·x)²].
    f and f' come from torch's own float64 ops and autograd (no hand-written derivative).
    """
    f = _torch_activation(name)
    mult = _positive("mult", mult)
    nodes, weights = _gauss_nodes()
    with torch.enable_grad():  # the first call may come from inside torch.no_grad() (inference, export)
        x = torch.tensor(nodes * mult, dtype=torch.float64, requires_grad=True)
        y = f(x)
        (dy,) = torch.autograd.grad(y.sum(), x)
    w = torch.tensor(weights, dtype=torch.float64)
    g = y.detach() / mult
    mean = (w * g).sum()
    var = (w * g * g).sum() - mean**2
    grad_ms = (w * dy * dy).sum()
    return float(var.rsqrt()), float(grad_ms.rsqrt())


def activation_rule(name: str, mult: float = 1.0) -> OpScales:
    """Elementwise f(mult·x)/mult: alpha = 1/std, beta = 1/rms of the derivative (derived numerically).

    Input constrained (gmean √(alpha·beta)). relu: 1.713/1.414; gelu 1.701/1.481; silu 1.787/1.623;
    tanh 1.593/1.467; sigmoid 4.801/4.723 at mult = 1 (alpha normalises σ, not the mean).
    """
    alpha, beta = activation_constants(name, float(mult))
    note = "alpha normalises σ, not the mean (scaled output mean ≈ 2.4)" if name == "sigmoid" else ""
    return OpScales(alpha, {"input": beta}, ("input",), note)


def softmax_rule(s: int, mult: float = 1.0) -> OpScales:
    """softmax(mult·x) over width s, x ~ N(0,1), large-s (log-normal) limit:

    std[y] = √(e^{mult²} − 1)/s  →  alpha = s/√(e^{mult²}−1)   (s/1.311 at mult = 1)
    std[∂x] = mult·e^{mult²/2}/s →  beta = s/(mult·e^{mult²/2})  (s/1.649 at mult = 1)
    Input constrained: gmean ≈ s/1.47.
    """
    s, mult = _positive_int("s", s), _positive("mult", mult)
    laws = {"alpha": Law.of(1 / math.sqrt(math.expm1(mult * mult)), s=1),
            "input": Law.of(1 / (mult * math.exp(mult * mult / 2)), s=1)}  # fmt: skip
    return OpScales.from_laws(laws, {"s": s}, ("input",), "exact large-s values of the log-normal model")


def cross_entropy_rule(num_classes: int) -> OpScales:
    """Fused softmax + cross-entropy over V classes: alpha = 1 (the output is the loss),
    beta_logits = V/√(V−1) per row (uniform softmax at init), never divided by the number of rows. Cut."""
    v = _positive_int("num_classes", num_classes)
    if v < 2:
        raise ValueError(f"cross-entropy needs at least 2 classes, got num_classes={v}")
    return OpScales(1.0, {"input": v / math.sqrt(v - 1)}, (), "mean over rows: divide only the reported loss")


# -- norms, embedding ----------------------------------------------------------------------------------


def layer_norm_rule(rows: float, *, weight_grad_exponent: float = WEIGHT_GRAD_EXPONENT) -> OpScales:
    """layer_norm(X; w, c) over ``rows`` rows: alpha = 1, beta_input = 1, beta_weight = beta_bias = rows^-e.

    w, c are cut edges (w = 1, c = 0 at init)."""
    rows, e = _positive("rows", rows), _check_exponent(weight_grad_exponent)
    return OpScales(1.0, {"input": 1.0, "weight": rows**-e, "bias": rows**-e}, ("input",), "w, c cut")


def rms_norm_rule(rows: float, *, weight_grad_exponent: float = WEIGHT_GRAD_EXPONENT) -> OpScales:
    """rms_norm(X; w): alpha = 1, beta_input = 1, beta_weight = rows^-e (w cut)."""
    rows, e = _positive("rows", rows), _check_exponent(weight_grad_exponent)
    return OpScales(1.0, {"input": 1.0, "weight": rows**-e}, ("input",), "w cut")


def embedding_rule(num_embeddings: int, rows: float) -> OpScales:
    """Lookup in a V×d table ~ N(0,1) for ``rows`` tokens: alpha = 1, beta_weight = (V/rows)^½ (cut).

    Each table row receives ≈ rows/V token gradients, a sum of unit terms."""
    v, rows = _positive_int("num_embeddings", num_embeddings), _positive("rows", rows)
    return OpScales(1.0, {"weight": math.sqrt(v / rows)}, (), "table edge cut")


# -- adds, residuals, dropout, attention ---------------------------------------------------------------


def add_rule(left_broadcast: float = 1.0, right_broadcast: float = 1.0) -> OpScales:
    """x + y: alpha = 2^-½, beta_i = (broadcast factor_i)^-½ (a broadcast input's gradient sums that many
    unit terms). Both constrained: gmean 2^-⅙ for equal shapes. Prefer :func:`weighted_add_rule`."""
    lb, rb = _positive("left_broadcast", left_broadcast), _positive("right_broadcast", right_broadcast)
    laws = {"alpha": Law.of(2**-0.5), "left": Law.of(left=-0.5), "right": Law.of(right=-0.5)}
    return OpScales.from_laws(
        laws, {"left": lb, "right": rb}, ("left", "right"), "recipe step 4 replaces it by a weighted add"
    )


WEIGHTED_ADD_INPUTS = ("left", "right")


def weighted_add_rule(left_weight: float, right_weight: float, cut: tuple[str, ...] = ()) -> OpScales:
    """a·x + c·y with a² + c² = 1: weight a on x and c on y going forward (alpha = 1, the weights are
    part of f). Going back an input over a non-cut edge gets its weight (α = β by construction: the true
    gradient); an input named in ``cut`` ("left", "right") gets 1, its ideal factor, since the output
    gradient is already unit (docs/theory.md, Add and weighted add)."""
    a, c = _positive("left_weight", left_weight), _positive("right_weight", right_weight)
    if not math.isclose(a * a + c * c, 1.0, rel_tol=1e-6):
        raise ValueError(
            f"weighted add needs left_weight² + right_weight² = 1, got {a!r}² + {c!r}² = {a * a + c * c!r}"
        )
    cut = (cut,) if isinstance(cut, str) else tuple(cut)
    unknown = [name for name in cut if name not in WEIGHTED_ADD_INPUTS]
    if unknown:
        raise ValueError(f"weighted add: unknown cut input(s) {unknown!r}; accepted: 'left', 'right'")
    betas = {"left": 1.0 if "left" in cut else a, "right": 1.0 if "right" in cut else c}
    note = "α = β per input by construction" if not cut else "cut inputs: β = 1 (the output gradient is unit)"
    return OpScales(1.0, betas, (), note)


def check_tau(tau: float, *, allow_one: bool = False, name: str | None = None) -> float:
    """τ in (0, 1) (fixed rule) or (0, 1] (running mean, where τ_0 = 1); ValueError naming the value (and
    the option ``name`` it came from). The one τ check of the library."""
    ok = (
        isinstance(tau, (int, float))
        and not isinstance(tau, bool)
        and (0 < tau <= 1 if allow_one else 0 < tau < 1)
    )
    if not ok:
        interval = "(0, 1]" if allow_one else "(0, 1)"
        if name is not None:
            raise ValueError(f"{name} must lie in {interval}, got {tau!r}")
        raise ValueError(f"residual tau must lie in {interval}, got tau={tau!r}")
    return float(tau)


def check_grad_rows(grad_rows: float | None) -> float | None:
    """A static weight-gradient row count: a finite positive number, or None (rows counted per call).
    The one grad-rows check of the library."""
    if grad_rows is None:
        return None
    if (
        isinstance(grad_rows, bool)
        or not isinstance(grad_rows, (int, float))
        or not math.isfinite(grad_rows)
        or not grad_rows > 0
    ):
        raise ValueError(f"grad_rows must be a positive number, got {grad_rows!r}")
    return float(grad_rows)


def residual_rule(tau: float) -> OpScales:
    """Residual x_{l+1} = √(1−τ)·skip + √τ·branch (add), with the split scaling the skip gradient by √(1−τ)
    and the branch-input gradient by √τ ("delayed" branch scale: tensors inside the branch stay unit)."""
    tau = check_tau(tau, allow_one=True)
    return OpScales(1.0, {"skip": math.sqrt(1 - tau), "branch": math.sqrt(tau)}, (), "α = β per path")


def tau_from_ratio(ratio: float) -> float:
    """u-μP ratio form (branch × τ'/√(1+τ'²), skip × 1/√(1+τ'²)) as the paper's τ = τ'²/(1+τ'²).

    A larger ratio favours the branch (τ' = 1 ↔ τ = 0.5; τ' ≈ 0.1 ↔ τ ≈ 0.01)."""
    r = _positive("ratio", ratio)
    return r * r / (1 + r * r)


def dropout_rule(p: float) -> OpScales:
    """Dropout (keep 1−p, rescale 1/(1−p)): alpha = beta = √(1−p), cancelling the rescale's variance."""
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout probability must lie in [0, 1), got p={p!r}")
    return OpScales(math.sqrt(1 - p), {"input": math.sqrt(1 - p)}, ("input",), "already equal")


ATTENTION_PROBS_SCALE_CAP = 2.0**8
"""The largest probability scale: 2^8 puts p ≥ 2^-14 in E4M3's normal range (docs/theory.md, Attention
probability scale) and keeps the unscaled products P·c·V, P·c·∂Y small enough for fp16 compute."""


def attention_probs_scale(fmt: str | Format | torch.dtype | None = None) -> float:
    """c = min(2^8, 2^⌊log2 max⌋): the power of two that attention probabilities P ∈ [0, 1] are multiplied
    by before the PV matmul casts them to ``fmt`` (a format name, ``Format``, torch dtype or None = no cast).

    P = 1 (a causal row 0) maps to c ≤ max, so nothing saturates; a power of two only moves the exponent,
    so the product is exact; small p gain log2 c binades above the subnormal range. The matmul's α and the
    β's of P and V take 1/c back. Static: no amax of P is ever computed (docs/theory.md, Attention
    probability scale)."""
    if fmt is None:
        return ATTENTION_PROBS_SCALE_CAP
    if isinstance(fmt, torch.dtype):
        largest = torch.finfo(fmt).max if fmt.is_floating_point else torch.iinfo(fmt).max
    else:
        largest = get_format(fmt).max
    return min(ATTENTION_PROBS_SCALE_CAP, 2.0 ** math.floor(math.log2(largest)))


def attention_rule(s: int, dropout_p: float = 0.0) -> OpScales:
    """softmax(QKᵀ/√d)·V with key length s (US-2023): the plain output has σ ≈ √(e/s) (near-uniform
    log-normal attention), so output and q/k/v gradients all take √(s/e·(1−p)). Equal by construction."""
    s = _positive_int("s", s)
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must lie in [0, 1), got dropout_p={dropout_p!r}")
    law = Law.of(math.sqrt((1 - dropout_p) / math.e), s=0.5)
    laws = {"alpha": law, "query": law, "key": law, "value": law}
    return OpScales.from_laws(
        laws, {"s": s}, ("query", "key", "value"), "pair with a small attention τ (0.01)"
    )


# -- the docs table ------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _factors(scales: OpScales, constraint: Constraint) -> str:
    alpha, betas = scales.resolve(constraint)
    return ", ".join([f"α={_fmt(alpha)}", *(f"β_{k}={_fmt(v)}" for k, v in betas.items())])


def _doc_rows() -> list[tuple[str, str, str, str, OpScales]]:
    """(op, α formula, β formula, example, example factors) for every rule, in compendium order."""
    e = WEIGHT_GRAD_EXPONENT
    rows: list[tuple[str, str, str, str, OpScales]] = [
        (
            "matmul A(b×m)·B(m×n), both activations",
            "m^-½",
            "β_left = n^-½, β_right = b^-½",
            "b=4096, m=64, n=256",
            matmul_rule(4096, 64, 256),
        ),
        (
            "linear X(b×m)·Wᵀ + c",
            "m^-½",
            f"β_input = n^-½; β_weight = β_bias = b^-{e:g}",
            "1024→4096, b=65536",
            linear_rule(1024, 4096, 65536),
        ),
        (
            "readout (linear after the last residual)",
            "m^-½",
            f"β_input = n^-½; β_weight = β_bias = b^-{e:g}",
            "768→30400, b=8192",
            readout_rule(768, 30400, 8192),
        ),
        ("sum over n elements", "n^-½", "1", "n=1024", sum_rule(1024)),
    ]
    for name in ACTIVATIONS:
        rows.append(
            (
                f"{name}(mult·x)/mult",
                "1/std f (quadrature)",
                "1/rms f′ (quadrature)",
                "mult=1",
                activation_rule(name),
            )
        )
    rows += [
        (
            "gelu(mult·x)/mult, mult = 0.55",
            "1/std f (quadrature)",
            "1/rms f′ (quadrature)",
            "mult=0.55",
            activation_rule("gelu", 0.55),
        ),
        ("softmax(mult·x), width s", "s/√(e^{mult²}−1)", "s/(mult·e^{mult²/2})", "s=256", softmax_rule(256)),
        (
            "softmax + cross-entropy, V classes",
            "1 (the loss)",
            "V/√(V−1) per row, not ÷ rows",
            "V=5",
            cross_entropy_rule(5),
        ),
        (
            "layer_norm(X; w, c), b rows",
            "1",
            f"β_input = 1; β_weight = β_bias = b^-{e:g}",
            "b=4096",
            layer_norm_rule(4096),
        ),
        ("rms_norm(X; w), b rows", "1", f"β_input = 1; β_weight = b^-{e:g}", "b=4096", rms_norm_rule(4096)),
        (
            "embedding, V×d table, b tokens",
            "1",
            "β_weight = (V/b)^½",
            "V=30400, b=8192",
            embedding_rule(30400, 8192),
        ),
        ("add x + y", "2^-½", "(broadcast factor)^-½", "same shapes", add_rule()),
        (
            "weighted add a·x + c·y, a²+c²=1",
            "a on x, c on y",
            "a, c (true gradient); 1 on a cut input",
            "a=c=2^-½",
            weighted_add_rule(2**-0.5, 2**-0.5),
        ),
        (
            "residual split/add (τ)",
            "√(1−τ)·skip + √τ·branch",
            "split: skip ×√(1−τ), branch ×√τ",
            "τ=0.01",
            residual_rule(0.01),
        ),
        ("dropout p", "√(1−p)", "√(1−p)", "p=0.1", dropout_rule(0.1)),
        (
            "attention softmax(QKᵀ/√d)V, key length s",
            "√(s/e·(1−p))",
            "same on q, k, v",
            "s=256, p=0",
            attention_rule(256),
        ),
    ]
    return rows


def render_ops_markdown() -> str:
    """The ops compendium as markdown, every number computed by the rule functions above."""
    lines = [
        "# Unit-scaled ops compendium",
        "",
        "Generated by `unitscale ops-doc` (or `python -m unitscale.rules`) from `src/unitscale/rules.py`;",
        "do not edit by hand. α multiplies the forward output, β_i the gradient delivered to input i",
        "(docs/theory.md, Scaled ops). *Constrained* inputs arrive over non-cut edges and share one value",
        "with α:",
        "`gmean` (default) takes the geometric mean of the group, `to_output` takes α (u-μP), `None` keeps",
        f"the ideal factors (cut edges only). Weight/bias gradient exponent: {WEIGHT_GRAD_EXPONENT:g}.",
        "",
        "| Op | α (ideal) | β (ideal) | Constrained | Example | Ideal factors | gmean | to_output | Note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, alpha, beta, example, scales in _doc_rows():
        constrained = ", ".join(scales.constrained) or "none (cut)"
        cells = [
            op,
            alpha,
            beta,
            constrained,
            example,
            _factors(scales, None),
            _factors(scales, "gmean"),
            _factors(scales, "to_output"),
            scales.note or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Nonlinearity constants are Gaussian integrals for x ~ N(0, 1) of g(x) = f(mult·x)/mult:",
        "α = 1/std[g(x)], β = 1/√E[f′(mult·x)²], by Gauss-Legendre quadrature in float64",
        "(f and f′ from torch's float64 ops and autograd).",
        "Softmax uses the large-s log-normal limit (docs/theory.md, Softmax); attention is the US-2023 rule",
        "with",
        "the standard 1/√d logit scale, to be paired with τ_attn = 0.01.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(TABLE_DOC_PATH)
    target.write_text(render_ops_markdown(), encoding="utf-8")
    print(f"wrote {target}")
