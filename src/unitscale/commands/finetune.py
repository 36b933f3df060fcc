"""``unitscale finetune``: MiniLM-L6 on Wikipedia topic classification, mean ± std over seeds; each seed's
fine-tuned model is saved (``seed<k>.model.pt``), and an interrupted run continues with ``--resume``."""

from __future__ import annotations

import argparse

NAME = "finetune"
HELP = "fine-tune MiniLM-L6 on Wikipedia topics (11 classes) in a precision recipe, standard or unit-scaled"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unitscale.precision import RECIPE_NAMES
    from unitscale.train.finetune import FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument(
        "--precision", default=d.precision, help=f"recipe, one of {', '.join(RECIPE_NAMES)} (default fp32)"
    )
    parser.add_argument("--scaling", default=d.scaling, choices=("standard", "unit"))
    parser.add_argument(
        "--model",
        default=d.model,
        choices=("minilm", "hf-bert"),
        help="minilm: our BERT encoder + mean pooling (default); hf-bert: Hugging Face "
        "BertForSequenceClassification from the same weights (needs transformers)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    parser.add_argument(
        "--epochs", type=float, default=d.epochs, help=f"passes over the training set ({d.epochs})"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate ({d.lr:g})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup", type=float, default=d.warmup, help="warm-up fraction of the steps")
    parser.add_argument("--max-len", type=int, default=d.max_len, help=f"tokens per article ({d.max_len})")
    parser.add_argument(
        "--train-subset",
        type=int,
        default=d.train_subset,
        help=f"train on a fixed random N articles; 0 = all (default {d.train_subset})",
    )
    parser.add_argument("--pooling", default=d.pooling, choices=("mean", "cls"))
    parser.add_argument("--device", default=d.device, help="cpu | cuda | auto (default cpu)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each seed after this many steps (default: all epochs)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help=f"steps between resumable checkpoints (default {d.checkpoint_every})")
    parser.add_argument("--out", default="runs/ft", help="output folder (default runs/ft)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUT/RUN with the same options: finished seeds are kept, "
                             "interrupted ones continue from their checkpoint (default off)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in OUT/RUN (default off: such a run is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")


def run(args: argparse.Namespace) -> int:
    from unitscale.train.finetune import FinetuneConfig
    from unitscale.train.finetune import run as run_finetune

    config = FinetuneConfig(
        precision=args.precision,
        scaling=args.scaling,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        max_len=args.max_len,
        train_subset=args.train_subset or None,
        pooling=args.pooling,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
    )
    summary = run_finetune(
        config, args.seeds, args.out, show_progress=not args.no_progress, max_steps=args.max_steps,
        resume=args.resume, overwrite=args.overwrite,
    )
    from unitscale.train.finetune import markdown_table

    print(markdown_table([summary]), end="")  # plain print: a markdown table must not be wrapped
    out = args.out
    print(f"wrote {out}/{config.run_name}/summary.json, summary.md, seed<k>.model.pt, {out}/results.md and "
          f"{out}/results.png")
    return 1 if summary["diverged"] else 0
