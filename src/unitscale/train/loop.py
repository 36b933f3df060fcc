"""The char-LM training loop: ``train(TrainConfig(...)) -> summary``.

Plain SGD / Adam / AdamW with linear warm-up and cosine decay, no gradient clipping unless asked (the
paper's point is that unit scaling needs no tricks). Deterministic for a fixed seed: parameters come from
``torch.manual_seed(seed)``, batches from the sampler's own generator, and a checkpoint carries every
piece of state (model, optimiser, schedule step, global RNG, sampler RNG, vocabulary, config, the data's
fingerprint), so a resumed run continues bit for bit. A non-finite loss or gradient stops the run before
the optimiser step, names the step and the first tensor that overflowed, and leaves the last good
checkpoint untouched. The run directory is locked for the run (``unitscale.train.rundir``); SIGINT and
SIGTERM stop the run at the next step boundary after a checkpoint (on every rank together under torchrun).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unitscale.monitor import ScaleMonitor
from unitscale.scale import scaled
from unitscale.train import checkpoint, distributed, rundir
from unitscale.train.config import (
    OPTIMIZERS,
    RESERVED_MODEL_OPTIONS,
    RESUME_FREE,
    RUN_FILES,
    RUN_MARKERS,
    SCALINGS,
    TrainConfig,
    check_model_options,
    check_names,
    config_from_dict,
    resolve_device,
)
from unitscale.train.data import BatchSampler, Vocab, eval_windows, fingerprint, load_corpus, resolve_source
from unitscale.train.diagnose import _finite, first_nonfinite
from unitscale.train.metrics import MetricsLog, TrainProgress, bpc, evaluate_bpc, plot_curves, read_jsonl
from unitscale.train.summary import backends_run, print_summary

# TrainConfig and its rules (train.config), the diagnosis (train.diagnose) and the report (train.summary)
# live in their own modules; their names stay importable from here.
__all__ = [
    "OPTIMIZERS", "RESERVED_MODEL_OPTIONS", "RESUME_FREE", "RUN_FILES", "RUN_MARKERS", "SCALINGS",
    "NonFiniteError", "TrainConfig", "backends_run", "build_model", "check_model_options", "check_names",
    "config_from_checkpoint", "config_from_dict", "first_nonfinite", "lr_factor", "make_optimizer",
    "print_summary", "resolve_device", "train",
]

FALLBACK_LR = 1e-3  # only for models without default_lr()
ModelFn = Callable[[TrainConfig, int], nn.Module]
StepHook = Callable[[int, nn.Module, float], None]


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient; the message names the step and tensor."""


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Multiplier of the base LR for 0-based ``step``: (step+1)/warmup during warm-up, then
    ½(1 + cos(π·p)) with p = (step − warmup)/(steps − warmup) ∈ [0, 1) (cosine decay towards 0)."""
    if step < warmup:
        return (step + 1) / warmup
    if steps <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def build_model(config: TrainConfig, vocab_size: int) -> nn.Module:
    """The registry model ``config.model`` with the run's scaling, sequence length and overrides."""
    from unitscale.models import build

    overrides = {"seq_len": config.seq_len, **config.model_overrides}
    return build(config.model, vocab_size, scaling=config.scaling, **overrides)


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW (β = 0.9, 0.999) over ``model.optim_groups`` when it has them."""
    if hasattr(model, "optim_groups"):
        groups = model.optim_groups(lr, config.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                   "weight_decay": config.weight_decay}]
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


class _Run:
    """One training run's live objects; ``train`` drives it."""

    def __init__(self, config: TrainConfig, model_fn: ModelFn | None) -> None:
        from unitscale.precision import apply, get_recipe

        config.validate()
        if model_fn is None:
            check_names(config)
        config = dataclasses.replace(config, data=resolve_source(config.data))
        self.recipe = get_recipe(config.precision)
        self.dist, self.device = distributed.setup(config.parallel, resolve_device(config.device))
        self.out = Path(config.out_dir)
        self.ckpt_path = self.out / checkpoint.CHECKPOINT_NAME
        # Rank 0 owns the directory: it locks it first, so nothing below can disturb another live run.
        self.lock = rundir.RunLock(self.out).acquire() if self.dist.is_main else None
        try:
            self._setup(config, model_fn, apply)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _setup(self, config: TrainConfig, model_fn: ModelFn | None, apply: Callable) -> None:
        if self.dist.is_main:
            rundir.claim(self.out, resume=config.resume, overwrite=config.overwrite, markers=RUN_MARKERS,
                         files=RUN_FILES)
            checkpoint.clean_temporaries(self.ckpt_path)
        self.state = self._load_state() if config.resume else None
        self.data = fingerprint(config.data)
        if self.state is not None:
            _check_resumable(config, self.state["config"])
            _check_data(self.state.get("data"), self.data, config.allow_data_change)
        vocab = Vocab.from_dict(self.state["vocab"]) if self.state else None
        self.corpus = load_corpus(config.data, min_count=config.vocab_min_count, vocab=vocab)
        self.config = config
        torch.manual_seed(config.seed)
        vocab_size = len(self.corpus.vocab)
        model = model_fn(config, vocab_size) if model_fn else build_model(config, vocab_size)
        self.module = apply(model.to(self.device), self.recipe)
        self.model = distributed.wrap(self.module, self.dist)
        self.lr = config.lr if config.lr is not None else (
            self.module.default_lr(config.optimizer) if hasattr(self.module, "default_lr") else FALLBACK_LR)
        self.optimizer = make_optimizer(self.module, config, self.lr)
        rows = config.batch_size * config.seq_len  # tokens per global batch
        self.grad_factor = distributed.grad_correction(self.module, self.dist, rows)
        self.sampler = BatchSampler(self.corpus.train, config.batch_size, config.seq_len, config.seed)
        self.valid = eval_windows(self.corpus.valid, config.eval_windows, config.seq_len)
        self.test = eval_windows(self.corpus.test, config.eval_windows, config.seq_len)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step, self.wall, self.ckpt_step = 0, 0.0, None
        if self.state is not None:
            distributed.load_state(self.model, self.optimizer, self.state["model"], self.state["optimizer"])
            self.sampler.load_state_dict(self.state["sampler"])
            torch.set_rng_state(self.state["rng"]["torch"])
            if self.device.type == "cuda" and self.state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(self.state["rng"]["cuda"], self.device)
            self.step = self.ckpt_step = int(self.state["step"])
            self.wall = float(self.state.get("wall_s", 0.0))
        dtype = self.recipe.compute_dtype
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            contextlib.nullcontext if dtype == torch.float32
            else functools.partial(torch.autocast, self.device.type, dtype=dtype))

    def _load_state(self) -> dict[str, Any]:
        """The newest readable checkpoint; a corrupt newest one is named, set aside, the previous used."""
        state, _, problem = checkpoint.load_latest(self.ckpt_path)
        if problem is not None and self.dist.is_main:
            print(f"unitscale train: warning: {problem}", file=sys.stderr)
            bad = checkpoint.set_aside(self.ckpt_path)
            if bad is not None:
                print(f"unitscale train: the unreadable file was renamed to {bad}", file=sys.stderr)
        return state

    # one step ---------------------------------------------------------------------------------------------
    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Loss (nats) after backward; gradients unscaled (÷S) when the recipe has a loss scale S."""
        x, y = distributed.shard(x, self.dist), distributed.shard(y, self.dist)
        with self.autocast():
            _, loss = self.model(x, y)
        s = self.recipe.loss_scale
        (scaled(loss, 1.0, s) if s else loss).backward()
        # One multiply for both: undo the loss scale, and restore the global unit-scaled gradient after
        # the data-parallel average (train.distributed.grad_correction).
        factor = self.grad_factor / s if s else self.grad_factor
        if factor != 1.0:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, factor)
        return loss.detach().float()

    def grad_norm(self) -> tuple[float, bool]:
        """(global L2 norm of the gradients, all finite?); clips to ``grad_clip`` when set."""
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = distributed.all_true(all(_finite(_local(g)) for g in grads), self.dist)
        if self.config.grad_clip is not None and finite:
            return _item(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)), finite
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return _item(norm), finite

    def save(self) -> None:
        cfg = asdict(self.config)
        model_state, optim_state = distributed.state(self.model, self.optimizer)  # collective under FSDP
        self.ckpt_step = self.step
        if not self.dist.is_main:
            return
        checkpoint.save_atomic({
            "step": self.step, "config": cfg, "model": model_state, "optimizer": optim_state,
            "scheduler": {"kind": "warmup_cosine", "warmup": self.config.warmup, "steps": self.config.steps,
                          "step": self.step},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "sampler": self.sampler.state_dict(), "vocab": self.corpus.vocab.to_dict(), "wall_s": self.wall,
            "data": self.data,
        }, self.ckpt_path)
        self.ckpt_step = self.step

    def evaluate(self, windows: Tensor) -> float:
        return evaluate_bpc(self.model, windows, self.config.batch_size, device=self.device,
                            autocast=self.autocast)


class _NullLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _item(t: Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _check_data(saved: dict[str, Any] | None, now: dict[str, Any], allow: bool) -> None:
    """A resumed run trains on the data its checkpoint was trained on, unless ``allow``."""
    if saved is None or allow or (saved.get("size"), saved.get("sha256")) == (now["size"], now["sha256"]):
        return
    was = f"{saved.get('source')} ({saved.get('size')} bytes, sha256 {str(saved.get('sha256'))[:16]}…)"
    raise ValueError(f"--resume: the data changed since the checkpoint: {now['source']} now has "
                     f"{now['size']} bytes, sha256 {now['sha256'][:16]}…, but the run was trained on {was}; "
                     "pass --allow-data-change to continue on the new data")


def _check_resumable(config: TrainConfig, saved: dict[str, Any]) -> None:
    now = asdict(config)
    changed = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume with a different configuration ({diff}); only "
                         f"{', '.join(sorted(RESUME_FREE))} may change")


def config_from_checkpoint(out_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in ``out_dir``'s newest readable checkpoint (to resume with nothing else)."""
    return config_from_dict(checkpoint.load_latest(Path(out_dir) / checkpoint.CHECKPOINT_NAME)[0]["config"])


