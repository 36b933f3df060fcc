"""Eager per-call overhead of a unit ``Linear`` forward against ``F.linear`` (issue 19: scales resolved once).

    python bench/eager_linear.py                    # CPU, 8×64 input, 64→64 weight, 1 torch thread

Three arms, each a forward of the same 8×64 input through a 64→64 weight (autograd on, as in training;
``--no-grad`` for inference):

* ``F.linear``: torch alone;
* ``unit Linear, per-call rule``: what ``unitscale.nn.Linear`` did before the cache: build and resolve
  ``rules.linear_rule`` on every call, then the exact backend's ``linear`` (the code path written out here);
* ``unit Linear``: ``unitscale.nn.Linear`` as it is now (rule resolved once per shape).

Rounds interleave the arms in rotating order (noise hits all alike); each timing is the process CPU time of
``--calls`` calls, per call; medians over ``--rounds``. Writes bench/results/<out>.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, table, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--calls", type=int, default=2000, help="calls per timing")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-grad", action="store_true", help="time under torch.no_grad (inference)")
    p.add_argument("--out", default="eager_linear_cpu")
    args = p.parse_args()

    import unitscale.nn as unn
    from unitscale import rules
    from unitscale.precision.backend import EXACT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = unn.Linear(args.width, args.width)
    x = torch.randn(args.rows, args.width)
    w, b = layer.weight, layer.bias

    def per_call_rule() -> torch.Tensor:
        alpha, betas = rules.linear_rule(args.width, args.width, args.rows).resolve("gmean")
        return EXACT.linear(x, w, b, alpha=alpha, beta_x=betas["input"], beta_w=betas["weight"],
                            beta_b=betas["bias"])  # fmt: skip

    arms = {
        "F.linear": lambda: F.linear(x, w, b),
        "unit Linear, per-call rule (before)": per_call_rule,
        "unit Linear (now)": lambda: layer(x),
    }
    with torch.no_grad():
        torch.testing.assert_close(layer(x), per_call_rule(), rtol=0, atol=0)  # the same computation
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    grad_mode = torch.no_grad() if args.no_grad else torch.enable_grad()
    with grad_mode:  # default: autograd on (weight requires grad), as in training; the graph is dropped
        for fn in arms.values():  # warm-up
            for _ in range(200):
                fn()
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                fn = arms[name]
                start = time.process_time()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.process_time() - start) / args.calls * 1e6)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["F.linear"]
    rows = [[name, f"{m:.1f}", f"{m / base:.2f}"] for name, m in med.items()]
    text = table(["arm", "µs/call (median)", "× F.linear"], rows)
    print(text)
    payload = {
        "benchmark": f"eager forward, input {args.rows}×{args.width}, weight {args.width}×{args.width}, "
        + ("no grad" if args.no_grad else "autograd on"),
        "environment": {**environment(), "device": "cpu", "threads": args.threads},
        "clock": "process CPU time per call, median of rounds",
        "median_us": med,
        "ratio_to_F_linear": {name: m / base for name, m in med.items()},
        "speedup_now_vs_before": med["unit Linear, per-call rule (before)"] / med["unit Linear (now)"],
        "all_us": times,
        "table": text,
    }
    print(f"wrote {write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
