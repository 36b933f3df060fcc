"""Training loop: schedule, determinism, exact resume, non-finite stop, atomic checkpoints, outputs.

A tiny stand-in model with the registry contract (``model(idx, targets) -> (logits, loss)``) keeps every
run to a fraction of a second; one test uses the real registry model when it is importable.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unitscale.train import checkpoint
from unitscale.train.loop import NonFiniteError, TrainConfig, lr_factor, train
from unitscale.train.metrics import bpc, evaluate_bpc, read_jsonl


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear readout; mean CE in nats."""

    def __init__(self, vocab_size: int, d: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(torch.relu(self.hidden(self.tok(idx))))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tiny(config: TrainConfig, vocab_size: int) -> nn.Module:
    return TinyLM(vocab_size)


def cfg(tmp_path, text_file, name="run", **kw) -> TrainConfig:
    base = dict(model="tiny", precision="fp32", optimizer="adamw", lr=1e-2, warmup=3, steps=12, batch_size=4,
                seq_len=16, eval_every=4, eval_windows=8, checkpoint_every=4, log_every=1, seed=0,
                data=str(text_file), out_dir=str(tmp_path / name), quiet=True)
    return TrainConfig(**{**base, **kw})


def params(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoint.pt")["model"]


@pytest.mark.parametrize(("warmup", "steps"), [(0, 10), (3, 10), (10, 10), (5, 100)])
def test_lr_factor_matches_formula(warmup, steps):
    for s in range(steps):
        expected = (s + 1) / warmup if s < warmup else (
            0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) if steps > warmup else 1.0)
        assert lr_factor(s, warmup, steps) == pytest.approx(expected, rel=1e-15, abs=0)
    if warmup:
        assert lr_factor(warmup - 1, warmup, steps) == 1.0
    assert lr_factor(steps - 1, warmup, steps) < 1.0 or warmup >= steps - 1


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_two_identical_runs_match_exactly(tmp_path, text_file, optimizer):
    a = train(cfg(tmp_path, text_file, "a", optimizer=optimizer), model_fn=tiny)
    b = train(cfg(tmp_path, text_file, "b", optimizer=optimizer), model_fn=tiny)
    assert a["status"] == b["status"] == "finished"
    assert math.isfinite(a["final_loss"]) and a["final_loss"] == b["final_loss"]
    assert a["valid_bpc"] == b["valid_bpc"]
    pa, pb = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = train(cfg(tmp_path, text_file, "c", optimizer=optimizer, seed=1), model_fn=tiny)
    assert c["final_loss"] != a["final_loss"]  # the seed matters, so the equality above is not vacuous


@pytest.mark.parametrize(("optimizer", "precision", "interrupt_at"), [
    ("adamw", "fp32", 6),   # interrupted 2 steps after the step-4 checkpoint: those 2 steps are redone
    ("sgd", "fp32", 4),     # interrupted right after a checkpoint
    ("adam", "bf16", 9),    # autocast path
])
def test_resume_is_exact(tmp_path, text_file, optimizer, precision, interrupt_at):
    full = train(cfg(tmp_path, text_file, "full", optimizer=optimizer, precision=precision), model_fn=tiny)

    def interrupt(step, model, loss):
        if step == interrupt_at:
            raise KeyboardInterrupt

    part = cfg(tmp_path, text_file, "part", optimizer=optimizer, precision=precision)
    with pytest.raises(KeyboardInterrupt):
        train(part, model_fn=tiny, on_step=interrupt)
    assert checkpoint.load(tmp_path / "part" / "checkpoint.pt")["step"] == 4 * (interrupt_at // 4)
    resumed = train(cfg(tmp_path, text_file, "part", optimizer=optimizer, precision=precision, resume=True),
                    model_fn=tiny)
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["valid_bpc"] == full["valid_bpc"] and resumed["test_bpc"] == full["test_bpc"]
    pf, pr = params(tmp_path / "full"), params(tmp_path / "part")
    assert all(torch.equal(pf[k], pr[k]) for k in pf)
    # the metrics log of the resumed run equals the uninterrupted one, apart from wall-clock fields
    strip = [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")}
             for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")}
                     for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]


def test_resume_rejects_changed_config_and_missing_checkpoint(tmp_path, text_file):
    train(cfg(tmp_path, text_file, "r", steps=4), model_fn=tiny)
    with pytest.raises(ValueError, match=r"lr: 0\.01 -> 0\.02"):
        train(cfg(tmp_path, text_file, "r", steps=4, lr=2e-2, resume=True), model_fn=tiny)
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        train(cfg(tmp_path, text_file, "nothing", resume=True), model_fn=tiny)


def test_nonfinite_stops_names_step_and_tensor_and_keeps_checkpoint(tmp_path, text_file):
    def corrupt(step, model, loss):
        if step == 5:  # after the step-4 checkpoint: step 6's forward overflows in `hidden`
            with torch.no_grad():
                model.hidden.weight.mul_(1e38)
                model.hidden.bias.fill_(3e38)

    c = cfg(tmp_path, text_file, "nan")
    with pytest.raises(NonFiniteError) as err:
        train(c, model_fn=tiny, on_step=corrupt)
    msg = str(err.value)
    assert "step 6" in msg and "'hidden'" in msg and "step 4" in msg, msg
    saved = checkpoint.load(tmp_path / "nan" / "checkpoint.pt")
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["valid_bpc"] is None and "step 6" in summary["error"]
    # sweep mode: no exception, same diagnosis in the summary
    out = train(cfg(tmp_path, text_file, "nan2", stop_on_nonfinite=False), model_fn=tiny, on_step=corrupt)
    assert out["status"] == "diverged" and "'hidden'" in out["error"]


def test_gradient_overflow_is_named(tmp_path, text_file):
    """A finite forward with an overflowing backward: the diagnosis names a gradient."""

    class GradBomb(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    class BombLM(TinyLM):
        def forward(self, idx, targets=None):
            logits = self.head(GradBomb.apply(torch.relu(self.hidden(self.tok(idx)))))
            loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                targets.reshape(-1))
            return logits, loss

    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 1.*gradient of .*'hidden'"):
        train(cfg(tmp_path, text_file, "bomb"), model_fn=lambda c, v: BombLM(v))
    assert not (tmp_path / "bomb" / "checkpoint.pt").exists()


def test_outputs_written(tmp_path, text_file):
    s = train(cfg(tmp_path, text_file, "out"), model_fn=tiny)
    d = tmp_path / "out"
    for name in ("metrics.jsonl", "checkpoint.pt", "loss.png", "summary.json", "config.json"):
        assert (d / name).is_file(), name
    rows = read_jsonl(d / "metrics.jsonl")
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 4, 8, 12]
    assert rows[-1]["valid_bpc"] == s["valid_bpc"]
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(d.glob(".*.tmp"))  # no temp files left behind by the atomic writes
    saved = checkpoint.load(d / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "rng", "sampler", "vocab", "config", "step"} <= set(saved)


def test_evaluate_bpc_against_float64_reference():
    torch.manual_seed(0)
    model = TinyLM(11).double()
    windows = torch.randint(0, 11, (5, 9))
    got = evaluate_bpc(model, windows, batch_size=2)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    ref = -torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None]).mean() / math.log(2)
    assert got == pytest.approx(float(ref), rel=1e-6)
    assert bpc(math.log(2)) == 1.0


