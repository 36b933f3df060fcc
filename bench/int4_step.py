"""INT4 training step vs fp32 step on the char-LM of docs/results/int4.md (CPU; ratios from one run).

    python bench/int4_step.py                         # bench/results/int4_step_cpu.json
    python bench/int4_step.py --dry --out /tmp/x.json # toy sizes, seconds (the CPU test runs this)

One step = forward, backward and AdamW on ``gpt`` (d_model 64, 2 layers, 2 heads, seq 64, batch 16: the
int4.md preset) under fp32, int4-naive and int4 (HQ + LSS), random tokens. The variants run round-robin,
one step each in rotating order, so machine noise hits them alike; medians of process CPU time with
``--threads`` torch threads (default 1) are reported, and each INT4 median as a multiple of fp32's.

Writes the JSON (device, torch, command, every timing) to --out (default bench/results/int4_step_cpu.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, table  # noqa: E402

RECIPES = ("fp32", "int4-naive", "int4")


def build(recipe: str, args: argparse.Namespace):
    from unitscale.models import build as build_model
    from unitscale.precision import apply

    torch.manual_seed(0)
    model = build_model(
        "gpt",
        args.vocab,
        scaling=args.scaling,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq,
    )
    if recipe != "fp32":
        apply(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=2**-6)
    return model, opt


def step(model, opt, batch: torch.Tensor) -> None:
    _, loss = model(batch[:, :-1], batch[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="toy sizes and few steps (seconds)")
    p.add_argument("--scaling", default="standard", choices=("standard", "unit"))
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "int4_step_cpu.json")
    args = p.parse_args(argv)
    args.vocab, args.d_model, args.layers, args.heads, args.seq, args.batch = 96, 64, 2, 2, 64, 16
    if args.dry:
        args.d_model, args.layers, args.seq, args.batch, args.steps, args.warmup = 32, 1, 16, 4, 2, 1
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    runs = {r: build(r, args) for r in RECIPES}
    for model, opt in runs.values():
        for i in range(args.warmup):
            step(model, opt, batches[i % len(batches)])
    times: dict[str, list[float]] = {r: [] for r in RECIPES}
    for i in range(args.steps):
        order = RECIPES[i % len(RECIPES) :] + RECIPES[: i % len(RECIPES)]
        for r in order:
            model, opt = runs[r]
            t0 = time.process_time()
            step(model, opt, batches[i % len(batches)])
            times[r].append(time.process_time() - t0)
    med = {r: statistics.median(t) * 1e3 for r, t in times.items()}
    rows = [[r, f"{med[r]:.2f}", f"{med[r] / med['fp32']:.2f}x"] for r in RECIPES]
    print(table(["recipe", "step ms (median)", "vs fp32"], rows))
    env = environment()
    env["device"] = f"CPU, {args.threads} torch thread(s)"
    payload = {
        "env": env,
        "clock": f"process CPU time, {args.threads} thread(s), round-robin",
        "config": {
            k: getattr(args, k)
            for k in ("scaling", "d_model", "layers", "heads", "seq", "batch", "steps", "warmup", "dry")
        },
        "median_ms": med,
        "ratio_vs_fp32": {r: med[r] / med["fp32"] for r in RECIPES},
        "times_ms": {r: [t * 1e3 for t in ts] for r, ts in times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import json

    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
