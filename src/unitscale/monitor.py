"""Live scale-health monitor: range statistics of every quantised tensor, every N training steps.

On a monitored step each matmul-running module's backend (``module.precision``) is swapped for a thin
observing tap; the tap records, per module path and tensor, the value each cast receives, and delegates
the cast unchanged (the training trajectory is bit-identical with the monitor on or off). After the step
the taps are removed and the statistics reach the host in one copy. On every other step nothing is
installed: no hooks, no extra kernels, no host syncs.

Per tensor t about to be cast to format F (``formats.range_counts``, the one place of the range rule):

    rms        √(mean t²) over all elements (zeros included)
    saturated  fraction of finite non-zero |t| > max_F   (clamped to ±max by the saturating cast)
    subnormal  fraction of finite non-zero |t| < min_normal_F   (includes ``flushed``)
    flushed    fraction of finite non-zero |t| ≤ min_subnormal_F / 2   (round to zero)
    nonfinite  fraction of all elements that are ±inf or NaN

**Comfortable range** (:class:`ComfortRule`, defaults): a tensor is comfortable in F iff it has no non-finite
value, saturated ≤ 1e-4, flushed ≤ 1 %, and — when it has any non-zero value —

    log2 rms ∈ [log2 min_normal_F + 3, log2 max_F − 3]     (E4M3: [−3, 5.8]; E5M2: [−11, 12.8])

i.e. RMS at least three binades (×8) inside the normal range at both ends. Why three: above, a tensor with
Laplace tails (heavier than Gaussian, typical of gradients) and RMS σ = max/8 puts P(|x| > 8σ) = e^(−8√2)
≈ 1.2e-5 beyond max, under the saturation limit; below, a Gaussian with σ = 8·min_normal flushes
P(|x| < min_subnormal/2) ≈ 0.6 % in E4M3 (under the flush limit), while its SNR is still on the plateau
(REFERENCE §3.2: within 10× of peak down to σ = 2⁻⁷), so the warning comes binades before precision is
lost — drift shows before a NaN. Unit-scaled tensors (σ ≈ 1) sit in the middle of both FP8 bands.

A warning (:class:`ScaleWarning`, also a ``"scale_warning"`` metrics record) names the module path and
tensor when it is uncomfortable at ``patience`` consecutive checks (once per streak).

Backends observed: the simulate backend (every cast: linear inputs x and W, their output gradient; both
operands of attention matmuls and their output gradient) and the FP8 hardware backend (linears that its
dispatch rule runs in FP8: x/s_x, W/s_w and ∂y/s_g, the values its cast clamps). INT4 and exact modules are
not monitored (integer formats have no subnormal range; exact modules cast nothing).

Tensor names: a linear's ``activation``, ``weight`` and ``grad`` (output gradient); the k-th matmul of a
module's forward gives ``matmul{k}.a``, ``matmul{k}.b`` and ``matmul{k}.grad`` (attention: matmul0 = Q Kᵀ,
matmul1 = P V). A module run twice in one step gets ``#1``, ``#2``… suffixes on its later calls.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unitscale.formats import Format, fractions_from_counts, get_format, range_counts
from unitscale.precision.backend import Exact

__all__ = ["ComfortRule", "GroupSeries", "ScaleMonitor", "ScaleWarning", "TensorStats", "layer_group",
           "plot_history", "scale_history", "stats_from_counts", "worst", "worst_text"]


class ScaleWarning(UserWarning):
    """A quantised tensor stayed outside its format's comfortable range for ``patience`` checks."""