def test_loss_scale_unscales_gradients(tmp_path, text_file, monkeypatch):
    """A static loss scale S is exact for power-of-two S: same trajectory as no scaling in fp32."""
    import unitscale.precision as P

    plain = train(cfg(tmp_path, text_file, "ls0"), model_fn=tiny)
    scaled_recipe = P.Recipe(name="fp32-ls", loss_scale=1024.0)
    orig = P.get_recipe
    monkeypatch.setattr(P, "get_recipe", lambda name: scaled_recipe if name == "fp32-ls" else orig(name))
    ls = train(cfg(tmp_path, text_file, "ls1", precision="fp32-ls"), model_fn=tiny)
    assert ls["final_loss"] == plain["final_loss"]
    pa, pb = params(tmp_path / "ls0"), params(tmp_path / "ls1")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("optimizer", "lamb", "accepted: adamw, adam, sgd"),
    ("scaling", "half", "accepted: unit, standard"),
    ("steps", 0, "steps must be a positive integer"),
    ("lr", -1.0, "lr must be a positive number"),
    ("grad_clip", 0.0, "grad_clip must be positive"),
    ("precision", "fp7", "unknown recipe 'fp7'; accepted: fp32"),
    ("device", "tpu", "unknown device 'tpu'"),
])
def test_bad_config_errors(tmp_path, text_file, field, value, match):
    with pytest.raises(ValueError, match=match):
        train(cfg(tmp_path, text_file, "bad", **{field: value}), model_fn=tiny)


