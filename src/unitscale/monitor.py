"""Live scale-health monitor: range statistics of every quantised tensor, every N training steps.

On a monitored step each matmul-running module's backend (``module.precision``) is swapped for a thin
observing tap; the tap records, per module path and tensor, the value each cast receives, and delegates
the cast unchanged (the training trajectory is bit-identical with the monitor on or off). After the step
the taps are removed and the statistics reach the host in one copy. On every other step nothing is
installed: no hooks, no extra kernels, no host syncs.

Per tensor t about to be cast to format F the monitor records a :class:`TensorStats` (rms and the
overflow / subnormal / underflow / non-finite fractions) and judges it with a :class:`ComfortRule`; both
live in ``unitscale.analysis.health``, built on the statistics the offline analysis records too.

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unitscale.analysis.health import (
    Assessed,
    ComfortRule,
    TensorStats,
    stats_from_counts,
    worst,
    worst_of,
    worst_text,
)
from unitscale.analysis.history import GroupSeries, layer_group, scale_history
from unitscale.analysis.plot import plot_history
from unitscale.analysis.stats import tensor_stats, to_host
from unitscale.formats import Format, get_format
from unitscale.precision.backend import Exact
from unitscale.precision.protocol import Backend
from unitscale.precision.scales import weight_scale

__all__ = ["ComfortRule", "GroupSeries", "ScaleMonitor", "ScaleWarning", "TensorStats", "layer_group",
           "plot_history", "scale_history", "stats_from_counts", "worst", "worst_text"]


class ScaleWarning(UserWarning):
    """A quantised tensor stayed outside its format's comfortable range for ``patience`` checks."""


# --------------------------------------------------------------------------------------------------------
# Taps: what stands in for a module's backend on a monitored step
# --------------------------------------------------------------------------------------------------------

Observe = Callable[[str, str, Format, Tensor], None]  # (tensor name, role, format, value)


def _observed_kind(backend: Backend | None) -> str | None:
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
            mode = getattr(self.inner, "weight_scale", "static") if role == "weight" else "static"
            # The value the cast rounds: a scaled weight is cast as q(W/s)·s (precision.scales).
            seen = t if mode == "static" else _unscaled(t, weight_scale(t, mode, fmt.max))
            self.observe(self.forward_name(role), role, fmt, seen)
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
        w_max = torch.finfo(formats["weight"]).max  # the rule Fp8Backend.weight_fp8 applies
        s_w = weight_scale(weight.to(fp8._compute_dtype(x)), backend.weight_scale, w_max,
                           backend.weight_static_scale)
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
    stats: dict[str, Tensor]  # tensor_stats (detail=False) on the tensor's device


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
        """Device-side statistics of ``value`` (no host sync)."""
        f = get_format(_FP8_DTYPE_FORMATS[fmt]) if isinstance(fmt, torch.dtype) else fmt
        self._pending.append(_Pending(module, tensor, role, f, tensor_stats(value, f, detail=False)))

    # host side ----------------------------------------------------------------------------------------------
    def collect(self, step: int) -> list[TensorStats]:
        """Bring the pending statistics to the host (one copy), update streaks, warn, log and show."""
        pending, self._pending = self._pending, []
        if not pending:
            self.last = []
            return []
        host = to_host([p.stats for p in pending])
        stats = [stats_from_counts(p.module, p.tensor, p.role, p.fmt, host["range"][i], host["rms"][i])
                 for i, p in enumerate(pending)]
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
        self.worst = worst_of(assessed)
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