@dataclass(frozen=True)
class TensorStats:
    """Range statistics of one tensor at one check (fractions as in the module docstring)."""

    module: str
    tensor: str
    role: str  # "weight" | "activation" | "grad"
    format: str
    rms: float
    saturated: float
    subnormal: float
    flushed: float
    nonfinite: float
    nonzero: int  # finite non-zero values (the denominator of the fractions)

    @property
    def name(self) -> str:
        return f"{self.module or '<model>'}:{self.tensor}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_from_counts(module: str, tensor: str, role: str, fmt: str | Format, counts: Sequence[float],
                      sum_sq: float, numel: int) -> TensorStats:
    """TensorStats from a :func:`formats.range_counts` vector, Σt² and the element count (pure).

    rms = √(Σt² / numel); NaN when Σt² is not finite (then ``nonfinite`` or an fp32 overflow says why).
    """
    counts = [int(c) for c in counts]
    if len(counts) != 6:
        raise ValueError(f"counts must be the 6 range_counts buckets, got {len(counts)} values")
    frac = fractions_from_counts(counts)
    rms = math.sqrt(sum_sq / numel) if numel and math.isfinite(sum_sq) else (0.0 if not numel else math.nan)
    return TensorStats(module, tensor, role, get_format(fmt).name, rms, frac["overflow"], frac["subnormal"],
                       frac["underflow"], counts[5] / numel if numel else 0.0, sum(counts[1:5]))


@dataclass(frozen=True)
class ComfortRule:
    """When a tensor is comfortable in its format (see the module docstring for the justification).

    margin_log2: binades the RMS must keep inside [min_normal, max] at each end; max_saturated /
    max_flushed: the largest acceptable fractions (of finite non-zero values).
    """

    margin_log2: float = 3.0
    max_saturated: float = 1e-4
    max_flushed: float = 0.01

    def __post_init__(self) -> None:
        for name in ("margin_log2", "max_saturated", "max_flushed"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"ComfortRule.{name} must be a finite number >= 0, got {v!r}")

    def band(self, fmt: str | Format) -> tuple[float, float]:
        """[lo, hi] in log2 RMS: [log2 min_normal + margin, log2 max − margin]."""
        f = get_format(fmt)
        return math.log2(f.min_normal) + self.margin_log2, math.log2(f.max) - self.margin_log2

    def assess(self, s: TensorStats) -> tuple[float, str]:
        """(score, reason): score = the largest of each criterion's value over its limit (RMS: 2^binades
        outside the band), so score > 1 exactly when the tensor is uncomfortable; reason "" when it is not."""
        if s.nonfinite > 0 or math.isnan(s.rms):
            return math.inf, f"{s.nonfinite:.2%} non-finite values"
        lo, hi = self.band(s.format)
        fmt = get_format(s.format)
        terms: list[tuple[float, str]] = [
            (_ratio(s.saturated, self.max_saturated),
             f"{s.saturated:.2e} saturated at ±{fmt.max:g} (limit {self.max_saturated:g})"),
            (_ratio(s.flushed, self.max_flushed),
             f"{s.flushed:.2%} flushed to zero (limit {self.max_flushed:.2%})"),
        ]
        if s.nonzero > 0:
            log2_rms = math.log2(s.rms) if s.rms > 0 else -math.inf
            side = "below" if log2_rms < lo else "above"
            terms.append((2.0 ** max(lo - log2_rms, log2_rms - hi),
                          f"RMS 2^{log2_rms:.2f} {side} the comfortable band [2^{lo:.2f}, 2^{hi:.2f}]"))
        score, reason = max(terms, key=lambda t: t[0])
        return score, (f"{reason} of {s.format}" if score > 1 else "")


def _ratio(value: float, limit: float) -> float:
    if limit == 0:
        return math.inf if value > 0 else 0.0
    return value / limit


Assessed = tuple[TensorStats, float, str]  # (stats, score, reason)


def worst(stats: Sequence[TensorStats], rule: ComfortRule | None = None) -> Assessed | None:
    """The tensor with the highest comfort score (None for no tensors)."""
    rule = rule or ComfortRule()
    return _worst([(s, *rule.assess(s)) for s in stats])


def _worst(assessed: Sequence[Assessed]) -> Assessed | None:
    return max(assessed, key=lambda a: a[1]) if assessed else None


def worst_text(assessed: Assessed | None) -> str:
    """One line for the progress bar: the worst offender and why, or "ok" and the tensor nearest the edge."""
    if assessed is None:
        return "-"
    s, score, reason = assessed
    return f"{s.name}: {reason}" if score > 1 else f"ok (nearest the edge: {s.name})"


