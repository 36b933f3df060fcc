"""The paper's character-LM study (§6.1, Fig. 4) as a resumable grid of training runs.

Grid: model family × scaling × precision × optimiser, each cell with a small learning-rate sweep (the paper
tuned the LR per configuration). Each run writes its own directory; a run whose ``summary.json`` exists is
skipped, so a killed sweep continues where it stopped. ``report()`` picks the best LR per cell by final
validation BPC and writes a markdown table and a figure.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("gpt", "gpt-post", "conv", "rnn")
SCALINGS = ("standard", "unit")
PRECISIONS = ("fp32", "fp16", "fp16-loss-scaled", "fp8")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Preset:
    """Model size and training budget of one sweep preset."""

    name: str
    steps: int
    batch_size: int
    seq_len: int
    model: dict[str, Any]
    lr_factors: tuple[float, ...]  # LRs tried per cell: default LR × each factor
    eval_windows: int
    warmup: int
    description: str
    families: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-family model overrides


PRESETS = {
    "cpu": Preset(
        name="cpu",
        steps=150,
        batch_size=8,
        seq_len=64,
        warmup=15,
        eval_windows=64,
        model={"d_model": 64, "n_layers": 2, "n_heads": 1},
        families={"rnn": {"n_layers": 1}},
        # Short runs favour large LRs: at 150 steps half the cells' best LR sat at ×16; the grid goes to ×64.
        lr_factors=(1 / 16, 0.25, 1.0, 4.0, 16.0, 64.0),
        description="2-core CPU, ~35 min: d=64, 2 layers (1 for the RNN), 150 steps of 8×64 chars",
    ),
    "gpu": Preset(
        name="gpu",
        steps=20_000,
        batch_size=8,
        seq_len=256,
        warmup=500,
        eval_windows=512,
        model={"d_model": 128, "n_layers": 8, "n_heads": 2},
        families={"rnn": {"n_layers": 2}},
        lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0),
        description="the paper's sizes (hidden 128, 8 layers, 2 for the RNN, 8×256 chars), for one H100",
    ),
}


@dataclass(frozen=True)
class Cell:
    family: str
    scaling: str
    precision: str
    optimizer: str

    @property
    def key(self) -> str:
        return f"{self.family}__{self.scaling}__{self.precision}__{self.optimizer}"


def cells(
    families: tuple[str, ...] = FAMILIES,
    scalings: tuple[str, ...] = SCALINGS,
    precisions: tuple[str, ...] = PRECISIONS,
    optimizers: tuple[str, ...] = OPTIMIZERS,
) -> list[Cell]:
    """The grid; loss scaling is a fix for standard models only, so unit cells skip it (as the paper)."""
    out = []
    for fam, sc, pr, opt in itertools.product(families, scalings, precisions, optimizers):
        if sc == "unit" and "loss-scaled" in pr:
            continue
        out.append(Cell(fam, sc, pr, opt))
    return out


def _validate(name: str, values: tuple[str, ...], accepted: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in accepted]
    if bad:
        raise ValueError(f"unknown {name} {bad}; accepted: {', '.join(accepted)}")


def run_dirs(out: Path, preset: Preset, grid: list[Cell]) -> Iterator[tuple[Cell, float, Path]]:
    """(cell, lr, run directory) for every run of the sweep, in a fixed order."""
    from unitscale.models import build

    for cell in grid:
        probe = build(
            cell.family,
            vocab_size=2,
            scaling=cell.scaling,
            seq_len=preset.seq_len,
            **{**preset.model, **preset.families.get(cell.family, {})},
        )
        base = probe.default_lr(cell.optimizer)
        for factor in preset.lr_factors:
            lr = base * factor
            yield cell, lr, out / cell.key / f"lr_{math.log2(lr):+.1f}"


def run(
    out: str | Path,
    preset: str = "cpu",
    *,
    families: tuple[str, ...] = FAMILIES,
    scalings: tuple[str, ...] = SCALINGS,
    precisions: tuple[str, ...] = PRECISIONS,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    seed: int = 0,
    data: str = "wiki",
    device: str = "cpu",
    quiet: bool = False,
) -> Path:
    """Run (or continue) the sweep; returns the path of the markdown report."""
    from rich.console import Console

    from unitscale.train.loop import TrainConfig, train

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    _validate("families", families, FAMILIES)
    _validate("scalings", scalings, SCALINGS)
    _validate("precisions", precisions, PRECISIONS)
    _validate("optimizers", optimizers, OPTIMIZERS)
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"preset": asdict(p), "seed": seed, "data": data}, indent=1))
    console = Console(quiet=quiet)
    runs = list(run_dirs(out, p, cells(families, scalings, precisions, optimizers)))
    for i, (cell, lr, run_dir) in enumerate(runs, 1):
        if (run_dir / "summary.json").exists():
            continue
        console.print(f"[{i}/{len(runs)}] {cell.key} lr=2^{math.log2(lr):+.1f}")
        cfg = TrainConfig(
            model=cell.family,
            scaling=cell.scaling,
            precision=cell.precision,
            optimizer=cell.optimizer,
            lr=lr,
            steps=p.steps,
            warmup=p.warmup,
            batch_size=p.batch_size,
            seq_len=p.seq_len,
            eval_every=p.steps,
            eval_windows=p.eval_windows,
            checkpoint_every=p.steps,
            seed=seed,
            data=data,
            device=device,
            out_dir=str(run_dir),
            quiet=True,
            model_overrides={**p.model, **p.families.get(cell.family, {})},
            stop_on_nonfinite=False,
        )
        train(cfg)
    return report(out)


def _load(out: Path) -> list[dict[str, Any]]:
    rows = []
    for summary in sorted(out.glob("*/lr_*/summary.json")):
        s = json.loads(summary.read_text())
        fam, sc, pr, opt = summary.parent.parent.name.split("__")
        rows.append({"family": fam, "scaling": sc, "precision": pr, "optimizer": opt, **s})
    return rows


def _score(row: dict[str, Any]) -> float:
    v = row.get("valid_bpc")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def best_per_cell(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    best: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["family"], r["scaling"], r["precision"], r["optimizer"])
        if key not in best or _score(r) < _score(best[key]):
            best[key] = r
    return best


def at_edge(rows: list[dict[str, Any]], best: dict[tuple[str, str, str, str], dict[str, Any]]) -> set[tuple]:
    """Cells whose best LR is the smallest or largest LR tried for them (a wider sweep might do better)."""
    tried: dict[tuple, list[float]] = {}
    for r in rows:
        tried.setdefault((r["family"], r["scaling"], r["precision"], r["optimizer"]), []).append(r["lr"])
    return {k for k, r in best.items() if len(tried[k]) > 1 and r["lr"] in (min(tried[k]), max(tried[k]))}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "diverged"


def report(out: str | Path) -> Path:
    """Write ``report.md`` (best-LR table) and ``sweep.png`` (figure) into ``out``; return the report path."""
    out = Path(out)
    rows = _load(out)
    if not rows:
        raise ValueError(f"no finished runs under {out}")
    best = best_per_cell(rows)
    meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    preset = meta.get("preset", {})
    lines = [
        f"Preset `{preset.get('name', '?')}`: {preset.get('description', '')}.",
        f"Host: {platform.machine()}, {platform.processor() or platform.system()}; {len(rows)} runs.",
        "",
        "| family | optimiser | scaling | precision | best LR | valid BPC | test BPC |",
        "|---|---|---|---|---|---|---|",
    ]
    edge = at_edge(rows, best)
    for key, r in sorted(best.items()):
        fam, sc, pr, opt = key
        lr = r.get("lr")
        lr_s = f"2^{math.log2(lr):+.1f}" if isinstance(lr, (int, float)) and lr > 0 else "?"
        lr_s += " †" if key in edge else ""
        lines.append(
            f"| {fam} | {opt} | {sc} | {pr} | {lr_s} | {_fmt(r.get('valid_bpc'))} | "
            f"{_fmt(r.get('test_bpc'))} |"
        )
    if edge:
        lines += ["", f"† best LR at the edge of the LRs tried ({len(edge)} of {len(best)} cells): a wider "
                      "LR sweep might find a lower BPC there."]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    plot(best, out / "sweep.png")
    return path


def plot(best: dict[tuple[str, str, str, str], dict[str, Any]], path: Path) -> None:
    """Per (family, optimiser): best validation BPC of each precision, standard vs unit side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(k[0], k[3]) for k in best})
    precisions = [p for p in PRECISIONS if any(k[2] == p for k in best)]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    markers = {"fp32": "o", "fp16": "v", "fp16-loss-scaled": "^", "fp8": "s"}
    colors = {"standard": "tab:red", "unit": "tab:blue"}
    finite = [_score(r) for r in best.values() if math.isfinite(_score(r))]
    ceiling = (max(finite) + 0.3) if finite else 5.0
    for gi, (fam, opt) in enumerate(groups):
        for si, sc in enumerate(SCALINGS):
            for pi, pr in enumerate(precisions):
                r = best.get((fam, sc, pr, opt))
                if r is None:
                    continue
                y = _score(r)
                x = gi + (si - 0.5) * 0.4 + (pi - (len(precisions) - 1) / 2) * 0.08
                diverged = not math.isfinite(y)
                ax.scatter(
                    x,
                    ceiling if diverged else y,
                    marker="x" if diverged else markers.get(pr, "o"),
                    color=colors[sc],
                    s=50,
                    label=f"{sc} {pr}" if gi == 0 else None,
                )
    ax.set_xticks(range(len(groups)), [f"{f}\n{o}" for f, o in groups])
    ax.set_ylabel("validation bits per character (best LR), lower is better")
    ax.set_title("Char-LM sweep: regular (red) vs unit-scaled (blue); × = diverged")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
