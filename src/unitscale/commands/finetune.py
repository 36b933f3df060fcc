"""``unitscale finetune``: MiniLM-L6 on Wikipedia topic classification, mean ± std over seeds."""

from __future__ import annotations

import argparse

NAME = "finetune"
HELP = "fine-tune MiniLM-L6 on Wikipedia topics (11 classes) in a precision recipe, standard or unit-scaled"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unitscale.train.finetune import FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument(
        "--precision", default=d.precision, help="recipe name, e.g. fp32, fp16, fp8 (default fp32)"
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
    parser.add_argument("--device", default=d.device, help="torch device (default cpu)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each seed after this many steps")
    parser.add_argument("--out", default="runs/ft", help="output folder (default runs/ft)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    )
    summary = run_finetune(
        config, args.seeds, args.out, show_progress=not args.no_progress, max_steps=args.max_steps
    )
    from unitscale.train.finetune import markdown_table

    print(markdown_table([summary]), end="")  # plain print: a markdown table must not be wrapped
    out = args.out
    print(f"wrote {out}/{config.run_name}/summary.json, summary.md, {out}/results.md and {out}/results.png")
    return 1 if summary["diverged"] else 0