# --------------------------------------------------------------------------------------------------------
# Taps: what stands in for a module's backend on a monitored step
# --------------------------------------------------------------------------------------------------------

Observe = Callable[[str, str, Format, Tensor], None]  # (tensor name, role, format, value)


def _observed_kind(backend: Any) -> str | None:
    """"casts" for backends that quantise through cast_forward/cast_backward inside Exact's autograd
    Functions (the simulate backend), "fp8" for the FP8 hardware backend, None for the rest."""
    from unitscale.precision.simulate import Simulate

    if isinstance(backend, Simulate):
        same = type(backend).linear is Exact.linear and type(backend).matmul is Exact.matmul
        return "casts" if same else None
    from unitscale.precision.fp8 import Fp8Backend

    return "fp8" if isinstance(backend, Fp8Backend) else None


class _CastTap(Exact):
    """One matmul call of a simulate-like backend: Exact's autograd Functions with this object as the
    backend, so each cast first reports its input under the call's tensor name."""

    def __init__(self, inner: Any, observe: Observe, forward_name: Callable[[str], str], grad_name: str):
        self.inner, self.observe = inner, observe
        self.forward_name, self.grad_name = forward_name, grad_name

    def cast_forward(self, t: Tensor, role: str) -> Tensor:  # type: ignore[override]
        fmt = self.inner.formats.get(role)
        if fmt is not None:
            self.observe(self.forward_name(role), role, fmt, t)
        return self.inner.cast_forward(t, role)

    def cast_backward(self, grad: Tensor) -> Tensor:
        if self.inner.grad_format is not None:
            self.observe(self.grad_name, "grad", self.inner.grad_format, grad)
        return self.inner.cast_backward(grad)


