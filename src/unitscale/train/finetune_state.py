"""Fine-tuning state on disk: the resumable per-seed checkpoint and the saved fine-tuned model.

``<run>/seed<k>.ckpt.pt`` holds everything a seed's training needs to continue bit for bit (model,
optimiser, LR schedule, the epoch's example order and position in it, data-order generator, global RNG,
losses so far, the config); it is written atomically by ``checkpoint.save_atomic`` (previous one kept) and
removed when the seed finishes. ``<run>/seed<k>.model.pt`` is the result: the weights, the topic label
names, the config and the conversion example, all loadable with ``torch.load(weights_only=True)``;
``load_finetuned`` rebuilds the classifier from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unitscale.train import checkpoint

# Config fields a resumed seed may change without leaving its trajectory.
RESUME_FREE = frozenset({"device", "eval_batch_size"})


def checkpoint_path(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed{seed}.ckpt.pt"


def model_path(run_dir: Path, seed: int) -> Path:
    return Path(run_dir) / f"seed{seed}.model.pt"


@dataclass
class Position:
    """Where a seed's training stands: optimiser steps done, this epoch's order and the next batch in it."""

    step: int = 0
    order: Tensor | None = None
    batch: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)


def save(
    path: Path,
    config: Any,
    seed: int,
    max_steps: int | None,
    pos: Position,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
) -> None:
    """Atomically write everything ``restore`` needs to continue this seed bit for bit."""
    checkpoint.save_atomic(
        {
            "kind": "finetune",
            "config": dataclasses.asdict(config),
            "seed": seed,
            "max_steps": max_steps,
            "step": pos.step,
            "order": pos.order,
            "batch": pos.batch,
            "losses": list(pos.losses),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        path,
    )


def restore(
    path: Path,
    config: Any,
    seed: int,
    max_steps: int | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
) -> Position:
    """Load a seed's checkpoint into the freshly built objects; ValueError if it belongs to another run."""
    state, _, _ = checkpoint.load_latest(path)
    saved = state.get("config", {})
    now = dataclasses.asdict(config)
    changed = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
    if state.get("max_steps") != max_steps:
        changed.append("max_steps")
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k, state.get(k))!r} -> {now.get(k, max_steps)!r}" for k in changed)
        raise ValueError(
            f"--resume with different options ({diff}); give the options of the run in {path.parent}"
        )
    if state.get("seed") != seed:
        raise ValueError(f"{path} belongs to seed {state.get('seed')}, not {seed}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return Position(int(state["step"]), state["order"], int(state["batch"]), list(state["losses"]))


def save_model(
    path: Path,
    model: nn.Module,
    config: Any,
    seed: int,
    labels: tuple[str, ...],
    example: tuple[Tensor, Tensor] | None,
) -> None:
    """The fine-tuned classifier: weights, label names (logit i is ``labels[i]``), config and the batch
    its unit-scaled conversion was pinned with (so ``load_finetuned`` rebuilds the same model)."""
    checkpoint.save_atomic(
        {
            "kind": "finetuned-classifier",
            "model": model.state_dict(),
            "labels": list(labels),
            "config": dataclasses.asdict(config),
            "seed": seed,
            "example": None if example is None else [t.cpu() for t in example],
        },
        path,
        keep_previous=False,
    )


def load_finetuned(path: str | Path) -> tuple[nn.Module, list[str]]:
    """(classifier in eval mode, label names) from a ``seed<k>.model.pt`` file, through the safe loader."""
    from unitscale.train.finetune import FinetuneConfig, build_model

    state = checkpoint.load(path)
    if state.get("kind") != "finetuned-classifier":
        raise checkpoint.CheckpointError(f"{path} is not a model saved by unitscale finetune")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in state["config"].items() if k in known} | {"device": "cpu"})
    example = tuple(state["example"]) if state["example"] is not None else None
    model, _ = build_model(config, state["seed"], example=example)
    model.load_state_dict(state["model"])
    return model.eval(), list(state["labels"])
