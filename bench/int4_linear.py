"""INT4 linear (HQ + LSS) forward + backward vs BF16 ``F.linear`` at the issue-17 shapes; ratios from one run.

    python bench/int4_linear.py --out $OUT/int4_linear.json   # CUDA (Hopper: FP8 carrier GEMMs)
    python bench/int4_linear.py --dry --out /tmp/int4.json    # toy sizes on CPU, seconds (the CPU test)

Shapes (tokens M, fan-in K → fan-out N): 8192 × 8192 → 8192 and 16384 × 4096 → 4096 (``--dry``: 256 × 128 →
64 and 512 × 64 → 128). One iteration = forward and backward of one layer with fresh weight codes (the
weight is quantised once per optimizer step, so a training step pays it once: its cache is cleared each
iteration). On CUDA the INT4 GEMMs run on the FP8 carrier (``gemm="fp8"``, E4M3 ``torch._scaled_mm`` with
FP32 accumulation) when the device has FP8, otherwise exact fp32 (``"reference"``). Variants alternate
round-robin within each iteration; medians of CUDA-event (GPU) or process-CPU (CPU) milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, table  # noqa: E402

GPU_SHAPES = ((8192, 8192, 8192), (16384, 4096, 4096))
DRY_SHAPES = ((256, 128, 64), (512, 64, 128))


def _timer(cuda: bool):
    if cuda:

        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return run

    def run_cpu(fn) -> float:
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3

    return run_cpu


def bench_shape(m: int, k: int, n: int, args: argparse.Namespace, device: str) -> dict:
    from unitscale.precision.int4 import Int4Config, Int4Linear, fp8_available

    cuda = device == "cuda"
    gemm = "fp8" if cuda and fp8_available() else "reference"
    gen = torch.Generator(device=device).manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen, device=device)
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).requires_grad_()
    gy = torch.randn(m, n, generator=gen, device=device)
    xb, wb, gyb = x.bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_(), gy.bfloat16()
    xi = x.clone().requires_grad_()
    layer = Int4Linear(k, Int4Config(gemm=gemm, seed=0), device=device)
    layer.linear(xi, w)  # LSQ initialisation outside the timing

    def bf16() -> None:
        F.linear(xb, wb).backward(gyb)

    def int4() -> None:
        layer.clear_cache()  # pay the weight quantisation, as a training step does once
        layer.linear(xi, w).backward(gy)

    variants = {"bf16": bf16, "int4": int4}
    timer = _timer(cuda)
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for i in range(args.iters):
        for v in names[i % 2 :] + names[: i % 2]:
            times[v].append(timer(variants[v]))
    med = {v: statistics.median(t) for v, t in times.items()}
    return {
        "shape": {"M": m, "K": k, "N": n},
        "int4_gemm": gemm,
        "median_ms": med,
        "speedup_int4_vs_bf16": med["bf16"] / med["int4"],
        "times_ms": times,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="toy sizes on CPU (seconds)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    device = "cuda" if cuda else "cpu"
    shapes = GPU_SHAPES if cuda else DRY_SHAPES
    if not cuda and not args.dry:
        print("int4_linear.py: no CUDA device; running the --dry toy sizes on CPU", file=sys.stderr)
    args.iters = args.iters or (20 if cuda else 5)
    args.warmup = args.warmup or (3 if cuda else 1)
    results = [bench_shape(m, k, n, args, device) for m, k, n in shapes]
    rows = [
        [
            f"{r['shape']['M']}x{r['shape']['K']}->{r['shape']['N']}",
            r["int4_gemm"],
            f"{r['median_ms']['bf16']:.3f}",
            f"{r['median_ms']['int4']:.3f}",
            f"{r['speedup_int4_vs_bf16']:.2f}x",
        ]
        for r in results
    ]
    print(table(["shape", "int4 gemm", "bf16 ms", "int4 ms", "int4 speed-up"], rows))
    payload = {
        "env": environment(),
        "device": device if not cuda else torch.cuda.get_device_name(),
        "clock": "CUDA events" if cuda else "process CPU time",
        "dry": args.dry,
        "iters": args.iters,
        "results": results,
    }
    out = args.out or RESULTS / ("int4_linear_dry.json" if args.dry else "int4_linear.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
