"""``unitscale demo``: a standard and a unit-scaled char-LM trained side by side in simulated FP8.

Sized for a 2-core CPU (a few minutes at most): a small pre-norm transformer on the Wikipedia characters.
Each scaling trains with its own AdamW LR (unit models want a larger one: docs/theory.md, Learning rates;
both LRs are above the long-run defaults 2⁻¹⁰ / 2⁻⁶ because the run is short; in a trial both did better
in FP32) in FP8 (E4M3 weights and activations, E5M2 gradients, no loss scale) and, as the yardstick, in
FP32. The honest claim is relative: the unit model's FP8 run should track its FP32 run, the standard model's
should fall behind its own, because its small weights and gradients land below the FP8 ranges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unitscale.train import rundir
from unitscale.train.loop import RUN_MARKERS, TrainConfig, train
from unitscale.train.metrics import plot_curves, read_jsonl

DEMO_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2}
DEMO_LR = {"standard": 2.0**-6, "unit": 2.0**-4}


@dataclass(frozen=True)
class DemoRun:
    scaling: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.scaling}-{self.precision}"


def demo_config(out: str | Path, *, steps: int = 150, data: str = "wiki", seed: int = 0) -> TrainConfig:
    """The shared configuration of every demo run (scaling and precision are set per run)."""
    return TrainConfig(
        model="gpt", optimizer="adamw", lr=None, warmup=max(1, steps // 10), steps=steps, batch_size=16,
        seq_len=64, eval_every=max(1, steps // 5), eval_windows=32, checkpoint_every=steps, log_every=1,
        seed=seed, data=data, vocab_min_count=100, out_dir=str(out), quiet=True,
        model_overrides=dict(DEMO_MODEL),
    )


def run_demo(out: str | Path = "runs/demo", *, steps: int = 150, data: str = "wiki", seed: int = 0,
             reference: bool = True, console: Any = None, overwrite: bool = False,
             progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train the demo runs, write ``demo.png`` and ``demo.md`` into ``out``; return summaries by run name.

    Each run shows the training progress bar (step counter and ETA) when ``progress`` and the output is a
    terminal. A demo already in ``out`` is replaced only with ``overwrite``.
    """
    from rich.console import Console

    console = console or Console()
    out = Path(out)
    runs = [DemoRun("standard", "fp8"), DemoRun("unit", "fp8")]
    if reference:
        runs += [DemoRun("standard", "fp32"), DemoRun("unit", "fp32")]
    if not overwrite and any(rundir.existing(out / r.name, RUN_MARKERS) for r in runs):
        raise rundir.RunDirError(f"{out} already holds a demo; pass --overwrite to replace it, or choose "
                                 "another --out")
    base = demo_config(out, steps=steps, data=data, seed=seed)
    summaries: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg = replace(base, scaling=run.scaling, precision=run.precision, lr=DEMO_LR[run.scaling],
                      out_dir=str(out / run.name), overwrite=overwrite, quiet=not progress)
        t0 = time.perf_counter()
        summaries[run.name] = train(cfg)
        s = summaries[run.name]
        console.print(f"{run.name:<14} valid BPC {_fmt(s['valid_bpc'])}  ({time.perf_counter() - t0:.0f} s, "
                      f"lr {s['lr']:.2g})")
    styles = [{"color": "C3" if r.scaling == "standard" else "C0",
               **({"ls": "-"} if r.precision == "fp8" else {"ls": ":", "marker": "s", "mfc": "none"})}
              for r in runs]
    plot_curves([(r.name, read_jsonl(out / r.name / "metrics.jsonl")) for r in runs], out / "demo.png",
                title="char-LM, simulated FP8 (E4M3 fwd / E5M2 grad): standard vs unit scaling",
                styles=styles)
    (out / "demo.md").write_text(report(summaries))
    return summaries


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "diverged"


def report(summaries: dict[str, dict[str, Any]]) -> str:
    """A markdown table: final validation BPC per run, and each FP8 run's gap to its FP32 twin."""
    lines = ["| run | valid BPC | gap to own FP32 |", "|---|---|---|"]
    for name, s in summaries.items():
        ref = summaries.get(name.replace("fp8", "fp32")) if name.endswith("fp8") else None
        gap = "-"
        if ref and isinstance(s["valid_bpc"], float) and isinstance(ref["valid_bpc"], float):
            gap = f"{100 * (s['valid_bpc'] / ref['valid_bpc'] - 1):+.1f}%"
        lines.append(f"| {name} | {_fmt(s['valid_bpc'])} | {gap} |")
    return "\n".join(lines) + "\n"
