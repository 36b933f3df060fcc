"""Forward + backward of one linear layer, torch.compile'd, BF16 vs torchao.float8 vs unitscale's FP8.

    python bench/linear.py                     # the five issue-7 shapes, every variant (torchao required)
    python bench/linear.py --shapes 8192x8192x8192 --variants bf16 ours --rounds 20

For each M×K → N: y = x Wᵀ (no bias, BF16 input/weight/output), then ∂x and ∂W from a fixed ∂y. Variants:
BF16 nn.Linear; torchao.float8 tensorwise and rowwise (asking for them without torchao is an error); ours =
``Fp8Backend(dispatch=Dispatch.always())`` (always FP8); ours+rule = the default dispatch rule (BF16 where
it says so). Every variant of a shape is built and compiled first, its FP8 GEMMs per step counted (one
eager step: ours must run 3), then timed round-robin (bench/_common.time_round_robin). Ratios are
variant speed over BF16 and over torchao tensorwise (> 1: faster), all from this one run. Writes
bench/results/linear.json (or --out, a name or a path).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    count_fp8_gemms,
    environment,
    require_cuda,
    require_module,
    speedups,
    table,
    time_round_robin,
    write_json,
)

SHAPES = (
    (16384, 4096, 4096),
    (16384, 4096, 14336),
    (8192, 8192, 8192),
    (4096, 2048, 2048),
    (2048, 1024, 1024),
)
VARIANTS = ("bf16", "torchao-tensorwise", "torchao-rowwise", "ours", "ours+rule")
BASELINES = ("bf16", "torchao-tensorwise")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not MxKxN (e.g. 8192x8192x8192)") from None
    return m, k, n


def build(variant: str, k: int, n: int, device: str) -> nn.Module:
    """The module for ``variant`` (bf16 weights on ``device``)."""
    base = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    if variant == "bf16":
        return base
    if variant.startswith("torchao"):
        float8 = require_module("torchao.float8", f"variant {variant}")
        config = float8.Float8LinearConfig.from_recipe_name(variant.split("-")[1])
        return float8.convert_to_float8_training(nn.Sequential(base), config=config)
    from unitscale.precision import QuantisedLinear
    from unitscale.precision.fp8 import Dispatch, Fp8Backend

    module = copy.deepcopy(base)
    module.__class__ = QuantisedLinear
    module.precision = Fp8Backend(dispatch=Dispatch.always() if variant == "ours" else Dispatch())
    return module


def expected_fp8_gemms(variant: str, m: int, k: int, n: int) -> int | None:
    """FP8 GEMMs one fwd+bwd must run: 3 for ours, 3 or 0 for ours+rule; None where not checked."""
    from unitscale.precision.fp8 import Dispatch

    if variant == "ours":
        return 3
    if variant == "ours+rule":
        return 3 if Dispatch().use_fp8(m, k, n) else 0
    return 3 if variant.startswith("torchao") else 0


def bench_shape(m: int, k: int, n: int, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale specialisations
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device=dev, generator=torch.Generator(dev).manual_seed(1)) * k**-0.5
    out: dict = {"shape": [m, k, n], "variants": {}}
    steps, outputs = {}, {}
    for variant in args.variants:
        module = build(variant, k, n, dev)
        with torch.no_grad():  # the same weights for every variant
            next(module.parameters()).copy_(w)

        def eager(module=module):
            module(x).backward(dy)

        got = count_fp8_gemms(eager)
        want = expected_fp8_gemms(variant, m, k, n)
        if want is not None and got != want:
            raise SystemExit(f"{variant} at {m}x{k}x{n}: {got} FP8 GEMMs per fwd+bwd, expected {want}")
        run = torch.compile(module) if args.compile else module

        def step(run=run, module=module):
            x.grad = None
            for p in module.parameters():
                p.grad = None
            run(x).backward(dy)

        steps[variant] = step
        out["variants"][variant] = {"fp8_gemms_per_step": got}
        outputs[variant] = run
    stats = time_round_robin(steps, rounds=args.rounds, steps=args.steps, warmup=args.warmup, device=dev)
    speedups(stats, BASELINES)
    ref = None
    for variant, run in outputs.items():
        with torch.no_grad():
            y = run(x).float()
        ref = y if ref is None else ref
        rel = float((y - ref).norm() / ref.norm())
        st = stats[variant]
        st.update(tflops=6 * m * k * n / (st["median_ms"] * 1e-3) / 1e12, rel_err_vs_first=rel)
        out["variants"][variant].update(st)
    from unitscale.precision.fp8 import Dispatch

    out["rule_says_fp8"] = Dispatch().use_fp8(m, k, n)
    return out


def cell(s: dict) -> str:
    text = f"{s['median_ms']:.3f} ms"
    ratios = [f"{s[f'speedup_vs_{b}']:.2f}× {b.split('-')[0]}" for b in BASELINES if f"speedup_vs_{b}" in s]
    return text + (f" ({', '.join(ratios)})" if ratios else "")


def render(results: list[dict], variants: list[str]) -> str:
    """The table: per shape and variant, median ms and speed-up over BF16 and torchao tensorwise."""
    rows = []
    for r in results:
        row = ["{}×{}→{}".format(*r["shape"])]
        row += [cell(r["variants"][v]) for v in variants]
        row.append("fp8" if r["rule_says_fp8"] else "bf16")
        rows.append(row)
    return table(["M×K→N", *variants, "rule"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES), metavar="MxKxN")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=5, help="calls of each variant before timing")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin samples per variant")
    parser.add_argument("--steps", type=int, default=5, help="fwd+bwd calls between one pair of events")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only for the dry run")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default="linear", help="name under bench/results/ or a .json path")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        require_cuda("bench/linear.py")
    env = environment()
    print(
        f"{env.get('device', args.device)}  torch {env['torch']}  torchao {env['torchao']}  "
        f"triton {env['triton']}",
        flush=True,
    )
    results = []
    for m, k, n in args.shapes:
        results.append(bench_shape(m, k, n, args))
        print(render(results[-1:], args.variants), flush=True)
    print(render(results, args.variants))
    print(
        "(×: variant speed / baseline speed, this run, round-robin; JSON: TFLOP/s, samples, rel. error of y)"
    )
    payload = {
        "benchmark": "linear fwd+bwd, torch.compile, bf16 in/out",
        "environment": env,
        "config": {k: v for k, v in vars(args).items() if k != "shapes"},
        "results": results,
    }
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
