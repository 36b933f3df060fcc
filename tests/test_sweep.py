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
    kw = {"families": ("gpt",), "precisions": ("fp32", "fp16-loss-scaled", "fp8-paper"),
          "optimizers": ("adam",), "data": str(tiny), "quiet": True}
    report = sweep.run(out, "tiny", **kw)
    summaries = sorted(out.glob("*/lr_*/summary.json"))
    assert len(summaries) == (3 + 2) * 2  # standard: 3 precisions, unit: 2 (no loss scaling); 2 LRs each
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gpt")]
    assert len(rows) == 5
    assert "† best LR at the edge" in text  # two LRs per cell: every best LR is at an edge
    assert (out / "sweep.png").stat().st_size > 10_000
    # the best LR per cell is the one with the lowest validation BPC among that cell's runs
    cell = out / "gpt__unit__fp8-paper__adam"
    runs = [json.loads(p.read_text()) for p in cell.glob("lr_*/summary.json")]
    best = min(runs, key=lambda s: s["valid_bpc"])
    assert f"{best['valid_bpc']:.3f}" in next(r for r in rows if "| unit | fp8-paper |" in r)

    calls = []
    monkeypatch.setattr("unitscale.train.loop.train", lambda cfg: calls.append(cfg))
    sweep.run(out, "tiny", **kw)  # everything finished: nothing is trained again
    assert calls == []


def test_best_lr_at_the_edge_of_the_grid_is_flagged() -> None:
    def row(lr: float, bpc: float, precision: str = "fp32") -> dict:
        return {"family": "gpt", "scaling": "unit", "precision": precision, "optimizer": "adam", "lr": lr,
                "valid_bpc": bpc}

    rows = [row(0.25, 3.0), row(1.0, 2.0), row(4.0, 2.5),  # fp32: interior minimum
            row(0.25, 3.0, "fp8-paper"), row(1.0, 2.9, "fp8-paper"), row(4.0, 2.8, "fp8-paper")]  # top best
    best = sweep.best_per_cell(rows)
    assert best[("gpt", "unit", "fp8-paper", "adam")]["lr"] == 4.0
    assert sweep.at_edge(rows, best) == {("gpt", "unit", "fp8-paper", "adam")}


def test_runs_are_keyed_by_every_setting_that_changes_their_result(tmp_path, tiny, monkeypatch) -> None:
    """A rerun with another seed or data file trains its own runs (the old ones stay, unreported); the
    same settings reuse them; an interrupted run is resumed, not restarted."""
    out = tmp_path / "sweep"
    kw = {"families": ("gpt",), "scalings": ("unit",), "precisions": ("fp32",), "optimizers": ("adam",),
          "data": str(tiny), "quiet": True}
    sweep.run(out, "tiny", **kw)
    first = sorted(p.parent.name for p in out.glob("*/lr_*/summary.json"))
    assert len(first) == 2

    from unitscale.train import loop

    real_train = loop.train
    calls = []

    def counting(cfg):
        calls.append(cfg)
        return real_train(cfg)

    monkeypatch.setattr(loop, "train", counting)
    sweep.run(out, "tiny", **kw)
    assert calls == []  # same settings: nothing retrained
    report = sweep.run(out, "tiny", **{**kw, "seed": 1})
    assert [c.seed for c in calls] == [1, 1] and not any(c.resume for c in calls)
    assert "Seed 1;" in report.read_text()
    seeds = {json.loads(p.read_text())["config"]["seed"] for p in out.glob("*/lr_*/summary.json")}
    assert seeds == {0, 1}  # the seed-0 runs are kept, not relabelled
    other = tmp_path / "other.txt"
    other.write_text(tiny.read_text().replace("fp8", "int4"))
    calls.clear()
    sweep.run(out, "tiny", **{**kw, "data": str(other)})
    assert len(calls) == 2 and all(c.data == str(other.resolve()) for c in calls)
    assert len(list(out.glob("*/lr_*/summary.json"))) == 6
    # an interrupted run (checkpoint, no finished summary) is resumed
    victim = sorted(out.glob("*/lr_*/summary.json"))[0]
    victim.unlink()
    calls.clear()
    data = json.loads((victim.parent / "config.json").read_text())["data"]
    seed = json.loads((victim.parent / "config.json").read_text())["seed"]
    sweep.run(out, "tiny", **{**kw, "data": data, "seed": seed})
    assert len(calls) == 1 and calls[0].resume and calls[0].out_dir == str(victim.parent)


def test_run_key_covers_data_content_not_its_path(tmp_path) -> None:
    from unitscale.train.loop import TrainConfig

    a = {"size": 10, "sha256": "a" * 64}
    cfg = TrainConfig(seed=0, data="/x/a.txt")
    assert sweep.run_key(cfg, a) == sweep.run_key(TrainConfig(seed=0, data="/elsewhere/b.txt"), a)
    assert sweep.run_key(cfg, a) != sweep.run_key(cfg, {**a, "sha256": "b" * 64})
    key = sweep.run_key(cfg, a)
    for change in ({"seed": 1}, {"steps": 999}, {"device": "cuda"}, {"model_overrides": {"d_model": 8}},
                   {"lr": 0.5}, {"precision": "fp8"}):
        assert sweep.run_key(TrainConfig(**{"data": "/x/a.txt", **change}), a) != key, change
    for free in ({"out_dir": "elsewhere"}, {"eval_every": 7}, {"quiet": True}, {"monitor_every": 0}):
        assert sweep.run_key(TrainConfig(**{"data": "/x/a.txt", **free}), a) == key, free


def test_report_of_an_old_sweep_directory_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({"preset": {"name": "cpu"}, "seed": 0, "data": "wiki"}))
    with pytest.raises(ValueError, match="older unitscale .*rerun the sweep"):
        sweep.report(tmp_path)
