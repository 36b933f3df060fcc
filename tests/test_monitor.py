"""Scale-health monitor: statistics against torch's own float8/float16 casts and exact constructions, the
comfort and patience rules, zero work on unmonitored steps, the training-loop hook and ``plot-scales``."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unitscale as us
import unitscale.monitor as mon
from unitscale.cli import main as cli_main
from unitscale.monitor import ComfortRule, ScaleMonitor, ScaleWarning, TensorStats
from unitscale.nn import Linear
from unitscale.precision import Recipe, apply
from unitscale.precision.simulate import Simulate
from unitscale.train.loop import TrainConfig, train
from unitscale.train.metrics import read_jsonl

TORCH_DTYPES = {"fp8_e4b": torch.float8_e4m3fn, "fp8_e5b": torch.float8_e5m2,
                "fp8_e4a": torch.float8_e4m3fnuz, "fp16": torch.float16}


class ListLog:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def reference(t: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    """Fractions from torch's own cast and finfo (independent of unitscale.formats), rms in float64."""
    fi = torch.finfo(dtype)
    a = t.double().abs()
    finite = torch.isfinite(t)
    nz = finite & (t != 0)
    n = int(nz.sum())
    in_range = nz & (a <= fi.max)  # casts of out-of-range values differ by dtype; they are not flushed anyway
    underflow = (t.masked_fill(~in_range, 1.0).to(dtype).float() == 0) & in_range
    return {
        "overflow": int((nz & (a > fi.max)).sum()) / n,
        "subnormal": int((nz & (a < fi.tiny)).sum()) / n,
        "underflow": int(underflow.sum()) / n,
        "nonfinite": int((~finite).sum()) / t.numel(),
        "rms": math.sqrt(float(t.double().square().mean())) if bool(finite.all()) else math.nan,
        "nonzero": n,
    }


def log_uniform(shape, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(shape, generator=g) * (hi - lo) + lo)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    zeros = torch.rand(shape, generator=g) < 0.05
    return (mag * sign).masked_fill(zeros, 0.0)


def one_linear(fmt: str, grad_fmt: str, k: int = 64, n: int = 32) -> Linear:
    layer = Linear(k, n)
    layer.precision = Simulate(fmt, fmt, grad_fmt)
    return layer


def checked(monitor: ScaleMonitor, step: int, fn) -> dict[str, TensorStats]:
    with monitor.step(step):
        fn()
    return {s.tensor: s for s in monitor.last}


