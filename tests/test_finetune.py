"""Fine-tuning loop: schedule, statistics, tables, CLI errors, and a short real MiniLM run that learns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unitscale.functional as U
from unitscale.cli import main
from unitscale.models.bert import BertTokenizer, minilm_dir
from unitscale.train.finetune import (
    FinetuneConfig,
    lr_factor,
    markdown_table,
    mean_std,
    param_groups,
    reparametrisation_scales,
    summarise,
    train_seed,
)
from unitscale.train.topics import TopicData
from unitscale.transforms import unit_scale


def _synthetic(split: str, n: int, seed: int) -> TopicData:
    """Three 'topics' told apart by their nouns, so a few steps of fine-tuning must separate them."""
    words = [
        ["cat", "dog", "horse", "cow"],
        ["planet", "star", "comet", "galaxy"],
        ["guitar", "piano", "drum"],
    ]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    texts = []
    for k in labels.tolist():
        picks = torch.randint(0, len(words[k]), (3,), generator=g).tolist()
        texts.append(f"this text mentions the {words[k][picks[0]]}, the {words[k][picks[1]]} and more.")
    batch = BertTokenizer.from_file(minilm_dir() / "tokenizer.json", max_len=24)(texts)
    return TopicData(split, batch["input_ids"], batch["attention_mask"], labels, tuple(texts))


@pytest.mark.parametrize(
    "step, expected", [(0, 0.25), (3, 1.0), (4, 1.0), (10, 0.5), (15, 1 / 12), (16, 0.0)]
)
def test_lr_factor_warmup_then_linear_decay(step, expected):
    # 16 steps, 4 warm-up: (s + 1)/4 for s < 4, then (16 − s)/12
    assert lr_factor(step, 16, 4) == pytest.approx(expected, abs=1e-15)


def test_lr_factor_monotone_shape():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert max(f) == 1.0 and f.index(1.0) == 9
    assert all(a <= b for a, b in zip(f[:10], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(1 / 90)


@pytest.mark.parametrize("values", [[71.0, 73.5, 72.25], [1.0, 2.0], [5.5]])
def test_mean_std_matches_numpy(values):
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    if len(values) == 1:
        assert math.isnan(std)
    else:
        assert std == pytest.approx(np.std(values, ddof=1), rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scaling": "magic"}, "scaling 'magic'.*standard, unit"),
        ({"pooling": "max"}, "pooling 'max'"),
        ({"warmup": 1.0}, "warmup"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_summary_table():
    cfg = FinetuneConfig(precision="fp8", scaling="unit")
    results = [
        {
            "seed": s,
            "valid_acc": a,
            "test_acc": a - 0.01,
            "final_loss": 0.5,
            "train_s": 100.0,
            "diverged": False,
        }
        for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))
    ]
    summary = summarise(cfg, results)
    assert summary["valid_acc"]["mean"] == pytest.approx(82.0) and summary["valid_acc"][
        "std"
    ] == pytest.approx(2.0)
    table = markdown_table([summary]).splitlines()
    assert len(table) == 3
    assert (
        table[2]
        == "| unit-fp8 | fp8 | unit | 0 1 2 | 82.00 ± 2.00 | 81.00 ± 2.00 | 0.500 ± 0.000 | 100 ± 0 |"
    )


def test_adamw_lr_mapping_makes_the_unit_model_follow_the_original_trajectory():
    """Proposition 5.1: θ_u = k·θ trained with AdamW at lr·k and weight decay wd/k follows θ exactly (up to
    Adam's ε), because Theorem 5.2 makes each unit-scaled gradient a constant multiple of the true one."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.up = torch.nn.LayerNorm(16), torch.nn.Linear(16, 64)
            self.down = torch.nn.Linear(64, 16)
            self.head = torch.nn.Linear(16, 5)

        def forward(self, x):
            x = x + self.down(F.gelu(self.up(self.norm(x))))
            return self.head(x)

    original = Block().double()
    x, y = torch.randn(32, 16, dtype=torch.float64), torch.randint(0, 5, (32,))
    converted = unit_scale(original, (x,))
    converted.lr_scales = reparametrisation_scales(original, converted)
    assert max(converted.lr_scales.values()) > 2  # a real reparametrisation, not the identity
    lr, wd = 1e-2, 0.1
    opt_o = torch.optim.AdamW(param_groups(original, wd, lr), lr=lr, eps=1e-30)
    opt_u = torch.optim.AdamW(param_groups(converted, wd, lr), lr=lr, eps=1e-30)
    for _ in range(5):
        for model, opt, loss_fn in ((original, opt_o, F.cross_entropy), (converted, opt_u, U.cross_entropy)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-9, atol=1e-9)
    assert (original(x) - Block().double()(x)).abs().max() > 1e-3  # it did train


def test_cli_unknown_precision(capsys, tmp_path):
    assert main(["finetune", "--precision", "fp7", "--out", str(tmp_path), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "fp7" in err and "fp32" in err


def test_smoke_finetune_learns():
    """30 steps of real MiniLM fine-tuning on an easy synthetic task: loss falls and accuracy is high."""
    torch.set_num_threads(2)
    data = {"train": _synthetic("train", 240, 0), "valid": _synthetic("valid", 60, 1)}
    cfg = FinetuneConfig(epochs=1.0, batch_size=8, lr=2e-4, warmup=0.1, max_len=24, log_every=5)
    records = []
    result = train_seed(cfg, seed=0, data=data, log=records.append)
    assert result["steps"] == 30 and not result["diverged"]
    losses = [r["loss"] for r in records if "lr" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["valid_acc"] >= 0.9
    final = [r for r in records if r.get("event") == "final"]
    assert len(final) == 1 and final[0]["valid_acc"] == result["valid_acc"]
    json.dumps(records)  # every record is JSON-serialisable (it goes to the JSONL file)


@pytest.mark.slow  # ~30 s on a busy 2-core machine: tokenises every article and evaluates ~900 of them
@pytest.mark.parametrize("scaling, precision", [("standard", "fp32"), ("unit", "fp8")])
def test_cli_end_to_end_writes_outputs(tmp_path, capsys, scaling, precision):
    """Two steps on real topic data through `unitscale finetune`: JSONL, summary JSON/markdown, table."""
    args = ["finetune", "--max-steps", "2", "--train-subset", "64", "--batch-size", "8", "--max-len", "32",
            "--scaling", scaling, "--precision", precision]
    assert main([*args, "--seeds", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    run_dir = tmp_path / f"{scaling}-{precision}"
    records = [json.loads(line) for line in (run_dir / "seed3.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["event"] == "final" and final["steps"] == 2 and final["train_examples"] == 64
    assert 0.0 <= final["valid_acc"] <= 1.0 and 0.0 <= final["test_acc"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seeds"] == [3] and summary["config"]["max_len"] == 32
    assert summary["test_acc"]["mean"] == pytest.approx(100 * final["test_acc"])
    table = (tmp_path / "results.md").read_text()
    assert (
        table == (run_dir / "summary.md").read_text()
        and f"| {scaling}-{precision} | {precision} | {scaling} | 3 |" in table
    )
    assert f"{scaling}-{precision}" in capsys.readouterr().out
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_plot_draws_every_run_and_seed(tmp_path):
    """results.png from the seed JSONL files of two runs (one with a single seed); nothing without runs."""
    import matplotlib.image

    from unitscale.train.finetune import collect_plot

    assert collect_plot(tmp_path) is None
    for run, seeds in (("standard-fp32", (0, 1)), ("unit-fp8", (0,))):
        (tmp_path / run).mkdir()
        for seed in seeds:
            lines = [{"seed": seed, "step": s, "loss": 2.4 / s} for s in range(10, 60, 10)]
            lines.append({"seed": seed, "event": "final", "valid_acc": 0.9 + seed / 100, "test_acc": 0.93})
            (tmp_path / run / f"seed{seed}.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    path = collect_plot(tmp_path)
    assert path == tmp_path / "results.png"
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (1440, 576)  # 12 × 4.8 inches at 120 dpi


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--weight-decay", "-1"], "weight_decay must be a number >= 0, got -1.0"),
        (["--device", "cuda"], "CUDA is not available; accepted here: cpu, auto"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys, argv, match, monkeypatch):
    """Each bad option ends the command with exit 2 and one line naming the value, before data loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import unitscale.train.finetune as ft

    monkeypatch.setattr(ft, "load_data", lambda config: pytest.fail("data loaded before the check"))
    assert main(["finetune", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


@pytest.fixture
def one_thread():
    """torch on one thread for the test (a tiny model on a shared machine), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_interrupted_seed_resumes_bit_for_bit_and_saves_a_loadable_model(tmp_path, one_thread):
    """A real SIGINT mid-epoch saves a checkpoint; resuming reaches the uninterrupted run's loss and weights
    exactly; the saved model loads with weights_only=True, carries the label names and predicts like the
    trained model."""
    _interrupt_and_resume(tmp_path)


def _interrupt_and_resume(tmp_path):
    import signal

    from unitscale.train import finetune_state, rundir
    from unitscale.train.topics import TOPICS

    data = {"train": _synthetic("train", 40, 0), "valid": _synthetic("valid", 12, 1)}
    cfg = FinetuneConfig(epochs=2.0, batch_size=8, lr=2e-4, warmup=0.1, max_len=24, log_every=1,
                         checkpoint_every=3, train_subset=None)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = train_seed(cfg, 0, data, run_dir=full_dir)  # 10 steps: 5 per epoch

    def interrupt(step, total, loss):
        if step == 7:  # mid second epoch, one step after the step-6 checkpoint
            signal.raise_signal(signal.SIGINT)

    with rundir.StopSignals() as stop, pytest.raises(rundir.Interrupted, match="after step 7 of seed 0"):
        train_seed(cfg, 0, data, progress=interrupt, run_dir=part_dir, stop=stop)
    assert checkpoint_step(finetune_state.checkpoint_path(part_dir, 0)) == 7
    assert not finetune_state.model_path(part_dir, 0).exists()
    resumed = train_seed(cfg, 0, data, run_dir=part_dir, resume=True)
    assert resumed["steps"] == full["steps"] == 10 and resumed["final_loss"] == full["final_loss"]
    assert resumed["valid_acc"] == full["valid_acc"] and resumed["valid_loss"] == full["valid_loss"]
    assert not finetune_state.checkpoint_path(part_dir, 0).exists()  # replaced by the model file
    saved = {d: torch.load(finetune_state.model_path(d, 0), weights_only=True) for d in (full_dir, part_dir)}
    assert saved[part_dir]["labels"] == list(TOPICS)
    assert all(torch.equal(saved[full_dir]["model"][k], v) for k, v in saved[part_dir]["model"].items())
    model, labels = finetune_state.load_finetuned(finetune_state.model_path(part_dir, 0))
    ids, mask = data["valid"].input_ids, data["valid"].attention_mask
    with torch.no_grad():
        predicted = model(ids, mask).argmax(-1)
    acc = float((predicted == data["valid"].labels).float().mean())
    assert labels == list(TOPICS) and acc == pytest.approx(full["valid_acc"], abs=1e-12)


def checkpoint_step(path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


def test_cli_refuses_to_overwrite_a_run_and_names_resume_and_overwrite(tmp_path, capsys, monkeypatch):
    import unitscale.train.finetune as ft

    monkeypatch.setattr(ft, "load_data", lambda config: pytest.fail("data loaded before the check"))
    run = tmp_path / "standard-fp32"
    run.mkdir()
    (run / "seed0.jsonl").write_text('{"seed": 0, "step": 10, "loss": 1.0}\n')
    assert main(["finetune", "--out", str(tmp_path), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (seed0.jsonl)" in err and "--resume" in err and "--overwrite" in err
    assert (run / "seed0.jsonl").read_text().startswith('{"seed": 0, "step": 10')