class _ModuleTap:
    """Stands in for one module's backend during a monitored step; other attributes read through."""

    def __init__(self, inner: Any, kind: str, path: str, sink: Callable[..., None]) -> None:
        self.inner, self.kind, self.path, self.sink = inner, kind, path, sink
        self.calls = {"linear": itertools.count(), "matmul": itertools.count()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _observe(self, tensor: str, role: str, fmt: Format | torch.dtype, value: Tensor) -> None:
        self.sink(self.path, tensor, role, fmt, value)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, **scales: float) -> Tensor:
        k = next(self.calls["linear"])
        suffix = f"#{k}" if k else ""
        if self.kind == "casts":
            tap = _CastTap(self.inner, self._observe, lambda role: role + suffix, "grad" + suffix)
            return tap.linear(x, weight, bias, **scales)
        return self._fp8_linear(x, weight, bias, suffix, scales)

    def matmul(self, a: Tensor, b: Tensor, **kwargs: Any) -> Tensor:
        k = next(self.calls["matmul"])
        if self.kind != "casts":
            return self.inner.matmul(a, b, **kwargs)  # the fp8 backend runs batched matmuls uncast
        operands = iter("ab")
        tap = _CastTap(self.inner, self._observe, lambda role: f"matmul{k}.{next(operands)}",
                       f"matmul{k}.grad")
        return tap.matmul(a, b, **kwargs)

    def _fp8_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, suffix: str,
                    scales: dict[str, float]) -> Tensor:
        from unitscale.precision import fp8

        backend = self.inner
        y = backend.linear(x, weight, bias, **scales)
        k = x.shape[-1]
        m, n = (x.numel() // k if k else 0), weight.shape[0]
        # The conditions of Fp8Backend.linear's FP8 path: elsewhere nothing is cast, so nothing is observed.
        if not (fp8._compute_dtype(x) in fp8.COMPUTE_DTYPES and backend.dispatch.use_fp8(m, k, n)
                and fp8.fp8_supported(x.device)):
            return y
        formats = backend.formats
        pow2 = backend.weight_scale == "pow2_rms"
        s_w = fp8.pow2_rms_scale(weight) if pow2 else backend.weight_static_scale
        self._observe("activation" + suffix, "activation", formats["activation"],
                      _unscaled(x.detach(), backend.activation_scale))
        self._observe("weight" + suffix, "weight", formats["weight"], _unscaled(weight.detach(), s_w))
        if y.requires_grad:
            g_fmt, g_scale = formats["grad"], backend.grad_scale
            y.register_hook(lambda g: self._observe("grad" + suffix, "grad", g_fmt, _unscaled(g, g_scale)))
        return y


def _unscaled(t: Tensor, scale: float | Tensor) -> Tensor:
    """t / s, the value a static-scale cast rounds (s = 1: t itself, no kernel)."""
    if isinstance(scale, Tensor) or scale != 1.0:
        return t.float() / scale
    return t


_FP8_DTYPE_FORMATS = {torch.float8_e4m3fn: "fp8_e4b", torch.float8_e5m2: "fp8_e5b"}


# --------------------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    module: str
    tensor: str
    role: str
    fmt: Format
    numel: int
    packed: Tensor  # float64 [7] on the tensor's device: the 6 range counts, then Σt²


@dataclass
class _Streak:
    checks: int = 0
    warned: bool = False


class ScaleMonitor:
    """Records range statistics of every quantised tensor of ``model`` on every ``every``-th step.

    ``every`` = 0 turns it off. Step numbers are 1-based (step s is the s-th optimiser step, as in the
    metrics log); steps 1 and every multiple of ``every`` are checked. ``log`` (anything with
    ``write(dict)``) receives one ``{"event": "scales", ...}`` record per check and a ``"scale_warning"``
    record per warning; ``bar`` (a ``TrainProgress``) shows the worst offender. Use::

        monitor = ScaleMonitor(model, every=200)
        for step in range(1, steps + 1):
            with monitor.step(step):        # a no-op context on unmonitored steps
                loss = model(x, y)[1]
                loss.backward()
    """

    def __init__(self, model: nn.Module, every: int = 200, patience: int = 3, *,
                 rule: ComfortRule | None = None, log: Any = None, bar: Any = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"monitor every must be a non-negative integer (0 = off), got {every!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"monitor patience must be a positive integer, got {patience!r}")
        self.model, self.every, self.patience = model, every, patience
        self.rule = rule or ComfortRule()
        self.log, self.bar = log, bar
        self.last: list[TensorStats] = []
        self.worst: Assessed | None = None
        self.streaks: dict[tuple[str, str], _Streak] = {}
        self._pending: list[_Pending] = []

    # scheduling -------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) is checked."""
        return self.every > 0 and (step == 1 or step % self.every == 0)

    def step(self, step: int) -> contextlib.AbstractContextManager:
        """Context around one step's forward and backward: observes them when the step is due."""
        return self._check(step) if self.due(step) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _check(self, step: int) -> Iterator[None]:
        swapped = self._install()
        try:
            yield
        except BaseException:
            self._pending.clear()
            raise
        finally:
            for module, backend in swapped:
                module.precision = backend
        self.collect(step)

    def _install(self) -> list[tuple[nn.Module, Any]]:
        swapped = []
        for path, module in self.model.named_modules():
            backend = getattr(module, "precision", None)
            kind = _observed_kind(backend)
            if kind is not None:
                swapped.append((module, backend))
                module.precision = _ModuleTap(backend, kind, path, self._record)
        return swapped

    def _record(self, module: str, tensor: str, role: str, fmt: Format | torch.dtype, value: Tensor) -> None:
        """Device-side statistics of ``value`` (no host sync): range counts and Σt², packed as float64."""
        f = get_format(_FP8_DTYPE_FORMATS[fmt]) if isinstance(fmt, torch.dtype) else fmt
        v = value.detach()
        with torch.no_grad():
            counts = range_counts(v, f)
            sum_sq = torch.linalg.vector_norm(v, dtype=torch.float32).double().square()
            packed = torch.cat([counts.double(), sum_sq.reshape(1)])
        self._pending.append(_Pending(module, tensor, role, f, v.numel(), packed))

    # host side ----------------------------------------------------------------------------------------------
    def collect(self, step: int) -> list[TensorStats]:
        """Bring the pending statistics to the host (one copy), update streaks, warn, log and show."""
        pending, self._pending = self._pending, []
        if not pending:
            self.last = []
            return []
        host = torch.stack([p.packed.to(pending[0].packed.device) for p in pending]).cpu().tolist()
        stats = [stats_from_counts(p.module, p.tensor, p.role, p.fmt, row[:6], row[6], p.numel)
                 for p, row in zip(pending, host)]
        self.update(step, stats)
        return stats

    def update(self, step: int, stats: Sequence[TensorStats]) -> list[tuple[TensorStats, str]]:
        """Apply the comfort rule and the patience rule to one check; returns the warnings raised."""
        self.last = list(stats)
        assessed = [(s, *self.rule.assess(s)) for s in stats]
        raised = []
        for s, score, reason in assessed:
            streak = self.streaks.setdefault((s.module, s.tensor), _Streak())
            if score <= 1:
                self.streaks[(s.module, s.tensor)] = _Streak()
                continue
            streak.checks += 1
            if streak.checks >= self.patience and not streak.warned:
                streak.warned = True
                raised.append((s, reason))
        self.worst = _worst(assessed)
        if self.log is not None:
            record: dict[str, Any] = {"event": "scales", "step": step,
                                      "tensors": [s.to_dict() for s in stats]}
            if self.worst is not None:
                w, score, reason = self.worst
                record["worst"] = {"name": w.name, "score": score, "reason": reason}
            self.log.write(record)
        for s, reason in raised:
            message = (f"scale health: {s.name} ({s.role}, {s.format}) outside the comfortable range for "
                       f"{self.patience} consecutive checks (step {step}): {reason}")
            if self.log is not None:
                self.log.write({"event": "scale_warning", "step": step, "module": s.module,
                                "tensor": s.tensor, "role": s.role, "format": s.format,
                                "checks": self.patience, "reason": reason})
            warnings.warn(message, ScaleWarning, stacklevel=2)
        self._show(step)
        return raised

    def worst_text(self) -> str:
        """One line for the progress bar: the worst tensor of the last check and why."""
        return worst_text(self.worst)

    def _show(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step, scales=self.worst_text())



# --------------------------------------------------------------------------------------------------------
# History: the checks of a run, over steps
# --------------------------------------------------------------------------------------------------------

ROLES: tuple[str, ...] = ("weight", "activation", "grad")
METRICS: tuple[str, ...] = ("rms", "saturated", "subnormal", "flushed")
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_group(module: str) -> str:
    """The repeated block a module belongs to (``blocks.3`` for ``blocks.3.body.qkv``), else its path's
    first name (``lm_head``)."""
    m = _LAYER.match(module)
    return m.group(1) if m else (module.split(".")[0] or "<model>")


@dataclass
class GroupSeries:
    """One layer group's tensors of one role over the checks: per step, log2 RMS (geometric mean, min and
    max over the tensors) and each fraction's maximum (the group's worst tensor)."""

    steps: list[int]
    log2_rms: list[float]
    log2_rms_min: list[float]
    log2_rms_max: list[float]
    fractions: dict[str, list[float]]


def scale_history(records: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, GroupSeries]],
                                                                 dict[str, list[str]]]:
    """({role: {group: series}}, {role: formats seen}) from metrics records (``"scales"`` events only)."""
    acc: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    formats: dict[str, list[str]] = {}
    for rec in records:
        if rec.get("event") != "scales":
            continue
        for row in rec.get("tensors", []):
            role = row["role"]
            acc.setdefault(role, {}).setdefault(layer_group(row["module"]), {}).setdefault(
                rec["step"], []).append(row)
            if row["format"] not in formats.setdefault(role, []):
                formats[role].append(row["format"])
    out: dict[str, dict[str, GroupSeries]] = {}
    for role, groups in acc.items():
        out[role] = {}
        for group, by_step in groups.items():
            steps = sorted(by_step)
            logs = [[_log2(r.get("rms")) for r in by_step[s]] for s in steps]
            finite = [[v for v in row if math.isfinite(v)] for row in logs]
            out[role][group] = GroupSeries(
                steps=steps,
                log2_rms=[sum(v) / len(v) if v else math.nan for v in finite],
                log2_rms_min=[min(v) if v else math.nan for v in finite],
                log2_rms_max=[max(v) if v else math.nan for v in finite],
                fractions={k: [max((r.get(k) or 0.0) for r in by_step[s]) for s in steps]
                           for k in METRICS[1:]},
            )
    return out, formats


