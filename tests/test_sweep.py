"""The char-LM sweep: grid, resumability (finished runs are skipped), best-LR report and figure."""

from __future__ import annotations

import json

import pytest
import torch

from unitscale.train import sweep


def test_grid_skips_loss_scaling_for_unit_models() -> None:
    grid = sweep.cells()
    assert all(not (c.scaling == "unit" and "loss-scaled" in c.precision) for c in grid)
    # 4 families × 2 optimisers × (4 standard precisions + 3 unit ones)
    assert len(grid) == 4 * 2 * (4 + 3)


def test_bad_names_list_accepted(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        sweep.run(tmp_path, "huge")
    with pytest.raises(ValueError, match=r"unknown families \['lstm'\]"):
        sweep.run(tmp_path, families=("lstm",))


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    preset = sweep.Preset(name="tiny", steps=4, batch_size=2, seq_len=16, warmup=1, eval_windows=2,
                          model={"d_model": 16, "n_layers": 1, "n_heads": 1}, lr_factors=(0.5, 2.0),
                          description="test preset")
    monkeypatch.setitem(sweep.PRESETS, "tiny", preset)
    text = tmp_path / "corpus.txt"
    words = ["unit", "scaling", "trains", "in", "fp8"]
    picks = torch.randint(0, len(words), (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    text.write_text(" ".join(words[i] for i in picks))
    return text


@pytest.mark.slow  # a whole resumable grid through the CLI
def test_sweep_runs_resumes_and_reports(tmp_path, tiny, monkeypatch) -> None:
    out = tmp_path / "sweep"
    kw = {"families": ("gpt",), "precisions": ("fp32", "fp16-loss-scaled", "fp8"), "optimizers": ("adam",),
          "data": str(tiny), "quiet": True}
    report = sweep.run(out, "tiny", **kw)
    summaries = sorted(out.glob("*/lr_*/summary.json"))
    assert len(summaries) == (3 + 2) * 2  # standard: 3 precisions, unit: 2 (no loss scaling); 2 LRs each
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gpt")]
    assert len(rows) == 5
    assert "† best LR at the edge" in text  # two LRs per cell: every best LR is at an edge
    assert (out / "sweep.png").stat().st_size > 10_000
    # the best LR per cell is the one with the lowest validation BPC among that cell's runs
    cell = out / "gpt__unit__fp8__adam"
    runs = [json.loads(p.read_text()) for p in cell.glob("lr_*/summary.json")]
    best = min(runs, key=lambda s: s["valid_bpc"])
    assert f"{best['valid_bpc']:.3f}" in next(r for r in rows if "| unit | fp8 |" in r)

    calls = []
    monkeypatch.setattr("unitscale.train.loop.train", lambda cfg: calls.append(cfg))
    sweep.run(out, "tiny", **kw)  # everything finished: nothing is trained again
    assert calls == []


def test_best_lr_at_the_edge_of_the_grid_is_flagged() -> None:
    def row(lr: float, bpc: float, precision: str = "fp32") -> dict:
        return {"family": "gpt", "scaling": "unit", "precision": precision, "optimizer": "adam", "lr": lr,
                "valid_bpc": bpc}

    rows = [row(0.25, 3.0), row(1.0, 2.0), row(4.0, 2.5),  # fp32: interior minimum
            row(0.25, 3.0, "fp8"), row(1.0, 2.9, "fp8"), row(4.0, 2.8, "fp8")]  # fp8: best at the top LR
    best = sweep.best_per_cell(rows)
    assert best[("gpt", "unit", "fp8", "adam")]["lr"] == 4.0
    assert sweep.at_edge(rows, best) == {("gpt", "unit", "fp8", "adam")}