def train(config: TrainConfig, *, model_fn: ModelFn | None = None, on_step: StepHook | None = None
          ) -> dict[str, Any]:
    """Train (or resume with ``config.resume``) and return the summary also written to summary.json.

    ``out_dir`` receives metrics.jsonl (and TensorBoard events in ``tensorboard/`` when that package is
    installed), checkpoint.pt (atomic, every ``checkpoint_every`` steps and at the end; the one before it
    is kept as checkpoint.prev.pt), loss.png and summary.json. ``model_fn(config, vocab_size)`` replaces
    the model registry (tests); ``on_step(step, model, loss)`` is called after every optimiser step. A
    non-finite step raises NonFiniteError (or ends the run with status "diverged" when
    ``stop_on_nonfinite`` is False); SIGINT/SIGTERM save a checkpoint and raise ``rundir.Interrupted``.
    """
    config.validate()
    _warn_schedule(config)
    r = _Run(config, model_fn)
    try:
        return _train(r, on_step)
    finally:
        r.close()


def _warn_schedule(config: TrainConfig) -> None:
    if config.warmup > config.steps:
        warnings.warn(f"--warmup {config.warmup} is longer than --steps {config.steps}: the learning rate "
                      f"only reaches {config.steps / config.warmup:.2g} of its peak", stacklevel=3)