def test_real_model_runs_and_unknown_model_lists_names(tmp_path, text_file):
    models = pytest.importorskip("unitscale.models", reason="unitscale.models not importable yet")
    with pytest.raises(ValueError, match="unknown model 'gpt9'; accepted: " + ", ".join(models.MODEL_NAMES)):
        train(cfg(tmp_path, text_file, "g9", model="gpt9"))
    s = train(cfg(tmp_path, text_file, "gpt", model="gpt", precision="fp8", steps=3, lr=None,
                  model_overrides={"d_model": 16, "n_layers": 1, "n_heads": 2}))
    assert s["status"] == "finished" and math.isfinite(s["valid_bpc"])


# Never lose a run ----------------------------------------------------------------------------------------

def test_fresh_run_into_a_run_is_refused_and_overwrite_replaces_it(tmp_path, text_file):
    from unitscale.train.rundir import RunDirError

    train(cfg(tmp_path, text_file, "r", steps=8), model_fn=tiny)
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunDirError, match="--resume to continue it or --overwrite to replace it"):
        train(cfg(tmp_path, text_file, "r", steps=4), model_fn=tiny)
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before  # untouched
    with pytest.raises(RunDirError, match="give one of them"):
        train(cfg(tmp_path, text_file, "r", steps=4, resume=True, overwrite=True), model_fn=tiny)
    s = train(cfg(tmp_path, text_file, "r", steps=4, overwrite=True), model_fn=tiny)
    assert s["step"] == 4 and checkpoint.load(tmp_path / "r" / "checkpoint.pt")["step"] == 4
    assert not (tmp_path / "r" / "checkpoint.prev.pt").exists() or \
        checkpoint.load(tmp_path / "r" / "checkpoint.prev.pt")["step"] < 4  # nothing of the old run kept


def test_run_lock_names_the_live_holder_and_takes_over_a_dead_ones(tmp_path):
    import os
    import subprocess
    import sys

    from unitscale.train.rundir import LOCK_NAME, RunDirError, RunLock

    code = ("import sys, time; from unitscale.train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died by SIGKILL: its pid is still written in the lock file, and the lock is free.
    assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, text_file, capsys):
    full = train(cfg(tmp_path, text_file, "full"), model_fn=tiny)
    train(cfg(tmp_path, text_file, "part", steps=12, stop_at=8), model_fn=tiny)
    d = tmp_path / "part"
    assert checkpoint.load(d / "checkpoint.pt")["step"] == 8
    assert checkpoint.load(d / "checkpoint.prev.pt")["step"] == 4
    data = (d / "checkpoint.pt").read_bytes()
    (d / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    resumed = train(cfg(tmp_path, text_file, "part", resume=True), model_fn=tiny)
    err = capsys.readouterr().err
    assert "checkpoint.pt' is truncated or corrupt" in err and "(step 4)" in err, err
    assert "weights_only=False" not in err
    assert (d / "checkpoint.pt.corrupt").is_file()  # kept for inspection, never loaded again
    assert resumed["final_loss"] == full["final_loss"] and resumed["test_bpc"] == full["test_bpc"]


def test_both_checkpoints_bad_names_both_files(tmp_path, text_file):
    train(cfg(tmp_path, text_file, "r", steps=8), model_fn=tiny)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / "r" / name).write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError) as err:
        train(cfg(tmp_path, text_file, "r", steps=8, resume=True), model_fn=tiny)
    msg = str(err.value)
    assert "checkpoint.pt' is truncated or corrupt" in msg and "checkpoint.prev.pt' is truncated" in msg, msg
    assert "weights_only=False" not in msg and "\n" not in msg


