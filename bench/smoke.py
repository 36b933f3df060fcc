"""Smoke checks of the FP8 path on one device, one JSON: the first phase of bench/device_run.py.

    python bench/smoke.py --out smoke.json                 # CUDA
    TRITON_INTERPRET=1 python bench/smoke.py --dry --out smoke.json   # CPU, toy sizes (interpreter)

Checks, each recorded with its numbers (exit status 1 if any fails):
* triton_casts: the fused cast+transpose kernel against torch's float8 casts, both layouts bit for bit.
  CUDA: random values over every binade with ±0, ±inf, NaN and ties, E4M3 and E5M2, fp32/bf16/fp16 input
  and rounding to bf16 first. Dry (Triton interpreter, not RNE): values on the FP8 grid only.
* fp8_vs_simulate: Fp8Backend vs Simulate(fp8_e4b, fp8_e4b, fp8_e5b) on one linear, fp32: relative rms
  difference of y, ∂x, ∂W within 3× the 13-bit accumulation bound (precision/fp8_accumulation.py).
* compile: torch._dynamo.explain of a linear fwd+bwd: 0 graph breaks, the cast op in the graph; on CUDA the
  Inductor code of the compiled step contains the fused kernel.
* gemm_counts: FP8 GEMMs in one eager fwd+bwd of a linear (3) and of a GPT step (3 per linear).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import count_fp8_gemms, environment, write_json  # noqa: E402

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _bits_equal(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same NaN positions, and the same bytes everywhere else."""
    nan = torch.isnan(ref.float())
    if not torch.equal(torch.isnan(got.float()), nan):
        return False
    return torch.equal(got.view(torch.uint8)[~nan], ref.view(torch.uint8)[~nan])


def check_triton_casts(dev: str, dry: bool) -> dict:
    from unitscale.precision.fp8_kernels import cast_transpose

    cases, failures = 0, []
    shapes = [(67, 45), (3, 130)] if dry else [(1000, 333), (4096, 4096), (17, 4100)]
    for shape in shapes:
        for dtype in (E4, E5):
            for src, round_to in [
                (torch.float32, None),
                (torch.bfloat16, None),
                (torch.float16, None),
                (torch.float32, torch.bfloat16),
            ]:
                for inv in (1.0, 2.0**-4, 2.0**5):
                    gen = torch.Generator(device=dev).manual_seed(cases)
                    if dry:  # on the grid (times 1/inv): the interpreter's casts are not RNE
                        codes = torch.randint(0, 256, shape, generator=gen, device=dev, dtype=torch.uint8)
                        t = codes.view(dtype).float()
                        t = torch.where(torch.isfinite(t), t, torch.zeros_like(t)) / inv
                    else:
                        sigma = torch.pow(
                            2.0, torch.randint(-24, 18, shape, generator=gen, device=dev).float()
                        )
                        t = torch.randn(shape, generator=gen, device=dev) * sigma
                        t.view(-1)[:8] = torch.tensor(
                            [0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, 1.0625, -1.0625], device=dev
                        )
                    t = t.to(src)
                    row, col = cast_transpose(t, torch.tensor([inv], device=dev), dtype, round_to=round_to)
                    y = (t.to(round_to) if round_to is not None else t).float() * inv
                    fmax = torch.finfo(dtype).max
                    ref = y.clamp(-fmax, fmax).to(dtype)
                    ok = _bits_equal(row, ref) and _bits_equal(col, ref.t().contiguous())
                    cases += 1
                    if not ok:
                        failures.append(f"{shape} {dtype} {src} round_to={round_to} inv={inv}")
    return {"ok": not failures, "cases": cases, "failures": failures[:20]}