def _train(r: _Run, on_step: StepHook | None) -> dict[str, Any]:
    cfg = r.config
    main = r.dist.is_main  # only rank 0 writes files and shows progress; every rank computes
    resumed = r.state is not None
    log = (MetricsLog(r.out / "metrics.jsonl", keep_until_step=r.step if resumed else None,
                      tensorboard_dir=r.out / "tensorboard" if cfg.tensorboard else None) if main
           else _NullLog())
    tokens = cfg.batch_size * cfg.seq_len
    status, error, loss_v, valid_bpc, tps = "finished", None, math.nan, math.nan, math.nan
    desc = f"{cfg.model}/{cfg.scaling}/{cfg.precision}"
    signals = rundir.StopSignals()
    try:
        if not resumed:
            valid_bpc = r.evaluate(r.valid)
            log.write({"event": "eval", "step": 0, "valid_bpc": valid_bpc})
            if main:
                with open(r.out / "config.json", "w") as f:
                    json.dump(asdict(cfg), f, indent=1)
        with signals, TrainProgress(cfg.steps, desc, enabled=main and not cfg.quiet, start=r.step) as bar:
            monitor = ScaleMonitor(r.module, cfg.monitor_every if main else 0, cfg.monitor_patience, log=log,
                                   bar=bar)
            while r.step < cfg.steps:
                t0 = time.perf_counter()
                factor = lr_factor(r.step, cfg.warmup, cfg.steps)
                for g in r.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                x, y = (t.to(r.device) for t in r.sampler.next())
                with monitor.step(r.step + 1):  # observes casts on checked steps only
                    loss = r.forward_backward(x, y)
                loss_v = distributed.mean(float(loss), r.dist)
                norm, finite = r.grad_norm()
                if not (finite and math.isfinite(loss_v)):
                    status = "diverged"
                    where = first_nonfinite(r.model, lambda x=x, y=y: r.forward_backward(x, y))
                    kept = (f"last good checkpoint: {r.ckpt_path} (step {r.ckpt_step})" if r.ckpt_step
                            else "no checkpoint had been written yet")
                    error = (f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient'} at step "
                             f"{r.step + 1} (loss {loss_v}, grad norm {norm}); first non-finite tensor: "
                             f"{where}; {kept}")
                    log.write({"event": "nonfinite", "step": r.step + 1, "loss": loss_v, "message": error})
                    break
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
                r.step += 1
                dt = time.perf_counter() - t0
                r.wall += dt
                tps = tokens / dt if math.isnan(tps) else 0.9 * tps + 0.1 * tokens / dt
                if r.step % cfg.log_every == 0 or r.step == cfg.steps:
                    log.write({"event": "train", "step": r.step, "loss": loss_v, "lr": r.lr * factor,
                               "grad_norm": norm, "tokens_per_s": tps, "wall_s": r.wall})
                if r.step % cfg.eval_every == 0 or r.step == cfg.steps:
                    valid_bpc = r.evaluate(r.valid)
                    log.write({"event": "eval", "step": r.step, "valid_bpc": valid_bpc})
                    bar.update(r.step, valid_bpc=valid_bpc)
                if r.step % cfg.checkpoint_every == 0 or r.step == cfg.steps:
                    r.save()
                bar.update(r.step, tokens_per_s=tps, loss=loss_v)
                if on_step is not None:
                    on_step(r.step, r.model, loss_v)
                # Every rank learns of a signal any rank received, so all stop after the same step.
                signalled = not distributed.all_true(signals.signum is None, r.dist)
                stop_here = cfg.stop_at is not None and r.step >= cfg.stop_at
                if (signalled or stop_here) and r.step < cfg.steps:
                    if r.ckpt_step != r.step:
                        r.save()
                    status = "interrupted" if signalled else "stopped"
                    break
    finally:
        log.close()
    return _finish(r, status, error, loss_v, valid_bpc, tps, desc, signals)


