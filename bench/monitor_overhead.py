"""Step-time overhead of the scale-health monitor on the char-LM: monitor off vs on at its default interval.

    python bench/monitor_overhead.py                       # CPU, the `unitscale train` default char-LM
    python bench/monitor_overhead.py --device cuda --out monitor_overhead_h100

One step = forward, backward and AdamW on the default char-LM of ``unitscale train`` (gpt, unit scaling,
d_model 128, 4 layers, seq 128, batch 16) under the fp8 recipe (simulated FP8 on CPU), random tokens.
Two measurements, interleaved so that machine noise hits both arms alike, medians reported:

* per step: a plain step, an unmonitored step inside ``monitor.step`` (a no-op context: the same work as
  plain, so its difference from plain is the noise floor) and a checked step, in rotating order;
  amortised overhead = (checked − plain) / (interval · plain).
* end to end: blocks of ``interval`` steps with the monitor off and on (one check per block), alternating;
  overhead = median on-block time / median off-block time − 1 (``--block-reps 0`` skips it).

On CPU the clock is the process CPU time with ``--threads`` (default 1) torch threads, which other jobs on a
shared machine disturb far less than wall time; on CUDA it is wall time around synchronised steps.

Writes bench/results/<out>.json (device, torch, command, every timing).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, table, write_json  # noqa: E402


def build(args: argparse.Namespace):
    from unitscale.models import build as build_model
    from unitscale.precision import Recipe, apply

    torch.manual_seed(0)
    model = build_model("gpt", args.vocab, scaling="unit", d_model=args.d_model, n_layers=args.layers,
                        seq_len=args.seq).to(args.device)
    apply(model, Recipe.fp8())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
               for _ in range(8)]
    return model, opt, batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--interval", type=int, default=None, help="monitor interval (default: TrainConfig's)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--step-reps", type=int, default=30, help="repetitions of the per-step triple")
    p.add_argument("--block-reps", type=int, default=1, help="off/on block pairs of `interval` steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="monitor_overhead_cpu")
    args = p.parse_args()

    from unitscale.monitor import ScaleMonitor
    from unitscale.train.loop import TrainConfig

    interval = args.interval or TrainConfig().monitor_every
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if cuda else time.process_time
    model, opt, batches = build(args)
    monitor = ScaleMonitor(model, every=interval, patience=10**9)  # timing only: no warnings
    counter = iter(range(10**9))

    def step(ctx: contextlib.AbstractContextManager) -> None:
        b = batches[next(counter) % len(batches)]
        with ctx:
            _, loss = model(b[:, :-1], b[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    arms = {
        "plain": lambda: step(contextlib.nullcontext()),
        "unmonitored": lambda: step(monitor.step(interval - 1)),  # a step the monitor skips
        "checked": lambda: step(monitor.step(interval)),
    }
    for _ in range(args.warmup):
        for fn in arms.values():
            fn()
    per_step: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(args.step_reps):
        for k in names[r % 3:] + names[:r % 3]:
            per_step[k].append(timed(arms[k]))
    med = {k: statistics.median(v) * 1e3 for k, v in per_step.items()}
    amortised = (med["checked"] - med["plain"]) / (interval * med["plain"])
    noise = med["unmonitored"] / med["plain"] - 1

    def block(on: bool) -> float:
        def run() -> None:
            for s in range(interval + 1, 2 * interval + 1):  # one due step (2·interval) per block
                step(monitor.step(s) if on else contextlib.nullcontext())
        return timed(run) / interval

    blocks: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.block_reps):
        for key in (("off", "on") if r % 2 == 0 else ("on", "off")):
            blocks[key].append(block(key == "on"))
    off, on = ((statistics.median(blocks[k]) * 1e3 if blocks[k] else math.nan) for k in ("off", "on"))

    n_tensors = len(monitor.last)
    rows = [
        ["plain step (ms, median)", f"{med['plain']:.2f}"],
        ["unmonitored step in monitor.step (ms)", f"{med['unmonitored']:.2f}"],
        ["  noise floor (unmonitored / plain - 1)", f"{noise:+.3%}"],
        [f"checked step, {n_tensors} tensors (ms)", f"{med['checked']:.2f}"],
        [f"amortised overhead at every={interval}", f"{amortised:+.3%}"],
        [f"end to end: off, mean step over {interval} (ms)", f"{off:.2f}"],
        [f"end to end: on, mean step over {interval} (ms)", f"{on:.2f}"],
        ["end-to-end overhead (median blocks)", f"{on / off - 1:+.3%}"],
    ]
    print(table(["char-LM fp8 (simulate), " + args.device, "value"], rows))
    env = environment()
    env.setdefault("device", f"CPU, {torch.get_num_threads()} torch thread(s)" if not cuda else args.device)
    path = write_json(args.out, {
        "environment": env,
        "config": vars(args) | {"interval": interval, "recipe": "fp8 (simulate)",
                                                           "monitored_tensors": n_tensors},
        "per_step_ms": {k: [t * 1e3 for t in v] for k, v in per_step.items()},
        "per_step_median_ms": med,
        "amortised_overhead": amortised,
        "noise_floor": noise,
        "clock": "wall (synchronised)" if cuda else f"process CPU time, {args.threads} thread(s)",
        "block_mean_step_ms": {k: [t * 1e3 for t in v] for k, v in blocks.items()},
        "end_to_end_overhead": on / off - 1 if blocks["on"] else None,
        "note": "GPU overhead not measured here (no GPU in this session); to be measured on an H100 with "
                "--device cuda --out monitor_overhead_h100.",
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
