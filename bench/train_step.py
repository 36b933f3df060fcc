"""Training throughput of a GPT (≥ 350M parameters): BF16, unit-scaled BF16, unit-scaled FP8, torchao.float8.

    python bench/train_step.py                               # all variants, d=2048, 8 layers, seq 1024
    python bench/train_step.py --d-model 4096 --layers 2     # GEMM shapes where the default rule picks FP8
    python bench/train_step.py --fit --variants fp8-unit     # also search the largest batch that fits

One step = forward, backward and a fused AdamW update, fp32 master weights, bf16 autocast, torch.compile,
random tokens (throughput does not depend on the data). Variants: bf16-standard (plain PyTorch twin),
bf16-unit (unit-scaled), fp8-unit (ours, ``precision.apply(model, Recipe.fp8(backend="fp8"))``: the
default dispatch rule decides per linear), fp8-unit-always (ours, every aligned linear in FP8) and
torchao-tensorwise (the standard model with ``convert_to_float8_training``; "not installed" without
torchao). Reports tokens/s (median step), peak GPU memory and, with --fit, the largest batch that fits
(doubling then bisection, each probe in a fresh process so one OOM cannot poison the next). Writes
bench/results/train_step.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, optional_module, require_cuda, table, time_cuda, write_json  # noqa: E402

DEVICE = "cuda"
VARIANTS = ("bf16-standard", "bf16-unit", "fp8-unit", "fp8-unit-always", "torchao-tensorwise")
OOM_EXIT = 3


def build_model(variant: str, args: argparse.Namespace) -> tuple[torch.nn.Module | None, str]:
    """The model for ``variant`` on DEVICE, or (None, why it cannot run)."""
    from unitscale.models import build

    scaling = "standard" if variant in ("bf16-standard", "torchao-tensorwise") else "unit"
    model = build("gpt", args.vocab, scaling=scaling, d_model=args.d_model, n_layers=args.layers,
                  n_heads=args.heads, seq_len=args.seq).to(DEVICE)
    if variant.startswith("fp8"):
        from unitscale.precision import Recipe, apply
        from unitscale.precision.fp8 import Dispatch, Fp8Backend

        apply(model, Recipe.fp8(backend="fp8"))
        if variant == "fp8-unit-always":
            always = Fp8Backend(dispatch=Dispatch.always())
            for module in model.modules():
                if isinstance(getattr(module, "precision", None), Fp8Backend):
                    module.precision = always
    elif variant == "torchao-tensorwise":
        float8, why = optional_module("torchao.float8")
        if float8 is None:
            return None, why
        config = float8.Float8LinearConfig.from_recipe_name("tensorwise")

        def aligned(module: torch.nn.Module, fqn: str) -> bool:
            return not isinstance(module, torch.nn.Linear) or (
                module.in_features % 16 == 0 and module.out_features % 16 == 0)

        float8.convert_to_float8_training(model, config=config, module_filter_fn=aligned)
    return model, ""


def make_step(model: torch.nn.Module, batch: int, args: argparse.Namespace):
    """A closure running one compiled training step on fixed random tokens."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    idx = torch.randint(0, args.vocab, (batch, args.seq + 1), device=DEVICE, generator=gen)
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            _, loss = forward(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(variant: str, batch: int, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    model, why = build_model(variant, args)
    if model is None:
        return {"status": why}
    params = sum(p.numel() for p in model.parameters())
    step = make_step(model, batch, args)
    torch.cuda.reset_peak_memory_stats()
    try:
        stats = time_cuda(step, warmup=args.warmup, iters=args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        return {"status": f"OOM at batch {batch}", "params": params}
    finally:
        del step, model
        gc.collect()
        torch.cuda.empty_cache()
    tokens = batch * args.seq
    stats.update(status="ok", params=params, batch=batch, tokens_per_step=tokens,
                 tokens_per_s=tokens / (stats["median_ms"] * 1e-3), peak_memory_gib=peak)
    return stats


def probe(variant: str, batch: int, args: argparse.Namespace) -> bool:
    """Does ``batch`` fit? Two compiled steps in a fresh process (clean allocator and compile caches)."""
    cmd = [sys.executable, __file__, "--probe", variant, str(batch), "--d-model", str(args.d_model),
           "--layers", str(args.layers), "--heads", str(args.heads), "--seq", str(args.seq),
           "--vocab", str(args.vocab), *([] if args.compile else ["--no-compile"])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode not in (0, OOM_EXIT):
        raise RuntimeError(f"probe {variant} batch {batch} failed:\n{result.stderr[-2000:]}")
    return result.returncode == 0


def largest_batch(variant: str, start: int, args: argparse.Namespace) -> int:
    """Largest batch that fits: doubling from ``start``, then bisection to 1/8 of the last fitting size."""
    ok, bad = 0, None
    b = start
    while b <= args.max_batch:
        if not probe(variant, b, args):
            bad = b
            break
        ok, b = b, 2 * b
    if bad is None:
        return ok
    while bad - ok > max(1, ok // 8):
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if probe(variant, mid, args) else (ok, mid)
    return ok


def run_probe(variant: str, batch: int, args: argparse.Namespace) -> int:
    model, why = build_model(variant, args)
    if model is None:
        print(why, file=sys.stderr)
        return 1
    step = make_step(model, batch, args)
    try:
        step()
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return OOM_EXIT
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16, help="batch for the timing (sequences per step)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--fit", action="store_true", help="also search the largest batch that fits")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default="train_step")
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_cuda("bench/train_step.py")
    if args.probe:
        return run_probe(args.probe[0], int(args.probe[1]), args)
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  torchao {env['torchao']}  triton {env['triton']}")
    results = {}
    for variant in args.variants:
        results[variant] = measure(variant, args.batch, args)
        if args.fit and (results[variant]["status"] == "ok" or "OOM" in results[variant]["status"]):
            results[variant]["largest_batch"] = largest_batch(variant, max(1, args.batch // 4), args)
        print(f"  {variant}: {results[variant]}", flush=True)
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    if params < 350e6:
        print(f"note: the model has {params / 1e6:.0f}M parameters (< 350M asked by issue 7)")
    base = results.get("bf16-standard", {}).get("tokens_per_s")
    rows = []
    for variant, r in results.items():
        if r["status"] != "ok":
            rows.append([variant, r["status"], "", "", "", r.get("largest_batch", "")])
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else ""
        rows.append([variant, f"{r['tokens_per_s']:,.0f}", ratio, f"{r['median_ms']:.1f}",
                     f"{r['peak_memory_gib']:.1f}", r.get("largest_batch", "")])
    print(f"GPT {params / 1e6:.0f}M params, d={args.d_model}, {args.layers} layers, seq {args.seq}, "
          f"batch {args.batch}")
    print(table(["variant", "tokens/s", "vs bf16", "step ms", "peak GiB", "max batch"], rows))
    payload = {"benchmark": "GPT training step (fwd+bwd+AdamW), bf16 autocast", "environment": env,
               "config": {k: v for k, v in vars(args).items() if k != "probe"}, "params": params,
               "results": results}
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
