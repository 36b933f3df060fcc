"""Forward + backward of one linear layer, torch.compile'd, BF16 vs torchao.float8 vs unitscale's FP8.

    python bench/linear.py                     # the five issue-7 shapes, every variant, ~5-10 min on an H100
    python bench/linear.py --shapes 8192x8192x8192 --variants bf16 ours --iters 100

For each M×K → N: y = x Wᵀ (no bias, BF16 input/weight/output), then ∂x and ∂W from a fixed ∂y. Variants:
BF16 nn.Linear; torchao.float8 tensorwise and rowwise (rows say "not installed" without torchao); ours =
``Fp8Backend(dispatch=Dispatch.always())`` (always FP8); ours+rule = the default dispatch rule (BF16 where
it says so). Ratios are BF16 time / variant time (> 1: faster than BF16), all from this one run. Writes
bench/results/linear.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, optional_module, require_cuda, table, time_cuda, write_json  # noqa: E402

SHAPES = ((16384, 4096, 4096), (16384, 4096, 14336), (8192, 8192, 8192), (4096, 2048, 2048),
          (2048, 1024, 1024))
DEVICE = "cuda"
VARIANTS = ("bf16", "torchao-tensorwise", "torchao-rowwise", "ours", "ours+rule")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not MxKxN (e.g. 8192x8192x8192)") from None
    return m, k, n


def build(variant: str, k: int, n: int) -> tuple[nn.Module | None, str]:
    """The module for ``variant`` (bf16 weights on CUDA) or (None, why it cannot run)."""
    base = nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
    if variant == "bf16":
        return base, ""
    if variant.startswith("torchao"):
        float8, why = optional_module("torchao.float8")
        if float8 is None:
            return None, why
        config = float8.Float8LinearConfig.from_recipe_name(variant.split("-")[1])
        return float8.convert_to_float8_training(nn.Sequential(base), config=config), ""
    from unitscale.precision import QuantisedLinear
    from unitscale.precision.fp8 import Dispatch, Fp8Backend

    module = copy.deepcopy(base)
    module.__class__ = QuantisedLinear
    module.precision = Fp8Backend(dispatch=Dispatch.always() if variant == "ours" else Dispatch())
    return module, ""


def bench_shape(m: int, k: int, n: int, variants: list[str], warmup: int, iters: int) -> dict:
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no stale specialisations
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    out: dict = {"shape": [m, k, n], "variants": {}}
    reference = None
    for variant in variants:
        module, why = build(variant, k, n)
        if module is None:
            out["variants"][variant] = {"status": why}
            continue
        with torch.no_grad():  # the same weights for every variant
            weight = next(module.parameters())
            w_gen = torch.Generator(DEVICE).manual_seed(1)
            weight.copy_(torch.randn(n, k, device=DEVICE, generator=w_gen) * k ** -0.5)
        compiled = torch.compile(module)

        def step(compiled=compiled, module=module):
            x.grad = None
            for p in module.parameters():
                p.grad = None
            compiled(x).backward(dy)

        try:
            stats = time_cuda(step, warmup=warmup, iters=iters)
        except Exception as err:  # one failing variant must not lose the others' numbers
            out["variants"][variant] = {"status": f"failed: {type(err).__name__}: {err}"[:300]}
            continue
        y = compiled(x).detach().float()
        if reference is None:
            reference = y
        rel = float((y - reference).norm() / reference.norm())
        tflops = 6 * m * k * n / (stats["median_ms"] * 1e-3) / 1e12
        stats.update(status="ok", tflops=tflops, rel_err_vs_first=rel)
        out["variants"][variant] = stats
        del module, compiled
    base = out["variants"].get("bf16", {}).get("median_ms")
    for stats in out["variants"].values():
        if base and stats.get("status") == "ok":
            stats["speedup_vs_bf16"] = base / stats["median_ms"]
    from unitscale.precision.fp8 import Dispatch

    out["rule_says_fp8"] = Dispatch().use_fp8(m, k, n)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES), metavar="MxKxN")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="linear", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    require_cuda("bench/linear.py")
    env = environment()
    print(f"{env['device']}  torch {env['torch']}  torchao {env['torchao']}  triton {env['triton']}")
    results = [bench_shape(m, k, n, args.variants, args.warmup, args.iters) for m, k, n in args.shapes]

    headers = ["M×K→N", *args.variants, "rule"]
    rows = []
    for r in results:
        row = ["{}×{}→{}".format(*r["shape"])]
        for v in args.variants:
            s = r["variants"][v]
            if s.get("status") != "ok":
                row.append(s["status"][:24])
            elif "speedup_vs_bf16" in s and v != "bf16":
                row.append(f"{s['median_ms']:.3f} ms ({s['speedup_vs_bf16']:.2f}×)")
            else:
                row.append(f"{s['median_ms']:.3f} ms")
        row.append("fp8" if r["rule_says_fp8"] else "bf16")
        rows.append(row)
    print(table(headers, rows))
    print("(×: BF16 time / variant time, this run; JSON: TFLOP/s and rel. error of y vs the first variant)")
    payload = {"benchmark": "linear fwd+bwd, torch.compile, bf16 in/out", "environment": env,
               "warmup": args.warmup, "iters": args.iters, "results": results}
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
