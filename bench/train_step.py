"""Training throughput of a GPT (≥ 350M parameters): BF16, unit-scaled BF16, unit-scaled FP8, torchao.float8.

    python bench/train_step.py                               # d 4096, 2 layers (540M), seq 1024, batch 16
    python bench/train_step.py --variants fp8-unit bf16-unit --rounds 10
    python bench/train_step.py --fit --variants fp8-unit     # also search the largest batch that fits

One step = forward, backward and a fused AdamW update, fp32 master weights, bf16 autocast, torch.compile,
random tokens (throughput does not depend on the data). Variants: bf16-standard (plain PyTorch twin),
bf16-unit (unit-scaled), fp8-unit (ours, ``precision.apply(model, Recipe.fp8(backend="fp8"))``: the
default dispatch rule decides per linear; attention stays on torch's fused SDPA), fp8-unit-always (every
aligned linear in FP8) and torchao-tensorwise (the standard model with ``convert_to_float8_training``;
torchao is required when asked for). The default width is the smallest multiple of 1024 at which the
default dispatch rule sends every linear to FP8 (batch·seq ≥ min_m is checked too), and every FP8 variant
must run FP8 GEMMs: one eager step counts them (3 per FP8 linear) before anything is timed.

Each variant is built, compiled and warmed up in turn (the others stay resident), then its peak memory is
read over one step after ``reset_peak_memory_stats`` (minus what was resident before it was built), then
all variants are timed round-robin (bench/_common.time_round_robin). Reports tokens/s, the speed-up over
bf16-standard and torchao-tensorwise, and peak memory. Writes bench/results/train_step.json (or --out).
"""

from __future__ import annotations

import argparse
import gc
import math
import subprocess
import sys
from pathlib import Path

import torch

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

VARIANTS = ("bf16-standard", "bf16-unit", "fp8-unit", "fp8-unit-always", "torchao-tensorwise")
DEFAULT_VARIANTS = ("bf16-standard", "bf16-unit", "fp8-unit", "torchao-tensorwise")
BASELINES = ("bf16-standard", "torchao-tensorwise")
OOM_EXIT = 3


def default_width() -> int:
    """The smallest multiple of 1024 with K, N ≥ the default dispatch rule's min_k, min_n."""
    from unitscale.precision.fp8 import Dispatch

    rule = Dispatch()
    return max(1024, 1024 * math.ceil(max(rule.min_k, rule.min_n) / 1024))


def _fp8_backends(model: torch.nn.Module, always: bool) -> None:
    """Linears on an Fp8Backend, attention on no backend (fused SDPA), as ``apply`` does on an FP8 GPU.

    On CUDA with the default rule ``apply``'s own backends stay; ``always`` swaps in Dispatch.always(), and
    without CUDA (the dry run) the simulate fallback is replaced so the CPU run goes through _scaled_mm.
    """
    from unitscale.precision import Recipe, plan
    from unitscale.precision.fp8 import Dispatch, Fp8Backend

    if torch.cuda.is_available() and not always:
        return
    backend = Fp8Backend(dispatch=Dispatch.always() if always else Dispatch())
    modules = dict(model.named_modules())
    for row in plan(model, Recipe.fp8(backend="fp8")):
        if row.kind == "linear":
            modules[row.path].precision = backend
        elif row.kind == "attention":
            modules[row.path].precision = None