def test_stale_temporaries_of_killed_saves_are_removed_at_start(tmp_path, text_file):
    train(cfg(tmp_path, text_file, "r", steps=4), model_fn=tiny)
    stale = [tmp_path / "r" / f".checkpoint.pt.{i:08x}.tmp" for i in range(3)]
    for p in stale:
        p.write_bytes(b"partial")
    other = tmp_path / "r" / ".notes.tmp"
    other.write_text("not ours")
    train(cfg(tmp_path, text_file, "r", steps=8, resume=True), model_fn=tiny)
    assert not any(p.exists() for p in stale) and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_get_the_users_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        path = checkpoint.save_atomic({"x": torch.ones(2)}, tmp_path / "c.pt")
        checkpoint.save_atomic({"x": torch.zeros(2)}, path)  # a replacement, previous kept
    finally:
        os.umask(old)
    for p in (path, checkpoint.previous_path(path)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, oct(p.stat().st_mode)


def test_changed_data_is_refused_on_resume_unless_allowed(tmp_path, text_file):
    data = tmp_path / "data.txt"
    data.write_text(text_file.read_text())
    train(cfg(tmp_path, text_file, "r", steps=4, data=str(data)), model_fn=tiny)
    saved = checkpoint.load(tmp_path / "r" / "checkpoint.pt")["data"]
    assert saved["source"] == str(data.resolve()) and saved["size"] == data.stat().st_size
    import hashlib

    assert saved["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    data.write_text(text_file.read_text().replace("unit", "tinu"))  # same size, other content
    with pytest.raises(ValueError, match="data changed since the checkpoint.*--allow-data-change"):
        train(cfg(tmp_path, text_file, "r", steps=8, data=str(data), resume=True), model_fn=tiny)
    s = train(cfg(tmp_path, text_file, "r", steps=8, data=str(data), resume=True, allow_data_change=True),
              model_fn=tiny)
    assert s["step"] == 8


def test_summary_records_the_backend_that_ran(tmp_path, text_file, monkeypatch):
    """fp8-hw asks for the FP8 GEMM backend; without CUDA every matmul runs in simulation, and summary.json
    says so per matmul kind (the recipe entry keeps what was asked)."""
    pytest.importorskip("unitscale.models")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = train(cfg(tmp_path, text_file, "hw", model="gpt", precision="fp8-hw", steps=2, lr=None,
                  model_overrides={"d_model": 16, "n_layers": 1, "n_heads": 2}))
    saved = json.loads((tmp_path / "hw" / "summary.json").read_text())
    assert saved["backends"] == s["backends"]
    assert set(s["backends"]) == {"linear", "attention"}
    assert all(set(kinds) == {"simulate"} for kinds in s["backends"].values()), s["backends"]
    assert sum(s["backends"]["linear"].values()) == 5  # qkv, out, up, down, lm_head
    assert "backend=fp8" in s["recipe"]


def test_tensorboard_mirrors_the_jsonl_metrics(tmp_path, text_file):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(cfg(tmp_path, text_file, "tb"), model_fn=tiny)
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    rows = read_jsonl(tmp_path / "tb" / "metrics.jsonl")
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if r["event"] == "train"]
    assert [e.step for e in acc.Scalars("eval/valid_bpc")] == [0, 4, 8, 12]


def test_without_tensorboard_only_jsonl_is_written(tmp_path, text_file, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    train(cfg(tmp_path, text_file, "notb"), model_fn=tiny)
    assert not (tmp_path / "notb" / "tensorboard").exists()
    assert read_jsonl(tmp_path / "notb" / "metrics.jsonl")


def test_warmup_longer_than_steps_warns(tmp_path, text_file):
    with pytest.warns(UserWarning, match="--warmup 20 is longer than --steps 12"):
        train(cfg(tmp_path, text_file, "w", warmup=20), model_fn=tiny)


def test_set_options_owned_by_other_flags_or_of_the_wrong_type_are_refused(tmp_path, text_file):
    pytest.importorskip("unitscale.models")
    for overrides, match in (({"scaling": "standard"}, "scaling is set by --scaling"),
                             ({"vocab_size": 3}, "vocab_size is set by the data's vocabulary"),
                             ({"seq_len": 8}, "seq_len is set by --seq-len"),
                             ({"d_model": "wide"}, r"--set d_model='wide': expected int"),
                             ({"tau_mlp": "half"}, "expected float")):
        with pytest.raises(ValueError, match=match):
            train(cfg(tmp_path, text_file, "s", model="gpt", model_overrides=overrides))


# loss.png, progress ----------------------------------------------------------------------------------------

def test_smoothing_is_by_steps_and_adds_no_lag():
    from unitscale.train.metrics import smooth_by_steps

    steps = list(range(10, 1001, 10))  # every 10th step logged, as at the defaults
    line = [5.0 - 0.003 * s for s in steps]  # a falling loss: a trailing average would lag above it
    assert smooth_by_steps(steps, line) == pytest.approx(line, rel=1e-12, abs=1e-12)
    # the window is in steps: logging every step or every 10th gives the same curve at shared steps
    fine = list(range(1, 1001))
    curve = [math.exp(-s / 150) for s in fine]
    smooth_fine = dict(zip(fine, smooth_by_steps(fine, curve, window=60)))
    coarse = smooth_by_steps(steps, [curve[s - 1] for s in steps], window=60)
    inner = [(s, c) for s, c in zip(steps, coarse) if 40 <= s <= 960]  # away from the (different) ends
    # equal up to the curvature term f''·(var of 7 samples − var of 61)/2 ≈ 1.5e-3
    assert max(abs(c - smooth_fine[s]) for s, c in inner) < 3e-3
    wide = smooth_by_steps(steps, [curve[s - 1] for s in steps], window=600)  # 61 points, not 61 steps
    assert max(abs(w - smooth_fine[s]) for s, w in zip(steps, wide) if 40 <= s <= 960) > 0.05
    # (the old rule, a mean over the last 20 logged points, lags by ~95 steps at log_every 10)
    old = [sum(line[max(0, i - 19):i + 1]) / len(line[max(0, i - 19):i + 1]) for i in range(len(line))]
    assert old[-1] - line[-1] == pytest.approx(0.003 * 95, rel=1e-9)
    # reference: the mean over |step - s| <= h with h = min(30, s - first, last - s), written out here
    for s in (1, 5, 200, 999, 1000):
        h = min(30, s - 1, 1000 - s)
        window = [v for t, v in zip(fine, curve) if abs(t - s) <= h]
        assert smooth_fine[s] == pytest.approx(sum(window) / len(window), rel=1e-12)


def test_loss_plot_draws_logged_points_faintly_under_the_smoothed_line():
    from unitscale.train.metrics import curves_figure

    records = [{"event": "train", "step": s, "loss": 2.0 + (s % 7) / 10} for s in range(1, 201)]
    records += [{"event": "eval", "step": s, "valid_bpc": 3.0} for s in (0, 100, 200)]
    ax = curves_figure([("run", records)]).axes[0]
    raw, smooth, valid = ax.lines
    assert list(raw.get_xdata()) == list(range(1, 201)) and raw.get_alpha() <= 0.3
    assert smooth.get_alpha() > 0.5 and smooth.get_label() == "run (train)"
    assert max(smooth.get_ydata()) - min(smooth.get_ydata()) < max(raw.get_ydata()) - min(raw.get_ydata())
    assert list(valid.get_xdata()) == [0, 100, 200]


def test_progress_keeps_counter_bar_and_eta_at_80_columns():
    import io

    from rich.console import Console

    from unitscale.train.metrics import TrainProgress

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = TrainProgress(3000, "gpt-post/standard/fp8-critical-bf16", console=console, start=1200)
    bar.update(1200, tokens_per_s=12345.6, loss=3.21454, valid_bpc=2.98767,
               scales="blocks.2.body:matmul1.a (activation, fp8_e4b) RMS 2^-4.80 below the comfortable band")
    console.print(bar._progress.get_renderable())
    lines = buf.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "1200/3000" in lines[0] and "━" in lines[0] and re.search(r"-:--:--|\d:\d\d:\d\d", lines[0])
    assert lines[1].strip() == "loss 3.2145 · valid BPC 2.9877 · 12,346 tok/s"
    assert lines[2].startswith("  scales: blocks.2.body:matmul1.a") and lines[2].endswith("…")