def _finish(r: _Run, status: str, error: str | None, loss_v: float, valid_bpc: float, tps: float, desc: str,
            signals: rundir.StopSignals) -> dict[str, Any]:
    cfg, main = r.config, r.dist.is_main
    finished = status == "finished"
    if finished and math.isnan(valid_bpc):  # a resume of a run that had already finished
        valid_bpc = r.evaluate(r.valid)
    test_bpc = r.evaluate(r.test) if finished else None  # collective under FSDP: every rank evaluates
    distributed.teardown(r.dist)
    summary = {
        "status": status, "step": r.step, "steps": cfg.steps, "final_loss": loss_v if finished else None,
        "final_train_bpc": bpc(loss_v) if finished else None,
        "valid_bpc": valid_bpc if finished else None,
        "test_bpc": test_bpc,
        "lr": r.lr, "tokens_per_s": tps, "wall_s": r.wall,
        "params": sum(p.numel() for p in r.params), "vocab_size": len(r.corpus.vocab),
        "data": r.corpus.describe(), "data_fingerprint": r.data, "device": str(r.device),
        "recipe": r.recipe.describe(), "backends": backends_run(r.module, r.recipe),
        "error": error, "config": asdict(cfg),
    }
    summary["parallel"] = {"mode": r.dist.parallel, "world_size": r.dist.world_size}
    if main:
        with open(r.out / "summary.json", "w") as f:
            json.dump({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in summary.items()}, f, indent=1)
        plot_curves([(desc, read_jsonl(r.out / "metrics.jsonl"))], r.out / "loss.png", title=desc)
    if status == "interrupted":
        # Under torchrun a rank may stop for a signal another rank received (the stop is collective).
        by = signals.name or "a signal to another rank"
        raise rundir.Interrupted(f"stopped by {by} after step {r.step}; checkpoint saved to {r.ckpt_path}; "
                                 "continue with --resume", signals.signum or signal.SIGTERM)
    if main and error is not None and cfg.stop_on_nonfinite:
        raise NonFiniteError(error)
    return summary