def build_model(variant: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model for ``variant`` on args.device."""
    from unitscale.models import build

    scaling = "standard" if variant in ("bf16-standard", "torchao-tensorwise") else "unit"
    model = build(
        "gpt",
        args.vocab,
        scaling=scaling,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq,
    ).to(args.device)
    if variant.startswith("fp8"):
        from unitscale.precision import Recipe, apply

        apply(model, Recipe.fp8(backend="fp8"))
        _fp8_backends(model, always=variant == "fp8-unit-always" or args.dispatch == "always")
    elif variant == "torchao-tensorwise":
        float8 = require_module("torchao.float8", f"variant {variant}")
        config = float8.Float8LinearConfig.from_recipe_name("tensorwise")

        def aligned(module: torch.nn.Module, fqn: str) -> bool:
            return not isinstance(module, torch.nn.Linear) or (
                module.in_features % 16 == 0 and module.out_features % 16 == 0
            )

        float8.convert_to_float8_training(model, config=config, module_filter_fn=aligned)
    return model


def expected_fp8_gemms(model: torch.nn.Module, rows: int) -> int:
    """3 × the linears whose backend sends a [rows, K] × [K, N] product to FP8 (the tied readout: K = d,
    N = vocab)."""
    from unitscale.precision.fp8 import Fp8Backend

    count = 0
    for module in model.modules():
        backend = getattr(module, "precision", None)
        if not isinstance(backend, Fp8Backend):
            continue
        if hasattr(module, "weight") and getattr(module, "weight", None) is not None:
            n, k = module.weight.shape
        elif type(module).__name__ == "TiedReadout":
            n, k = model.tok.weight.shape
        else:
            continue
        count += 3 * backend.dispatch.use_fp8(rows, k, n)
    return count


def make_step(model: torch.nn.Module, batch: int, args: argparse.Namespace):
    """(compiled training step, eager fwd+bwd) on fixed random tokens."""
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(0, args.vocab, (batch, args.seq + 1), device=dev, generator=gen)
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.startswith("cuda"))
    forward = torch.compile(model) if args.compile else model

    def fwd_bwd(fn) -> None:
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
            _, loss = fn(inputs, targets)
        loss.backward()

    def step() -> None:
        fwd_bwd(forward)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eager() -> None:
        fwd_bwd(model)
        model.zero_grad(set_to_none=True)

    return step, eager


def prepare(variant: str, args: argparse.Namespace) -> tuple[dict, object]:
    """Build, count FP8 GEMMs, compile + warm up, read peak memory: (record, step) or (record, None)."""
    cuda = args.device.startswith("cuda")
    resident = torch.cuda.memory_allocated() if cuda else 0
    try:
        model = build_model(variant, args)
        params = sum(p.numel() for p in model.parameters())
        step, eager = make_step(model, args.batch, args)
        fp8 = count_fp8_gemms(eager)
        want = expected_fp8_gemms(model, args.batch * args.seq) if variant.startswith("fp8") else None
        if variant.startswith(("fp8", "torchao")) and fp8 == 0:
            raise SystemExit(
                f"{variant} ran no FP8 GEMM in a step (d_model {args.d_model}, "
                f"{args.batch}×{args.seq} tokens): check the dispatch thresholds"
            )
        if want is not None and fp8 != want:
            raise SystemExit(f"{variant}: {fp8} FP8 GEMMs per step, the dispatch rule says {want}")
        for _ in range(args.warmup):  # the first compiles
            step()
        peak = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # after warm-up and compile
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - resident) / 2**30
    except torch.OutOfMemoryError:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return {"status": f"OOM at batch {args.batch}"}, None
    record = {
        "status": "ok",
        "params": params,
        "fp8_gemms_per_step": fp8,
        "batch": args.batch,
        "tokens_per_step": args.batch * args.seq,
        "peak_memory_gib": peak,
    }
    print(f"  {variant}: {params / 1e6:.0f}M params, {fp8} FP8 GEMMs/step, peak {peak} GiB", flush=True)
    return record, step


def probe(variant: str, batch: int, args: argparse.Namespace) -> bool:
    """Does ``batch`` fit? Two compiled steps in a fresh process (clean allocator and compile caches)."""
    cmd = [
        sys.executable,
        __file__,
        "--probe",
        variant,
        str(batch),
        "--d-model",
        str(args.d_model),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--seq",
        str(args.seq),
        "--vocab",
        str(args.vocab),
        *([] if args.compile else ["--no-compile"]),
    ]
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
    step, _ = make_step(build_model(variant, args), batch, args)
    try:
        step()
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return OOM_EXIT
    return 0


def render(results: dict, args: argparse.Namespace, params: int) -> str:
    rows = []
    for variant, r in results.items():
        if r["status"] != "ok":
            rows.append([variant, r["status"], "", "", "", "", "", ""])
            continue
        ratios = [f"{r[f'speedup_vs_{b}']:.2f}×" if f"speedup_vs_{b}" in r else "" for b in BASELINES]
        peak = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        rows.append(
            [
                variant,
                f"{r['tokens_per_s']:,.0f}",
                *ratios,
                f"{r['median_ms']:.1f}",
                peak,
                r["fp8_gemms_per_step"],
                r.get("largest_batch", ""),
            ]
        )
    head = (
        f"GPT {params / 1e6:.0f}M params, d={args.d_model}, {args.layers} layers, seq {args.seq}, "
        f"batch {args.batch}"
    )
    return (
        head
        + "\n"
        + table(
            ["variant", "tokens/s", "vs bf16", "vs torchao", "step ms", "peak GiB", "fp8 GEMMs", "max batch"],
            rows,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--d-model", type=int, default=None, help="default: default_width() (4096)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=None, help="default: d_model / 128")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=16, help="batch for the timing (sequences per step)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before memory and timing (compiles)")
    parser.add_argument("--rounds", type=int, default=6, help="round-robin samples per variant")
    parser.add_argument("--steps", type=int, default=2, help="training steps between one pair of events")
    parser.add_argument(
        "--dispatch",
        choices=("rule", "always"),
        default="rule",
        help="FP8 dispatch of fp8-unit: the default rule, or always (toy sizes)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only for the dry run")
    parser.add_argument("--fit", action="store_true", help="also search the largest batch that fits")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", default="train_step", help="name under bench/results/ or a .json path")
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.d_model = args.d_model or default_width()
    args.heads = args.heads or max(1, args.d_model // 128)
    if args.device.startswith("cuda"):
        require_cuda("bench/train_step.py")
    if args.probe:
        return run_probe(args.probe[0], int(args.probe[1]), args)
    env = environment()
    print(
        f"{env.get('device', args.device)}  torch {env['torch']}  torchao {env['torchao']}  "
        f"triton {env['triton']}",
        flush=True,
    )
    results, steps = {}, {}
    for variant in args.variants:
        results[variant], step = prepare(variant, args)
        if step is not None:
            steps[variant] = step
    timed = time_round_robin(steps, rounds=args.rounds, steps=args.steps, warmup=0, device=args.device)
    speedups(timed, BASELINES)
    for variant, st in timed.items():
        st["tokens_per_s"] = args.batch * args.seq / (st["median_ms"] * 1e-3)
        results[variant].update(st)
    if args.fit:
        steps.clear()
        gc.collect()
        for variant, r in results.items():
            if r["status"] == "ok" or "OOM" in r["status"]:
                r["largest_batch"] = largest_batch(variant, max(1, args.batch // 4), args)
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    if params < 350e6:
        print(f"note: the model has {params / 1e6:.0f}M parameters (< 350M asked by issue 7)")
    print(render(results, args, params))
    payload = {
        "benchmark": "GPT training step (fwd+bwd+AdamW), bf16 autocast",
        "environment": env,
        "config": {k: v for k, v in vars(args).items() if k != "probe"},
        "params": params,
        "results": results,
    }
    print(f"wrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
