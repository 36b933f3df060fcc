"""Training metrics: bits per character, the JSON-lines log, the live progress bar and the loss-curve plot."""

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


class MetricsLog:
    """Append-only JSON-lines file, one record per line, flushed at every write."""

    def __init__(self, path: str | Path, *, keep_until_step: int | None = None) -> None:
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

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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


class TrainProgress:
    """A rich progress bar with tokens/s, loss and validation BPC; silent when disabled or not a TTY."""

    def __init__(self, total: int, description: str, *, enabled: bool = True, start: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled and sys.stdout.isatty()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[tps]:>8} tok/s  loss {task.fields[loss]}  val BPC {task.fields[bpc]}"),
            TimeRemainingColumn(), TextColumn("{task.fields[scales]}"), disable=not self.enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, completed=start, tps="-", loss="-",
                                             bpc="-", scales="")

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
            fields["tps"] = f"{tokens_per_s:,.0f}"
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if valid_bpc is not None:
            fields["bpc"] = f"{valid_bpc:.4f}"
        self._progress.update(self._task, completed=step, **fields)


def plot_curves(
    runs: Sequence[tuple[str, Iterable[dict[str, Any]]]],
    path: str | Path,
    *,
    title: str = "",
    styles: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """One PNG: training loss (in bits/char, smoothed) as lines and validation BPC as markers, per run.

    ``runs`` pairs a label with the run's metrics records (``event`` "train" with ``loss`` in nats,
    ``event`` "eval" with ``valid_bpc``); ``styles`` optionally gives matplotlib kwargs per run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for k, (label, records) in enumerate(runs):
        records = list(records)
        style = {"color": f"C{k}", **(styles[k] if styles else {})}
        train = [(r["step"], r["loss"]) for r in records
                 if r.get("event") == "train" and r.get("loss") is not None]
        evals = [(r["step"], r["valid_bpc"]) for r in records
                 if r.get("event") == "eval" and r.get("valid_bpc") is not None]
        if train:
            steps, losses = zip(*train)
            line = {k2: v for k2, v in style.items() if k2 not in ("marker", "mfc")}
            ax.plot(steps, _smooth([bpc(v) for v in losses]), lw=1.2, alpha=0.8, label=f"{label} (train)",
                    **line)
        if evals:
            steps, vals = zip(*evals)
            marks = {"marker": "o", "ms": 5, **{k2: v for k2, v in style.items() if k2 != "ls"}}
            ax.plot(steps, vals, ls="none", label=f"{label} (valid)", **marks)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int = 20) -> list[float]:
    """Trailing moving average (window ≤ ``window``), so early points are not delayed."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
