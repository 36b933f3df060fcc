"""Training metrics: bits per character, the JSON-lines log (mirrored to TensorBoard when installed), the
live progress bar and the loss-curve plot."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn

LN2 = math.log(2.0)


def bpc(nll_nats: float) -> float:
    """Bits per character of a mean negative log-likelihood in nats: NLL / ln 2."""
    return nll_nats / LN2


@torch.no_grad()
def evaluate_bpc(
    model: nn.Module,
    windows: Tensor,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """BPC of ``model`` on fixed windows [n, T+1]: Σ −log p(x_{t+1} | x_≤t) / (n·T·ln 2).

    The NLL is taken from the logits with float32 softmax-CE summed in float64, independently of the
    model's own (possibly scaled) loss. The global RNG is saved and restored, so evaluating never changes
    the training trajectory. NaN if any logit is non-finite.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(0, windows.shape[0], batch_size):
                w = windows[i:i + batch_size].to(device)
                with autocast():
                    logits, _ = model(w[:, :-1])
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                      reduction="sum")
                total += float(nll.double())
                count += w[:, 1:].numel()
    finally:
        model.train(was_training)
    return bpc(total / count) if math.isfinite(total) else math.nan


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def tensorboard_writer(log_dir: str | Path, purge_step: int | None = None) -> Any | None:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, or None when the optional ``tensorboard``
    package is not installed (``pip install unitscale[tensorboard]``). ``purge_step`` hides the events of
    steps >= it that an interrupted run had written (a resume recomputes them)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLog:
    """Append-only JSON-lines file, one record per line, flushed at every write; each record's numeric
    fields also go to TensorBoard as ``<event>/<field>`` at its step when ``tensorboard_dir`` is given and
    the package is installed."""

    def __init__(self, path: str | Path, *, keep_until_step: int | None = None,
                 tensorboard_dir: str | Path | None = None) -> None:
        """Open ``path``; with ``keep_until_step`` (a resume) drop records of later steps first, since
        they belong to the interrupted tail that the resumed run recomputes."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= keep_until_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        purge = None if keep_until_step is None else keep_until_step + 1
        self.tensorboard = None if tensorboard_dir is None else tensorboard_writer(tensorboard_dir, purge)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()
        if self.tensorboard is not None and "step" in record:
            event = record.get("event", "metrics")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{event}/{key}", value, record["step"])

    def close(self) -> None:
        self._f.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (missing file: none; a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class _StackedProgress(Progress):
    """A rich Progress whose tasks show a second and third line: the run's numbers and the scale monitor's
    worst tensor (cut with an ellipsis), so the counter, bar and ETA keep their room at any width."""

    def get_renderables(self) -> Iterable[Any]:
        from rich.text import Text

        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            for key in ("stats", "scales"):
                if task.fields.get(key):
                    yield Text("  " + task.fields[key], no_wrap=True, overflow="ellipsis")


class TrainProgress:
    """Progress of a run: description, bar, step counter and ETA on one line, then loss / validation BPC /
    tokens per second, then the scale monitor's worst tensor; silent when disabled or not a terminal."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, start: int = 0,
                 console: Any = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        self.enabled = enabled and (console.is_terminal if console is not None else sys.stdout.isatty())
        self._progress = _StackedProgress(
            TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TimeRemainingColumn(), disable=not self.enabled, transient=False, console=console,
        )
        self._fields = {"tps": "-", "loss": "-", "bpc": "-"}
        self._task = self._progress.add_task(description, total=total, completed=start, stats="", scales="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, *, tokens_per_s: float | None = None, loss: float | None = None,
               valid_bpc: float | None = None, scales: str | None = None) -> None:
        """Advance to ``step``; ``scales`` is the scale monitor's worst offender (unitscale.monitor)."""
        fields: dict[str, str] = {}
        if scales is not None:
            fields["scales"] = f"scales: {scales}"
        if tokens_per_s is not None:
            self._fields["tps"] = f"{tokens_per_s:,.0f}"
        if loss is not None:
            self._fields["loss"] = f"{loss:.4f}"
        if valid_bpc is not None:
            self._fields["bpc"] = f"{valid_bpc:.4f}"
        f = self._fields
        fields["stats"] = f"loss {f['loss']} · valid BPC {f['bpc']} · {f['tps']} tok/s"
        self._progress.update(self._task, completed=step, **fields)

    def refresh(self) -> None:
        self._progress.refresh()


def curves_figure(
    runs: Sequence[tuple[str, Iterable[dict[str, Any]]]],
    *,
    title: str = "",
    styles: Sequence[dict[str, Any]] | None = None,
) -> Any:
    """The loss-curve figure of ``plot_curves`` (a matplotlib Figure, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    for k, (label, records) in enumerate(runs):
        records = list(records)
        style = {"color": f"C{k}", **(styles[k] if styles else {})}
        train = [(r["step"], r["loss"]) for r in records
                 if r.get("event") == "train" and r.get("loss") is not None]
        evals = [(r["step"], r["valid_bpc"]) for r in records
                 if r.get("event") == "eval" and r.get("valid_bpc") is not None]
        if train:
            steps, losses = zip(*train)
            raw = [bpc(v) for v in losses]
            line = {k2: v for k2, v in style.items() if k2 not in ("marker", "mfc")}
            ax.plot(steps, raw, lw=0.6, alpha=0.25, **{**line, "ls": "-"})  # every logged point, faint
            ax.plot(steps, smooth_by_steps(steps, raw), lw=1.4, alpha=0.9, label=f"{label} (train)", **line)
        if evals:
            steps, vals = zip(*evals)
            marks = {"marker": "o", "ms": 5, **{k2: v for k2, v in style.items() if k2 != "ls"}}
            ax.plot(steps, vals, ls="none", label=f"{label} (valid)", **marks)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character (train: faint = logged, line = smoothed over steps)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(
    runs: Sequence[tuple[str, Iterable[dict[str, Any]]]],
    path: str | Path,
    *,
    title: str = "",
    styles: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """One PNG: training loss in bits/char (logged points faint, smoothed over steps as a line) and
    validation BPC as markers, per run.

    ``runs`` pairs a label with the run's metrics records (``event`` "train" with ``loss`` in nats,
    ``event`` "eval" with ``valid_bpc``); ``styles`` optionally gives matplotlib kwargs per run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(runs, title=title, styles=styles).savefig(path)
    return path


SMOOTH_FRACTION = 1 / 25  # the smoothing window, as a fraction of the steps the curve spans


def smooth_by_steps(steps: Sequence[int], values: Sequence[float], window: float | None = None
                    ) -> list[float]:
    """Centred moving average over steps: the mean of the values logged at steps within ±h of each step,
    h = min(window/2, distance to either end of the curve). A window in steps (default: the span / 25)
    means the same smoothing whatever ``log_every`` is, and the symmetric window (shrinking at the ends)
    adds no lag: a linear trend comes out unchanged."""
    if not steps:
        return []
    first, last = steps[0], steps[-1]
    w = (last - first) * SMOOTH_FRACTION if window is None else window
    out = []
    lo = hi = 0
    total = 0.0
    for s in steps:
        h = min(w / 2, s - first, last - s)
        while hi < len(steps) and steps[hi] <= s + h:
            total += values[hi]
            hi += 1
        while steps[lo] < s - h:
            total -= values[lo]
            lo += 1
        out.append(total / (hi - lo))
    return out