def _log2(v: float | None) -> float:
    return math.log2(v) if v is not None and v > 0 and math.isfinite(v) else math.nan


def plot_history(records: Sequence[dict[str, Any]], *, rule: ComfortRule | None = None,
                 title: str = "") -> Any:
    """A matplotlib Figure: rows log2 RMS / saturated / subnormal / flushed, columns weight / activation /
    grad; one line per layer group over training steps, the format's ranges as bands (RMS: normal range,
    comfortable band inside it, subnormal range below; fractions: the rule's limits). ValueError when the
    records hold no check."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rule = rule or ComfortRule()
    history, formats = scale_history(records)
    roles = [r for r in ROLES if r in history] + sorted(set(history) - set(ROLES))
    if not roles:
        raise ValueError("no scale-health checks in these records (train with monitor_every > 0; the "
                         "monitor records only modules that run the simulate or fp8 backend)")
    fig = Figure(figsize=(5.2 * len(roles) + 2.2, 11))
    axes = fig.subplots(len(METRICS), len(roles), sharex=True, squeeze=False)
    groups = list(dict.fromkeys(g for r in roles for g in history[r]))
    cmap = colormaps["viridis"]
    colour = {g: cmap(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}
    limits = {"saturated": rule.max_saturated, "flushed": rule.max_flushed}
    for j, role in enumerate(roles):
        fmt = get_format(formats[role][0])
        others = f" (+ {', '.join(formats[role][1:])})" if len(formats[role]) > 1 else ""
        ax = axes[0][j]
        lo, hi = rule.band(fmt)
        ax.axhspan(math.log2(fmt.min_normal), math.log2(fmt.max), color="tab:green", alpha=0.08, lw=0)
        ax.axhspan(lo, hi, color="tab:green", alpha=0.14, lw=0)
        ax.axhspan(math.log2(fmt.min_subnormal), math.log2(fmt.min_normal), color="tab:orange", alpha=0.15,
                   lw=0)
        ax.set_title(f"{role}: {fmt.name}{others}", fontsize=11)
        for group, s in history[role].items():
            ax.plot(s.steps, s.log2_rms, color=colour[group], lw=1.3, marker=".", label=group)
            ax.fill_between(s.steps, s.log2_rms_min, s.log2_rms_max, color=colour[group], alpha=0.12, lw=0)
            for i, key in enumerate(METRICS[1:], start=1):
                axes[i][j].plot(s.steps, s.fractions[key], color=colour[group], lw=1.3, marker=".")
        for i, key in enumerate(METRICS[1:], start=1):
            a = axes[i][j]
            a.set_yscale("symlog", linthresh=1e-6)
            a.set_ylim(0, 1.2)
            if key in limits:
                a.axhspan(limits[key], 1.2, color="tab:red", alpha=0.08, lw=0)
                a.axhline(limits[key], color="tab:red", lw=0.8, ls="--")
    labels = {"rms": "log2 RMS", "saturated": "fraction saturated", "subnormal": "fraction subnormal",
              "flushed": "fraction flushed to 0"}
    for i, key in enumerate(METRICS):
        axes[i][0].set_ylabel(labels[key])
        for a in axes[i]:
            a.grid(color="0.88", lw=0.5)
    for a in axes[-1]:
        a.set_xlabel("step")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False, title="layer group")
    fig.suptitle(title or "scale health over training (band: comfortable RMS; dashed: limits)", fontsize=12)
    fig.subplots_adjust(left=0.07, right=1 - 1.9 / fig.get_figwidth(), top=0.93, bottom=0.05, hspace=0.12)
    return fig
