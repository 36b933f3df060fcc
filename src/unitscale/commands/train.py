"""`unitscale train`: train a char-LM (any model, scaling and precision recipe), resumable."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

NAME = "train"
HELP = "train a char-LM on Wikipedia or a text file: metrics JSONL, checkpoints, loss plot, summary"

# CLI flag -> TrainConfig field, for the options that map one to one (defaults None: "not given").
_FIELDS = ("model", "scaling", "precision", "optimizer", "lr", "momentum", "weight_decay", "warmup", "steps",
           "batch_size", "seq_len", "eval_every", "eval_windows", "checkpoint_every", "log_every", "seed",
           "grad_clip", "device", "data", "vocab_min_count", "parallel", "stop_at", "monitor_every",
           "monitor_patience", "overwrite", "allow_data_change", "tensorboard")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unitscale.models import MODEL_NAMES
    from unitscale.precision import RECIPE_NAMES
    from unitscale.train.loop import OPTIMIZERS, SCALINGS, TrainConfig

    d = TrainConfig()
    p.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="read options from a TOML file whose keys are these options' names (steps = 300, "
                        "batch-size = 8, [set] d_model = 64); flags given here override it (default: none)")
    p.add_argument("--model", help=f"one of {', '.join(MODEL_NAMES)} (default {d.model})")
    p.add_argument("--scaling", help=f"{' | '.join(SCALINGS)} (default {d.scaling})")
    p.add_argument("--precision", help=f"recipe, one of {', '.join(RECIPE_NAMES)} (default {d.precision})")
    p.add_argument("--optimizer", help=f"{' | '.join(OPTIMIZERS)} (default {d.optimizer})")
    p.add_argument("--lr", type=float, help="base LR (default: the model's own default for the optimiser)")
    for name, typ in (("momentum", float), ("weight_decay", float), ("warmup", int), ("steps", int),
                      ("batch_size", int), ("seq_len", int), ("eval_every", int), ("eval_windows", int),
                      ("checkpoint_every", int), ("log_every", int), ("seed", int), ("vocab_min_count", int),
                      ("monitor_every", int), ("monitor_patience", int)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ,
                       help=f"default {getattr(d, name)}")
    p.add_argument("--grad-clip", dest="grad_clip", type=float, help="clip the grad norm (default off)")
    p.add_argument("--device", help=f"cpu | cuda | auto (default {d.device})")
    p.add_argument("--data", help="'wiki' or a path to a plain UTF-8 text file (default wiki)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. --set d_model=256 --set n_layers=8 (repeatable; default: none)")
    p.add_argument("--out", help=f"output directory (default {d.out_dir})")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from OUT/checkpoint.pt with its saved config (--steps may extend it; "
                        "default off)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in OUT (default off: such a run is refused)")
    p.add_argument("--allow-data-change", dest="allow_data_change", action="store_true", default=None,
                   help="with --resume, continue even though the data file's content changed (default off)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="no TensorBoard events in OUT/tensorboard (default: written when tensorboard is "
                        "installed)")
    p.add_argument("--quiet", action="store_true", default=None,
                   help="no progress bar and no summary table (default off)")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"],
                   help="data parallelism under torchrun (default none): "
                        "torchrun --nproc-per-node N unitscale train --parallel ddp|fsdp ...")
    p.add_argument("--stop-at", dest="stop_at", type=int, metavar="STEP",
                   help="checkpoint and stop after this step; the schedule still spans --steps (default off)")


def _parse_value(text: str) -> object:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_overrides(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. d_model=256")
        out[key.strip()] = _parse_value(value.strip())
    return out


def config_from_args(args: argparse.Namespace):  # -> TrainConfig
    from unitscale.train.loop import TrainConfig, config_from_checkpoint

    if args.config is not None:
        from unitscale.commands._config_file import merge_config_file

        parser = argparse.ArgumentParser()
        add_arguments(parser)
        merge_config_file(parser, args, args.config, exclude={"config"})
    out = args.out or TrainConfig().out_dir
    resume = bool(args.resume)
    cfg = config_from_checkpoint(out) if resume else TrainConfig()
    # How a run is launched and where it stops belong to this launch, not to the saved run.
    cfg = dataclasses.replace(cfg, parallel="none", stop_at=None, overwrite=False, allow_data_change=False,
                              tensorboard=True)
    given = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    overrides = parse_overrides(args.overrides)
    if overrides:
        given["model_overrides"] = {**cfg.model_overrides, **overrides}
    return dataclasses.replace(cfg, **given, out_dir=out, resume=resume, quiet=bool(args.quiet))


def run(args: argparse.Namespace) -> int:
    from unitscale.train.loop import NonFiniteError, print_summary, train

    cfg = config_from_args(args)
    try:
        summary = train(cfg)
    except NonFiniteError as err:
        print(f"unitscale train: stopped: {err}", file=sys.stderr)
        return 1
    if cfg.quiet:
        print(f"{summary['status']}: step {summary['step']}, valid BPC {summary['valid_bpc']}, "
              f"test BPC {summary['test_bpc']} ({cfg.out_dir}/summary.json)")
    else:
        print_summary(summary, Path(cfg.out_dir))
    return 0
