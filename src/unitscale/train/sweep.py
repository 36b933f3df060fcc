"""The paper's character-LM study (§6.1, Fig. 4) as a resumable grid of training runs.

Grid: model family × scaling × precision × optimiser, each cell with a small learning-rate sweep (the paper
tuned the LR per configuration). Each run writes its own directory, ``<cell>/lr_<log2 lr>-<key>``, where
the key hashes every setting that changes the run's result (its whole TrainConfig: model options, steps,
batch, seed, device, ... and the data file's content, not its path). A finished run with the same key is
skipped and an interrupted one resumed, so a killed sweep continues where it stopped, and a sweep with
another seed or data file trains its own runs beside the old ones. ``report()`` reads the runs of the
last sweep's settings (``sweep.json``), picks the best LR per cell by final validation BPC and writes a
markdown table and a figure.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

FAMILIES = ("gpt", "gpt-post", "conv", "rnn")
SCALINGS = ("standard", "unit")
PRECISIONS = ("fp32", "fp16", "fp16-loss-scaled", "fp8-paper")  # the paper's unscaled FP8 casts
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


# TrainConfig fields that do not change a run's result (where it writes, what it shows, how often it logs
# or checks; the monitor leaves the trajectory bit for bit unchanged); ``data`` is keyed by content.
UNKEYED = frozenset({"out_dir", "resume", "overwrite", "quiet", "tensorboard", "allow_data_change",
                     "eval_every", "checkpoint_every", "log_every", "monitor_every", "monitor_patience",
                     "stop_on_nonfinite", "parallel", "stop_at", "data"})


def run_key(config: Any, data_id: dict[str, Any]) -> str:
    """10 hex digits of SHA-256 over every result-changing setting of ``config`` and the data's content."""
    keyed = {k: v for k, v in asdict(config).items() if k not in UNKEYED}
    keyed["data"] = {"size": data_id["size"], "sha256": data_id["sha256"]}
    text = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Settings:
    """Everything a sweep's runs depend on besides the grid cell and LR (saved as ``sweep.json``)."""

    preset: Preset
    seed: int
    data: str  # "wiki" or an absolute path
    data_id: dict[str, Any]  # its fingerprint: size and SHA-256 of the content
    device: str
    grid: dict[str, tuple[str, ...]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        d = json.loads(text)
        p = d["preset"]
        preset = Preset(**{**p, "lr_factors": tuple(p["lr_factors"])})
        grid = {k: tuple(v) for k, v in d["grid"].items()}
        return cls(preset, d["seed"], d["data"], d["data_id"], d["device"], grid)


def run_configs(out: Path, settings: Settings) -> Iterator[tuple[Cell, Any]]:
    """(cell, TrainConfig) for every run of the sweep, in a fixed order; ``out_dir`` carries the run key."""
    from unitscale.models import build
    from unitscale.train.loop import TrainConfig

    p = settings.preset
    for cell in cells(**settings.grid):
        model = {**p.model, **p.families.get(cell.family, {})}
        probe = build(cell.family, vocab_size=2, scaling=cell.scaling, seq_len=p.seq_len, **model)
        base = probe.default_lr(cell.optimizer)
        for factor in p.lr_factors:
            lr = base * factor
            cfg = TrainConfig(
                model=cell.family, scaling=cell.scaling, precision=cell.precision, optimizer=cell.optimizer,
                lr=lr, steps=p.steps, warmup=p.warmup, batch_size=p.batch_size, seq_len=p.seq_len,
                eval_every=p.steps, eval_windows=p.eval_windows, checkpoint_every=p.steps, seed=settings.seed,
                data=settings.data, device=settings.device, quiet=True, model_overrides=model,
                stop_on_nonfinite=False,
            )
            run_dir = out / cell.key / f"lr_{math.log2(lr):+.1f}-{run_key(cfg, settings.data_id)}"
            yield cell, replace(cfg, out_dir=str(run_dir))


def _done(run_dir: Path) -> bool:
    """A run that reached its end (finished or diverged), as opposed to interrupted or never started."""
    try:
        return json.loads((run_dir / "summary.json").read_text())["status"] in ("finished", "diverged")
    except (OSError, ValueError, KeyError):
        return False


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

    from unitscale.train import loop
    from unitscale.train.data import fingerprint, resolve_source
    from unitscale.train.rundir import RunLock

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    _validate("families", families, FAMILIES)
    _validate("scalings", scalings, SCALINGS)
    _validate("precisions", precisions, PRECISIONS)
    _validate("optimizers", optimizers, OPTIMIZERS)
    out = Path(out)
    grid = {"families": families, "scalings": scalings, "precisions": precisions, "optimizers": optimizers}
    settings = Settings(PRESETS[preset], seed, resolve_source(data), fingerprint(data), device, grid)
    console = Console(quiet=quiet)
    with RunLock(out):
        (out / "sweep.json").write_text(settings.to_json())
        runs = list(run_configs(out, settings))
        for i, (cell, cfg) in enumerate(runs, 1):
            run_dir = Path(cfg.out_dir)
            if _done(run_dir):
                continue
            resume = any((run_dir / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt"))
            console.print(f"[{i}/{len(runs)}] {cell.key} lr=2^{math.log2(cfg.lr):+.1f}"
                          + (" (resumed)" if resume else ""))
            # Nothing to lose without a checkpoint: leftovers of a run killed early are replaced.
            loop.train(replace(cfg, resume=resume, overwrite=not resume))
    return report(out)


def _load(out: Path, settings: Settings) -> list[dict[str, Any]]:
    """The summaries of the runs of ``settings`` that reached their end (others are not reported)."""
    rows = []
    for cell, cfg in run_configs(out, settings):
        if _done(Path(cfg.out_dir)):
            s = json.loads((Path(cfg.out_dir) / "summary.json").read_text())
            rows.append({"family": cell.family, "scaling": cell.scaling, "precision": cell.precision,
                         "optimizer": cell.optimizer, **s})
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
    if not (out / "sweep.json").is_file():
        raise FileNotFoundError(f"{out / 'sweep.json'} does not exist: run the sweep first (without "
                                "--report-only)")
    try:
        settings = Settings.from_json((out / "sweep.json").read_text())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{out / 'sweep.json'} was written by an older unitscale (no run keys: {err}); "
                         "rerun the sweep to key its runs") from None
    rows = _load(out, settings)
    if not rows:
        raise ValueError(f"no finished runs under {out} for its last settings ({out / 'sweep.json'})")
    best = best_per_cell(rows)
    preset = settings.preset
    lines = [
        f"Preset `{preset.name}`: {preset.description}.",
        f"Seed {settings.seed}; data {settings.data} ({settings.data_id['size']} bytes, sha256 "
        f"{settings.data_id['sha256'][:12]}…); device {settings.device}.",
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
    markers = {"fp32": "o", "fp16": "v", "fp16-loss-scaled": "^", "fp8-paper": "s"}
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
