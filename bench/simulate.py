"""Cost of simulating a number format: ``quantise`` against ``clone()`` and torch's casts, and a char-LM step.

    python bench/simulate.py                                  # CPU, full sizes, eager and compiled
    python bench/simulate.py --quick --no-compile --out /tmp/q.json  # seconds: the test-suite smoke run
    python bench/simulate.py --compare bench/results/simulate_cpu_{before,after}.json

Two sections, each one interleaved (round-robin, rotating start) run so machine noise hits every arm alike;
every ratio divides two medians of the same run:

* quantise: an n×n fp32 tensor (4096² by default) through ``formats.quantise`` for every float format and
  both rounding modes (quantise's defaults otherwise: saturating), against ``x.clone()`` (the cost of
  writing a fresh tensor) and torch's own cast round trip where torch has the dtype (``clamp`` + cast + cast
  back for FP8, the plain round trip for FP16/BF16). Compiled arms wrap each callable in ``torch.compile``;
  each compiled quantise is checked bit-exact against eager (column ``exact``).
* step: one training step (forward, backward, AdamW) of the gpt char-LM (d_model 256, 4 layers, seq 256,
  batch 8) under fp32, bf16-sim, fp16-sim, fp8-sim (``Recipe.fp8()``) and int4 (``Recipe.int4()``), unit
  and standard scaling, eager and ``torch.compile(model)``. Ratios: against the same scaling's fp32 step and
  unit against standard for the same recipe.

On CPU the clock is process CPU time with ``--threads`` torch threads (default 1): other jobs disturb it
far less than wall time. On CUDA it is wall time around synchronised calls. Writes <out>.json and <out>.md
(a bare --out name goes to bench/results/). ``--compare A B`` prints B's ratios against A's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, table  # noqa: E402

FLOATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e5a", "fp8_e5b", "fp8_e4a", "fp8_e4b")
ROUNDINGS = ("nearest", "stochastic")
RECIPES = ("fp32", "bf16-sim", "fp16-sim", "fp8-sim", "int4")
SCALINGS = ("unit", "standard")


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def clock(device: str) -> Callable[[Callable[[], Any]], float]:
    """Seconds one call of fn takes: process CPU time on CPU, synchronised wall time on CUDA."""
    cuda = device.startswith("cuda")

    def timed(fn: Callable[[], Any]) -> float:
        if cuda:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return timed


def round_robin(arms: dict[str, Callable[[], Any]], reps: int, warmup: int, device: str) -> dict[str, float]:
    """Median milliseconds per arm from ``reps`` rounds over all arms, starting each round one arm later.

    An arm whose warm-up raises is dropped (its error is the value, a string)."""
    timed = clock(device)
    errors: dict[str, str] = {}
    for name, fn in arms.items():
        try:
            for _ in range(warmup):
                fn()
        except Exception as err:  # noqa: BLE001 - reported, never hidden
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc(limit=2)
    names = [n for n in arms if n not in errors]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % max(1, len(names)) :] + names[: r % max(1, len(names))]:
            times[n].append(timed(arms[n]))
    out: dict[str, Any] = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    out.update(errors)
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


# ---------------------------------------------------------------------------------------------------------
# quantise
# ---------------------------------------------------------------------------------------------------------


def _native(fmt_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torch's own cast round trip for the format, or None where torch has no dtype (tf32)."""
    from unitscale.formats import get_format

    fmt = get_format(fmt_name)
    dtype = fmt.torch_dtype
    if dtype is None:
        return None
    if fmt.bits == 8:
        return lambda x: x.clamp(-fmt.max, fmt.max).to(dtype).to(x.dtype)
    return lambda x: x.to(dtype).to(x.dtype)