def check_fp8_vs_simulate(dev: str, dry: bool) -> dict:
    from unitscale.precision.fp8 import Dispatch, Fp8Backend
    from unitscale.precision.fp8_accumulation import accumulation_tolerance
    from unitscale.precision.simulate import Simulate

    m, k, n = (64, 128, 96) if dry else (1024, 2048, 1536)
    gen = torch.Generator(device=dev).manual_seed(0)
    x, w, g = (torch.randn(*s, generator=gen, device=dev) for s in ((m, k), (n, k), (m, n)))

    def run(backend):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = backend.linear(xr, wr, alpha=0.125, beta_x=0.25, beta_w=2.0**-5)
        y.backward(g)
        return y.detach(), xr.grad, wr.grad

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference accumulates in full fp32
    try:
        fp8 = run(Fp8Backend(dispatch=Dispatch.always()))
        sim = run(Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    out, ok = {}, True
    for name, a, r, red in zip(("y", "dx", "dW"), fp8, sim, (k, n, m)):
        err = float((a.double() - r.double()).norm() / r.double().norm())
        tol = accumulation_tolerance(red)
        out[name] = {"K": red, "rel_rms": err, "tolerance": tol}
        ok = ok and err < tol and bool(torch.isfinite(a).all())
    return {"ok": ok, "shape": [m, k, n], **out}


def check_compile(dev: str, dry: bool) -> dict:
    from unitscale.precision.fp8 import Dispatch, Fp8Backend

    torch._dynamo.reset()
    m, k, n = (64, 64, 32) if dry else (1024, 1024, 512)
    be = Fp8Backend(dispatch=Dispatch.always())
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(m, k, generator=gen, device=dev, requires_grad=True)
    w = torch.randn(n, k, generator=gen, device=dev, requires_grad=True)

    def step(x, w):
        with torch.autocast(dev, dtype=torch.bfloat16):
            return be.linear(x, w)

    ex = torch._dynamo.explain(step)(x, w)
    op = torch.ops.unitscale.fp8_cast_transpose
    subs = [s for gm in ex.graphs for s in gm.modules() if isinstance(s, torch.fx.GraphModule)]
    op_calls = sum(node.target in (op, op.default) for s in subs for node in s.graph.nodes)
    out = {"graph_breaks": ex.graph_break_count, "graphs": ex.graph_count, "cast_op_calls": op_calls}
    ok = ex.graph_break_count == 0 and ex.graph_count == 1 and op_calls == 3
    if dev == "cuda":
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        _, code = run_and_get_code(lambda: compiled(x, w).float().sum().backward())
        out["inductor_code_has_fused_kernel"] = "_cast_transpose_body" in "\n".join(code)
        ok = ok and out["inductor_code_has_fused_kernel"]
    return {"ok": ok, **out}


def check_gemm_counts(dev: str, dry: bool) -> dict:
    from unitscale.models import build
    from unitscale.precision import Recipe, apply, plan
    from unitscale.precision.fp8 import Dispatch, Fp8Backend

    be = Fp8Backend(dispatch=Dispatch.always())
    x = torch.randn(256, 256, device=dev, requires_grad=True)
    w = torch.randn(128, 256, device=dev, requires_grad=True)
    linear = count_fp8_gemms(lambda: be.linear(x, w).sum().backward())
    d = 64 if dry else 256
    model = build("gpt", 256, scaling="unit", d_model=d, n_layers=2, n_heads=2, seq_len=64).to(dev)
    apply(model, Recipe.fp8(backend="fp8"))
    modules = dict(model.named_modules())
    rows = plan(model, Recipe.fp8(backend="fp8"))
    for row in rows:  # every linear in FP8 at this toy size; attention on fused SDPA (as on a GPU)
        modules[row.path].precision = be if row.kind == "linear" else None
    idx = torch.randint(0, 256, (4, 65), device=dev)

    def gpt_step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()

    n_linear = sum(r.kind == "linear" for r in rows)
    gpt = count_fp8_gemms(gpt_step)
    return {
        "ok": linear == 3 and gpt == 3 * n_linear,
        "linear_fwd_bwd": linear,
        "gpt_step": gpt,
        "gpt_linears": n_linear,
    }


CHECKS = {
    "triton_casts": check_triton_casts,
    "fp8_vs_simulate": check_fp8_vs_simulate,
    "compile": check_compile,
    "gemm_counts": check_gemm_counts,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, toy sizes (run with TRITON_INTERPRET=1)")
    parser.add_argument("--out", default="smoke", help="name under bench/results/ or a .json path")
    args = parser.parse_args(argv)
    dev = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        print("bench/smoke.py: no CUDA device (use --dry on CPU)", file=sys.stderr)
        return 2
    results = {}
    for name, check in CHECKS.items():
        t0 = time.perf_counter()
        try:
            results[name] = check(dev, args.dry)
        except Exception as err:  # one broken check must not hide the others
            results[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:],
            }
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(
            f"  {name}: {'ok' if results[name]['ok'] else 'FAILED'} "
            f"{ {k: v for k, v in results[name].items() if k not in ('traceback', 'failures')} }",
            flush=True,
        )
    ok = all(r["ok"] for r in results.values())
    write_json(
        args.out,
        {
            "benchmark": "FP8 smoke checks",
            "environment": environment(),
            "dry": args.dry,
            "ok": ok,
            "checks": results,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