@pytest.mark.parametrize("fmt", ["fp8_e4b", "fp8_e5b", "fp8_e4a", "fp16"])
def test_statistics_match_torch_casts(fmt):
    f = us.formats.get_format(fmt)
    lo, hi = math.log2(f.min_subnormal) - 3, math.log2(f.max) + 2  # every bucket populated
    layer = one_linear(fmt, fmt)
    with torch.no_grad():
        layer.weight.copy_(log_uniform(layer.weight.shape, lo, hi, seed=1))
    x = log_uniform((48, 64), lo, hi, seed=2)
    x[0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    x.requires_grad_(True)
    g = log_uniform((48, 32), lo, hi, seed=3)
    monitor = ScaleMonitor(layer, every=1)
    got = checked(monitor, 1, lambda: layer(x).backward(g))
    assert set(got) == {"activation", "weight", "grad"}
    for name, t in (("activation", x.detach()), ("weight", layer.weight.detach()), ("grad", g)):
        ref, s = reference(t, TORCH_DTYPES[fmt]), got[name]
        assert s.format == fmt and s.module == ""
        assert 0 < ref["overflow"] and 0 < ref["underflow"] < ref["subnormal"]  # the test can fail
        for key in ("overflow", "subnormal", "underflow", "nonfinite", "nonzero"):
            assert getattr(s, key) == ref[key], (name, key)
        if name == "activation":
            assert math.isnan(s.rms) and s.nonfinite == 3 / x.numel()
        else:
            assert s.rms == pytest.approx(ref["rms"], rel=1e-5)


def test_known_fractions_exact():
    """1000 values of fp8_e4b: 100 zeros, 50 underflowing (2⁻¹¹), 150 kept subnormal (2⁻⁸), 680 normal (1),
    20 overflowing (1000): fractions of the 900 non-zero values, rms from the construction."""
    values = [0.0] * 100 + [2.0**-11] * 50 + [2.0**-8] * 150 + [1.0] * 680 + [1000.0] * 20
    random.Random(0).shuffle(values)
    x = torch.tensor(values).reshape(40, 25)
    layer = one_linear("fp8_e4b", "fp8_e5b", k=25, n=16)
    s = checked(ScaleMonitor(layer, every=1), 1, lambda: layer(x))["activation"]
    assert (s.overflow, s.subnormal, s.underflow, s.nonfinite, s.nonzero) == (20 / 900, 200 / 900, 50 / 900,
                                                                             0.0, 900)
    rms = math.sqrt((50 * 2.0**-22 + 150 * 2.0**-16 + 680 + 20 * 1e6) / 1000)
    assert s.rms == pytest.approx(rms, rel=1e-6)


def test_attention_matmuls_are_named_and_values_unchanged():
    torch.manual_seed(0)
    model = apply(us.models.build("gpt", 32, seq_len=16, d_model=32, n_layers=2), Recipe.fp8())
    idx = torch.randint(0, 32, (2, 17))
    monitor = ScaleMonitor(model, every=1)
    grads = []
    for step in (1, 2):
        with monitor.step(step) if step == 1 else torch.enable_grad():
            model.zero_grad()
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    names = {s.name for s in monitor.last}
    for t in ("matmul0.a", "matmul0.b", "matmul1.a", "matmul1.b", "matmul0.grad", "matmul1.grad"):
        assert f"blocks.0.body:{t}" in names
    assert {"lm_head:activation", "lm_head:weight", "lm_head:grad", "blocks.1.body.up:weight"} <= names
    for a, b in zip(*grads):  # observing changes no value: monitored and plain steps give the same gradients
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::unitscale.monitor.ScaleWarning")
def test_unmonitored_steps_do_nothing(monkeypatch):
    model = apply(us.models.build("gpt", 32, seq_len=16, d_model=32, n_layers=2), Recipe.fp8())
    before = {n: m.precision for n, m in model.named_modules() if hasattr(m, "precision")}
    calls = []
    real = mon.tensor_stats
    monkeypatch.setattr(mon, "tensor_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    monitor = ScaleMonitor(model, every=3)
    idx = torch.randint(0, 32, (2, 17))
    seen = []
    for step in range(1, 7):
        n0 = len(calls)
        with monitor.step(step):
            inside = {n: m.precision for n, m in model.named_modules() if hasattr(m, "precision")}
            model(idx[:, :-1], idx[:, 1:])[1].backward()
        if len(calls) > n0:
            seen.append(step)
        assert all(inside[n] is b for n, b in before.items()) != monitor.due(step)
        assert all(m.precision is before[n] for n, m in model.named_modules() if hasattr(m, "precision"))
    assert seen == [1, 3, 6]


def test_exception_restores_backends():
    model = apply(us.models.build("gpt", 32, seq_len=16, d_model=32, n_layers=2), Recipe.fp8())
    before = [m.precision for m in model.modules() if hasattr(m, "precision")]
    monitor = ScaleMonitor(model, every=1)
    with pytest.raises(RuntimeError, match="boom"), monitor.step(1):
        model(torch.randint(0, 32, (2, 16)))
        raise RuntimeError("boom")
    assert [m.precision for m in model.modules() if hasattr(m, "precision")] == before
    assert monitor._pending == []


def test_fp8_backend_observed_on_cpu():
    from unitscale.precision.fp8 import Dispatch, Fp8Backend, fp8_supported

    if not fp8_supported("cpu"):
        pytest.skip("torch._scaled_mm has no CPU FP8 path in this torch")
    layer = Linear(64, 32)
    layer.precision = Fp8Backend(dispatch=Dispatch.always(), activation_scale=4.0, grad_scale=0.5)
    x = log_uniform((32, 64), -12, 11, seed=4).requires_grad_(True)
    g = log_uniform((32, 32), -18, 17, seed=5)
    got = checked(ScaleMonitor(layer, every=1), 1, lambda: layer(x).backward(g))
    for name, t, dtype in (("activation", x.detach() / 4, torch.float8_e4m3fn),
                           ("weight", layer.weight.detach(), torch.float8_e4m3fn),
                           ("grad", g / 0.5, torch.float8_e5m2)):
        ref = reference(t, dtype)
        for key in ("overflow", "subnormal", "underflow", "nonzero"):
            assert getattr(got[name], key) == ref[key], (name, key)
        assert got[name].rms == pytest.approx(ref["rms"], rel=1e-5)
    # The default dispatch runs this small linear in the compute dtype: nothing is cast, nothing recorded.
    layer.precision = Fp8Backend()
    assert checked(ScaleMonitor(layer, every=1), 1, lambda: layer(x).backward(g)) == {}


def stats(rms=1.0, overflow=0.0, underflow=0.0, nonfinite=0.0, nonzero=100, fmt="fp8_e4b", tensor="grad"):
    return TensorStats("blocks.1.ffn", tensor, "grad", fmt, rms, overflow, underflow, underflow, nonfinite,
                       nonzero)


def test_comfort_band_values():
    rule = ComfortRule()
    assert rule.band("e4m3") == pytest.approx((-3.0, math.log2(448) - 3))
    assert rule.band("e5m2") == pytest.approx((-11.0, math.log2(57344) - 3))


@pytest.mark.parametrize(("kw", "bad", "why"), [
    ({}, False, ""),
    ({"rms": 2.0**-3}, False, ""),                       # band edges are inside
    ({"rms": 448 / 8}, False, ""),
    ({"rms": 2.0**-3.01}, True, "below the comfortable band"),
    ({"rms": 448 / 8 * 1.01}, True, "above the comfortable band"),
    ({"overflow": 1e-4}, False, ""),
    ({"overflow": 1.01e-4}, True, "overflow beyond ±448"),
    ({"underflow": 0.01}, False, ""),
    ({"underflow": 0.0101}, True, "underflow to zero"),
    ({"nonfinite": 1e-6}, True, "non-finite"),
    ({"rms": 0.0, "nonzero": 0}, False, ""),            # an all-zero tensor is exact in every format
    ({"rms": 2.0**-10, "fmt": "fp8_e5b"}, False, ""),    # E5M2's band reaches 2^-11
])
def test_comfort_rule(kw, bad, why):
    score, reason = ComfortRule().assess(stats(**kw))
    assert (score > 1) == bad
    assert (why in reason) if bad else reason == ""


@pytest.mark.parametrize(("fmt", "sigma", "comfortable"), [
    ("fp8_e4b", 1.0, True), ("fp8_e5b", 1.0, True), ("fp8_e4b", 2.0**-5, False), ("fp8_e4b", 2.0**6, False),
    ("fp8_e5b", 2.0**-10, True), ("fp8_e5b", 2.0**14, False),
])
def test_gaussian_tensors(fmt, sigma, comfortable):
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * sigma
    layer = one_linear(fmt, fmt, k=256, n=8)
    s = checked(ScaleMonitor(layer, every=1), 1, lambda: layer(x))["activation"]
    assert (ComfortRule().assess(s)[0] <= 1) == comfortable


def test_patience_warns_once_per_streak_naming_module_and_tensor():
    log = ListLog()
    monitor = ScaleMonitor(nn.Linear(2, 2), every=1, patience=3, log=log)
    pattern = "BBGBBBBGBBB"  # B: overflowing; warnings at the 3rd B of a run only
    warned_at = []
    for step, c in enumerate(pattern, start=1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor.update(step, [stats(overflow=0.5 if c == "B" else 0.0), stats(tensor="weight")])
        ours = [w for w in caught if issubclass(w.category, ScaleWarning)]
        if ours:
            assert len(ours) == 1
            message = str(ours[0].message)
            assert "blocks.1.ffn:grad" in message and "3 consecutive checks" in message
            warned_at.append(step)
    assert warned_at == [6, 11]
    events = [r for r in log.records if r["event"] == "scale_warning"]
    assert [(r["step"], r["module"], r["tensor"]) for r in events] == [(6, "blocks.1.ffn", "grad"),
                                                                       (11, "blocks.1.ffn", "grad")]
    assert sum(r["event"] == "scales" for r in log.records) == len(pattern)
    assert monitor.worst_text().startswith("blocks.1.ffn:grad: 5.00e-01 overflow")


def test_runs_logged_with_the_old_key_names_still_plot(tmp_path, capsys):
    """Runs logged before the rename wrote "saturated" / "flushed" for what is now overflow / underflow."""
    row = {"module": "blocks.0.ffn", "tensor": "grad", "role": "grad", "format": "fp8_e5b", "rms": 1.0,
           "saturated": 0.25, "subnormal": 0.5, "flushed": 0.125, "nonfinite": 0.0, "nonzero": 8}
    log = [{"event": "scales", "step": step, "tensors": [row]} for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    s = TensorStats.from_dict(row)
    assert (s.overflow, s.subnormal, s.underflow) == (0.25, 0.5, 0.125)
    history, formats = mon.scale_history(log)
    assert history["grad"]["blocks.0"].fractions == {"overflow": [0.25, 0.25], "subnormal": [0.5, 0.5],
                                                     "underflow": [0.125, 0.125]}
    assert formats == {"grad": ["fp8_e5b"]}
    assert cli_main(["plot-scales", str(tmp_path)]) == 0
    assert "blocks.0.ffn:grad: 2.50e-01 overflow beyond ±57344" in capsys.readouterr().out


@pytest.mark.parametrize(("every", "patience"), [(-1, 3), (1.5, 3), (10, 0), (10, True)])
def test_bad_arguments(every, patience):
    with pytest.raises(ValueError, match="every|patience"):
        ScaleMonitor(nn.Linear(2, 2), every=every, patience=patience)


# ---------------------------------------------------------------------------------------------------------
# The training loop and plot-scales
# ---------------------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding -> Linear -> ReLU (× gain) -> Linear readout; plain nn.Linear, quantised by the recipe."""

    def __init__(self, vocab_size: int, gain: float = 1.0, d: int = 16) -> None:
        super().__init__()
        self.gain = gain
        self.tok = nn.Embedding(vocab_size, d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(torch.relu(self.hidden(self.tok(idx))) * self.gain)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def run_cfg(tmp_path, text_file, name, **kw) -> TrainConfig:
    base = dict(model="tiny", precision="fp8", lr=1e-2, warmup=2, steps=8, batch_size=4, seq_len=16,
                eval_every=8, eval_windows=4, checkpoint_every=8, log_every=1, data=str(text_file),
                out_dir=str(tmp_path / name), quiet=True, monitor_every=2, monitor_patience=2)
    return TrainConfig(**{**base, **kw})


def test_training_loop_records_and_trajectory(tmp_path, text_file):
    on = train(run_cfg(tmp_path, text_file, "on"), model_fn=lambda c, v: TinyLM(v))
    off = train(run_cfg(tmp_path, text_file, "off", monitor_every=0), model_fn=lambda c, v: TinyLM(v))
    assert on["final_loss"] == off["final_loss"]  # bit-identical trajectory
    rec_on, rec_off = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("on", "off"))
    losses = [[r["loss"] for r in recs if r["event"] == "train"] for recs in (rec_on, rec_off)]
    assert losses[0] == losses[1]
    checks = [r for r in rec_on if r["event"] == "scales"]
    assert [r["step"] for r in checks] == [1, 2, 4, 6, 8]
    assert not any(r["event"] == "scales" for r in rec_off)
    names = {(t["module"], t["tensor"], t["format"]) for t in checks[0]["tensors"]}
    assert names == {("hidden", "activation", "fp8_e4b"), ("hidden", "weight", "fp8_e4b"),
                     ("hidden", "grad", "fp8_e5b"), ("head", "activation", "fp8_e4b"),
                     ("head", "weight", "fp8_e4b"), ("head", "grad", "fp8_e5b")}


def test_training_loop_warns_and_plot_scales(tmp_path, text_file, capsys):
    cfg = run_cfg(tmp_path, text_file, "hot")
    with pytest.warns(ScaleWarning, match=r"head:activation \(activation, fp8_e4b\).*2 consecutive checks"):
        train(cfg, model_fn=lambda c, v: TinyLM(v, gain=1e4))
    records = read_jsonl(tmp_path / "hot" / "metrics.jsonl")
    warned = [r for r in records if r["event"] == "scale_warning"]
    assert ("head", "activation", 2) in {(r["module"], r["tensor"], r["step"]) for r in warned}
    json.dumps(records)  # plain JSON, no NaN
    assert cli_main(["plot-scales", str(tmp_path / "hot")]) == 0
    png = tmp_path / "hot" / "scales.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert "head:activation" in capsys.readouterr().out


def test_plot_scales_errors(tmp_path, capsys):
    assert cli_main(["plot-scales", str(tmp_path / "missing")]) == 2
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    assert cli_main(["plot-scales", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "monitor_every > 0" in err


def test_config_validation():
    with pytest.raises(ValueError, match="monitor_every"):
        TrainConfig(monitor_every=-1).validate()
    with pytest.raises(ValueError, match="monitor_patience"):
        TrainConfig(monitor_patience=0).validate()


def test_layer_group():
    assert [mon.layer_group(p) for p in ("blocks.3.body.qkv", "blocks.12", "lm_head", "")] == [
        "blocks.3", "blocks.12", "lm_head", "<model>"]


def test_progress_bar_shows_worst_offender():
    from unitscale.train.metrics import TrainProgress

    with TrainProgress(10, "gpt/unit/fp8", enabled=False) as bar:
        monitor = ScaleMonitor(nn.Linear(2, 2), every=1, bar=bar)
        monitor.update(1, [stats(underflow=0.2, tensor="activation"), stats(tensor="weight")])
        shown = " ".join(str(t.description) + " " + " ".join(map(str, t.fields.values()))
                         for t in bar._progress.tasks)
    assert "blocks.1.ffn:activation: 20.00% underflow to zero" in shown
