"""The configuration of a char-LM training run: ``TrainConfig``, its checks, and what a resume may change.

One place for every rule about options: names and ranges (``TrainConfig.validate``), model options that
``--set`` may not touch or must type-check (``check_model_options``), the device (``resolve_device``), and
the files that mark a run directory (``RUN_MARKERS``, used by ``rundir.claim``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from unitscale.train import distributed

OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
SCALINGS: tuple[str, ...] = ("unit", "standard")
# Fields a resumed run may change without leaving the original trajectory (steps extends the schedule).
# ``data`` may name another path to the same content: the data's fingerprint is compared instead.
RESUME_FREE: frozenset[str] = frozenset({
    "steps", "out_dir", "resume", "quiet", "eval_every", "checkpoint_every", "log_every", "stop_on_nonfinite",
    "parallel", "stop_at", "device", "monitor_every", "monitor_patience", "data", "allow_data_change",
    "overwrite", "tensorboard",
})
# Model options that other settings own: --set cannot change them.
RESERVED_MODEL_OPTIONS: dict[str, str] = {
    "scaling": "--scaling", "vocab_size": "the data's vocabulary", "seq_len": "--seq-len",
}
# Files that mark a directory as holding a run worth keeping (``rundir.claim``): a run killed before its
# first checkpoint has nothing to resume and may be started afresh. --overwrite removes all RUN_FILES.
RUN_MARKERS: tuple[str, ...] = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.corrupt",
                                "summary.json")
RUN_FILES: tuple[str, ...] = (*RUN_MARKERS, "metrics.jsonl", "config.json", "loss.png", "tensorboard")

@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint and in summary.json)."""

    model: str = "gpt"
    scaling: str = "unit"
    precision: str = "fp32"
    optimizer: str = "adamw"
    lr: float | None = None  # None: model.default_lr(optimizer) (unit and standard models differ)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 100
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    eval_every: int = 250
    eval_windows: int = 64
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    grad_clip: float | None = None
    device: str = "cpu"
    data: str = "wiki"
    vocab_min_count: int = 1  # characters rarer than this in train map to the unknown id
    out_dir: str = "runs/train"
    resume: bool = False
    overwrite: bool = False  # replace a run already in out_dir (without it, a fresh run there is refused)
    allow_data_change: bool = False  # resume even though the data file's content changed
    tensorboard: bool = True  # also log to out_dir/tensorboard when the tensorboard package is installed
    quiet: bool = False  # no progress bar
    stop_on_nonfinite: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    parallel: str = "none"  # "ddp" | "fsdp" under torchrun (see train.distributed)
    stop_at: int | None = None  # checkpoint and stop after this step; the schedule still spans ``steps``
    monitor_every: int = 200  # scale-health check every N steps (unitscale.monitor); 0 = off
    monitor_patience: int = 3  # warn after this many consecutive uncomfortable checks of one tensor

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; accepted: {', '.join(SCALINGS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "checkpoint_every",
                     "log_every", "vocab_min_count", "monitor_patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not isinstance(self.monitor_every, int) or self.monitor_every < 0:
            raise ValueError(f"monitor_every must be an integer >= 0 (0: off), got {self.monitor_every!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number (None: the model's default), got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None (off), got {self.grad_clip!r}")
        if self.stop_at is not None and (not isinstance(self.stop_at, int) or self.stop_at < 1):
            raise ValueError(f"stop_at must be a positive integer or None, got {self.stop_at!r}")
        if self.parallel not in distributed.PARALLEL:
            accepted = ", ".join(distributed.PARALLEL)
            raise ValueError(f"unknown parallel mode {self.parallel!r}; accepted: {accepted}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay!r}, "
                             f"{self.momentum!r}")
        check_model_options(self.model_overrides, RESERVED_MODEL_OPTIONS)


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present; otherwise the named torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; accepted here: cpu, auto")
    return device


def check_names(config: TrainConfig) -> None:
    """Model and recipe names, checked before any data is loaded (errors list the valid names)."""
    from unitscale.models import MODEL_NAMES
    from unitscale.precision import get_recipe

    if config.model not in MODEL_NAMES:
        raise ValueError(f"unknown model {config.model!r}; accepted: {', '.join(MODEL_NAMES)}")
    get_recipe(config.precision)


def check_model_options(options: dict[str, Any], reserved: dict[str, str]) -> None:
    """--set options: none of the ``reserved`` ones (key -> the option that sets it), and each value of its
    option's type (int, float, bool or str); a one-line error naming the value otherwise."""
    from unitscale.models import CharLMConfig

    for key, owner in reserved.items():
        if key in options:
            raise ValueError(f"--set {key}={options[key]!r}: {key} is set by {owner}, not --set; accepted: "
                             "any other model option")
    defaults = CharLMConfig()
    for key, value in options.items():
        if not hasattr(defaults, key):
            continue  # unknown names: models.build lists the accepted ones
        default = getattr(defaults, key)
        kind = type(default)
        ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool)) or kind is dict
        if not ok:
            raise ValueError(f"--set {key}={value!r}: expected {kind.__name__} (e.g. {key}={default!r})")


def config_from_dict(saved: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its saved dict (fields that this version does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})