def bench_quantise(args: argparse.Namespace) -> list[dict[str, Any]]:
    from unitscale.formats import quantise

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.n, generator=g).to(args.device)
    # non-representable in every format below fp32, and outside fp8 range: the check needs rounding to show
    probe = torch.tensor([1 + 2**-12, 3.3e-3, -1e5, 1 / 3], device=args.device)

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=False)

    arms: dict[str, Callable[[], Any]] = {"clone": lambda: x.clone()}
    if args.compile:
        clone_c = compiled(lambda t: t.clone())
        arms["clone|compiled"] = lambda: clone_c(x)
    exact: dict[str, bool | str] = {}
    for name in args.formats:
        native = _native(name)
        if native is not None:
            arms[f"native:{name}"] = lambda native=native: native(x)
            if args.compile:
                native_c = compiled(native)
                arms[f"native:{name}|compiled"] = lambda f=native_c: f(x)
        for rounding in ROUNDINGS:
            key = f"{name}:{rounding}"
            arms[key] = lambda name=name, rounding=rounding: quantise(x, name, rounding)
            if args.compile:
                qc = compiled(lambda t, name=name, rounding=rounding: quantise(t, name, rounding))
                arms[f"{key}|compiled"] = lambda f=qc: f(x)
                if rounding == "nearest":
                    try:
                        exact[name] = bool(torch.equal(qc(probe), quantise(probe, name)))
                    except Exception as err:  # noqa: BLE001 - reported
                        exact[name] = f"{type(err).__name__}"
    med = round_robin(arms, args.reps, args.warmup, args.device)
    rows = []
    for name in args.formats:
        for rounding in ROUNDINGS:
            for mode in ("eager", "compiled") if args.compile else ("eager",):
                sfx = "|compiled" if mode == "compiled" else ""
                q, clone = med.get(f"{name}:{rounding}{sfx}"), med.get(f"clone{sfx}")
                native = med.get(f"native:{name}{sfx}") if rounding == "nearest" else None
                rows.append(
                    {
                        "format": name,
                        "rounding": rounding,
                        "mode": mode,
                        "quantise_ms": q,
                        "clone_ms": clone,
                        "native_ms": native,
                        "vs_clone": _ratio(q, clone),
                        "native_vs_clone": _ratio(native, clone),
                        "vs_native": _ratio(q, native),
                        "compiled_exact": exact.get(name)
                        if mode == "compiled" and rounding == "nearest"
                        else None,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------------------
# model step
# ---------------------------------------------------------------------------------------------------------


def _recipe(name: str):
    from unitscale.precision import Recipe

    if name == "bf16-sim":
        return Recipe(name="bf16-sim", weight_format="bf16", activation_format="bf16", grad_format="bf16")
    return {
        "fp32": Recipe.fp32,
        "fp16-sim": Recipe.fp16_simulated,
        "fp8-sim": Recipe.fp8,
        "int4": Recipe.int4,
    }[name]()


def make_step(recipe: str, scaling: str, compile_: bool, args: argparse.Namespace) -> Callable[[], None]:
    from unitscale.models import build
    from unitscale.precision import apply

    torch.manual_seed(0)
    model = build(
        "gpt", args.vocab, scaling=scaling, d_model=args.d_model, n_layers=args.layers, seq_len=args.seq
    ).to(args.device)
    apply(model, _recipe(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    forward = torch.compile(model) if compile_ else model

    def step() -> None:
        _, loss = forward(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = ("eager", "compiled") if args.compile else ("eager",)
    arms = {}
    for recipe in args.recipes:
        for scaling in SCALINGS:
            for mode in modes:
                arms[f"{recipe}|{scaling}|{mode}"] = make_step(recipe, scaling, mode == "compiled", args)
    med = round_robin(arms, args.step_reps, args.step_warmup, args.device)
    rows = []
    for recipe in args.recipes:
        for scaling in SCALINGS:
            for mode in modes:
                ms = med.get(f"{recipe}|{scaling}|{mode}")
                rows.append(
                    {
                        "recipe": recipe,
                        "scaling": scaling,
                        "mode": mode,
                        "step_ms": ms,
                        "vs_fp32": _ratio(ms, med.get(f"fp32|{scaling}|{mode}")),
                        "unit_vs_standard": _ratio(ms, med.get(f"{recipe}|standard|{mode}"))
                        if scaling == "unit"
                        else None,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        f"# bench/simulate.py: {env.get('device', 'cpu')}, torch {env['torch']}, "
        f"{payload['config']['threads']} thread(s)",
        "",
        f"`{env['command']}` (commit {env['git_commit']})",
        "",
        f"## quantise, {payload['config']['n']}² fp32 (ratios of medians, one interleaved run)",
        "",
        "| format | rounding | mode | ms | × clone | native × clone | × native | compiled = eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["quantise"]:
        lines.append(
            f"| {r['format']} | {r['rounding']} | {r['mode']} | {_f(r['quantise_ms'], 1)} | "
            f"{_f(r['vs_clone'])} | {_f(r['native_vs_clone'])} | {_f(r['vs_native'])} | "
            f"{_f(r['compiled_exact'])} |"
        )
    c = payload["config"]
    lines += [
        "",
        f"## training step, gpt d={c['d_model']}, {c['layers']} layers, seq {c['seq']}, batch {c['batch']}",
        "",
        "| recipe | scaling | mode | ms | × fp32 | unit × standard |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["step"]:
        lines.append(
            f"| {r['recipe']} | {r['scaling']} | {r['mode']} | {_f(r['step_ms'], 1)} | "
            f"{_f(r['vs_fp32'])} | {_f(r['unit_vs_standard'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def compare(before: Path, after: Path) -> str:
    """B's ratios next to A's for every row present in both."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    out = []
    for section, keys, ratios in (
        ("quantise", ("format", "rounding", "mode"), ("vs_clone", "vs_native")),
        ("step", ("recipe", "scaling", "mode"), ("vs_fp32", "unit_vs_standard")),
    ):
        old = {tuple(r[k] for k in keys): r for r in a.get(section, [])}
        rows = []
        for r in b.get(section, []):
            o = old.get(tuple(r[k] for k in keys))
            if o is None:
                continue
            cells = [" ".join(str(r[k]) for k in keys)]
            for ratio in ratios:
                cells += [_f(o.get(ratio)), _f(r.get(ratio))]
            rows.append(cells)
        headers = ["row"] + [f"{ratio} {w}" for ratio in ratios for w in ("before", "after")]
        out.append(f"{section}\n{table(headers, rows)}")
    return "\n\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=4096, help="quantise an n×n fp32 tensor")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--reps", type=int, default=9, help="rounds of the quantise section")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--step-reps", type=int, default=5, help="rounds of the step section")
    p.add_argument("--step-warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--formats", nargs="+", default=list(FLOATS), choices=FLOATS)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--skip", nargs="*", default=[], choices=["quantise", "step"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: a smoke test in seconds")
    p.add_argument("--out", default="simulate_cpu", help="name in bench/results, or a path ending .json")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d_model, args.layers, args.seq, args.batch = 64, 32, 1, 16, 2
        args.reps, args.warmup, args.step_reps, args.step_warmup = 2, 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    torch.set_num_threads(args.threads)
    # every compiled arm shares one code object (a lambda, CharLM.forward): past dynamo's recompile limit
    # (8) it would silently run eager
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    payload: dict[str, Any] = {
        "environment": {**environment(), "device": environment().get("device", args.device)},
        "config": {k: v for k, v in vars(args).items() if k not in ("compare",)},
    }
    payload["quantise"] = [] if "quantise" in args.skip else bench_quantise(args)
    payload["step"] = [] if "step" in args.skip else bench_step(args)
    out = Path(args.out) if args.out.endswith(".json") else RESULTS / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = markdown(payload)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
