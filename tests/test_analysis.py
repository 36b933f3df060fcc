"""Scale analysis: statistics against float64 / torch references, names, probes, outputs, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from unitscale.analysis import ScaleReport, track_scales
from unitscale.analysis.stats import hist_quantile, log2_histogram
from unitscale.formats import get_format, range_fractions

FORMATS_WITH_DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "fp16": torch.float16,
                      "bf16": torch.bfloat16}


class Echo(nn.Module):
    """Returns a copy of its input, so its output and grad_input are exactly known."""

    def forward(self, x):
        return x.clone()


def _track_tensor(values: torch.Tensor, grad: torch.Tensor, fmt: str) -> ScaleReport:
    x = values.clone().requires_grad_(True)
    return track_scales(Echo(), x, loss_fn=lambda out: (out * grad).sum(), fmt=fmt, ops=False)


# -- exact fractions on a known synthetic tensor ------------------------------------------------------------


def test_known_tensor_fractions_e4m3():
    # e4m3fn: min subnormal 2^-9, min normal 2^-6, max 448 (REFERENCE §3.1).
    # Finite non-zero: 9 values. Flushed (0 < |x| ≤ min_subnormal/2 = 2^-10; the tie rounds to even = 0):
    # 2^-11, 2^-10. Subnormal (|x| < 2^-6, flushed included): those two + 1.01·2^-10, 2^-8. Normal: 0.5, 1,
    # 448. Overflow (|x| > max, what saturation clamps): 449, 1000. Non-finite: inf and NaN, of 12 elements.
    vals = [0.0, 2**-11, -(2**-10), 2**-10 * 1.01, 2**-8, -0.5, 1.0, 448.0, 449.0, -1000.0,
            -math.inf, math.nan]
    t = torch.tensor(vals, dtype=torch.float32)
    g = torch.tensor([1.0] * 6 + [2.0**-12] * 6)
    rep = _track_tensor(t, g, "e4m3")
    out, gin = rep["model / output"], rep["model / grad_input"]
    counted = 9
    assert out.underflow == pytest.approx(2 / counted, abs=0)
    assert out.subnormal == pytest.approx(4 / counted, abs=0)
    assert out.overflow == pytest.approx(2 / counted, abs=0)
    assert out.nonfinite == pytest.approx(2 / 12, abs=0)
    assert out.absmax == 1000.0
    finite = np.array([v for v in vals if math.isfinite(v)], dtype=np.float64)
    assert out.rms == pytest.approx(math.sqrt((finite**2).sum() / finite.size), rel=1e-12)
    # Gradient: six ones (normal) and six 2^-12 (flushed: below 2^-10).
    assert (gin.underflow, gin.subnormal, gin.overflow, gin.nonfinite) == (0.5, 0.5, 0.0, 0.0)
    assert gin.rms == pytest.approx(math.sqrt((6 + 6 * 2.0**-24) / 12), rel=1e-12)


@pytest.mark.parametrize("fmt", sorted(FORMATS_WITH_DTYPE))
@pytest.mark.parametrize("seed", [0, 1])
def test_fractions_match_torch_casts(fmt, seed):
    """Independent reference: torch's own RNE cast to the format (flush = non-zero that casts to 0) and
    torch.finfo (subnormal: |x| < tiny; overflow: |x| > max)."""
    gen = torch.Generator().manual_seed(seed)
    f = get_format(fmt)
    lo, hi = math.log2(f.min_subnormal) - 3, min(math.log2(f.max) + 2, 127.5)  # finite in float32
    mag = torch.exp2(torch.rand(50_000, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    x = (mag * torch.where(torch.rand(50_000, generator=gen) < 0.5, -1.0, 1.0).double()).float()
    rep = _track_tensor(x, torch.ones_like(x), fmt)
    r = rep["model / output"]
    dtype = FORMATS_WITH_DTYPE[fmt]
    fi = torch.finfo(dtype)
    a = x.abs().double()
    in_range = a <= fi.max
    flushed = (x[in_range].to(dtype).float() == 0).sum().item() / x.numel()
    assert r.underflow == pytest.approx(flushed, abs=0)
    assert r.subnormal == pytest.approx((a < fi.tiny).double().mean().item(), abs=0)
    assert r.overflow == pytest.approx((a > fi.max).double().mean().item(), abs=0)
    # The same numbers as the formats module's own one-call API.
    assert {k: getattr(r, k) for k in ("underflow", "subnormal", "overflow")} == {
        k: v for k, v in range_fractions(x, fmt).items() if k in ("underflow", "subnormal", "overflow")
    }


@pytest.mark.parametrize("scale_log2", [-20, -3, 0, 5, 40])
def test_rms_absmax_spread_vs_float64(scale_log2):
    gen = torch.Generator().manual_seed(scale_log2 + 100)
    x = torch.randn(3, 257, generator=gen) * 2.0**scale_log2
    r = _track_tensor(x, torch.ones_like(x), "e5m2")["model / output"]
    x64 = x.double().numpy()
    assert r.rms == pytest.approx(float(np.sqrt(np.mean(x64**2))), rel=1e-12)
    assert r.absmax == float(np.abs(x64).max())
    assert r.mean == pytest.approx(float(x64.mean()), rel=1e-9, abs=1e-12 * 2.0**scale_log2)
    # Spread: quantiles of log2|x| from a quarter-octave histogram agree with numpy within one bin.
    ref = np.quantile(np.log2(np.abs(x64)), [0.01, 0.99])
    assert np.abs(np.array(r.spread) - ref).max() <= 0.25
    assert r.shape == (3, 257) and r.dtype == "float32" and r.numel == 3 * 257


def test_histogram_counts_and_edges():
    x = torch.tensor([0.0, 1.0, 1.1, 2.0, -3.0, math.inf, math.nan, 2.0**-149])
    h = log2_histogram(x).numpy()
    assert h.sum() == x.numel()
    assert h[0] == 1 and h[-1] == 2
    assert hist_quantile(h, 0.0) == pytest.approx(-149.0)
    assert hist_quantile(np.zeros_like(h), 0.5) != hist_quantile(np.zeros_like(h), 0.5)  # NaN when empty
    with pytest.raises(ValueError, match="quantile"):
        hist_quantile(h, 1.5)


# -- what gets recorded, with which name, and that gradients are per module ---------------------------------


class Block(nn.Module):
    """y = x + fc(norm(x)): the block's grad_input differs from fc's (skip path)."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Attn(nn.Module):
    """Functional ops inside a forward: they must appear as ``path / op``."""

    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.matmul(p, v)


def test_per_module_gradients_vs_float64():
    torch.manual_seed(0)
    d = 8
    model = nn.Sequential(Block(d), nn.Tanh(), nn.Linear(d, 3)).double()
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    G = torch.randn(5, 3, dtype=torch.float64)
    rep = track_scales(model, x, loss_fn=lambda y: (y * G).sum(), fmt="e5m2")
    # float64 reference by hand.
    blk, lin = model[0], model[2]
    with torch.no_grad():
        h = blk.norm(x)
        u = blk.fc(h)
        y0 = x + u
        t = torch.tanh(y0)
        g_t = G @ lin.weight  # grad_input of the final Linear
        g_y0 = g_t * (1 - t**2)  # grad_input of Tanh
        g_h = g_y0 @ blk.fc.weight  # grad_input of block.fc
    def rms(v):
        return v.pow(2).mean().sqrt().item()

    assert rep["2 / grad_input"].rms == pytest.approx(rms(g_t), rel=1e-12)
    assert rep["1 / grad_input"].rms == pytest.approx(rms(g_y0), rel=1e-12)
    assert rep["0.fc / grad_input"].rms == pytest.approx(rms(g_h), rel=1e-12)
    assert rep["0.fc / output"].rms == pytest.approx(rms(u), rel=1e-12)
    assert rep["0 / output"].rms == pytest.approx(rms(y0), rel=1e-12)
    assert rep["2 / weight.grad"].rms == pytest.approx(rms(G.T @ t), rel=1e-12)
    assert rep["0.fc / weight"].rms == pytest.approx(rms(blk.fc.weight), rel=1e-12)
    # The block's input gradient takes the skip path too: g_y0 + (LayerNorm backward of g_h).
    x2 = x.detach().clone().requires_grad_(True)
    (blk(x2) * g_y0).sum().backward()
    assert rep["0 / grad_input"].rms == pytest.approx(rms(x2.grad), rel=1e-12)
    assert rep["0 / grad_input"].rms != pytest.approx(rep["0.fc / grad_input"].rms, rel=1e-3)
    assert all(r.dtype == "float64" for r in rep.records)


def test_functional_ops_named_and_probed():
    torch.manual_seed(1)
    model = nn.Sequential(Attn(16))
    x = torch.randn(2, 6, 16, requires_grad=True)
    G = torch.randn(2, 6, 16)
    rep = track_scales(model, x, loss_fn=lambda y: (y * G).sum())
    names = {r.name for r in rep.records}
    for n in ["0 / matmul", "0 / softmax", "0 / matmul#2", "0 / softmax.grad_input",
              "0 / matmul#2.grad_input[0]", "0 / matmul#2.grad_input[1]", "0.qkv / output",
              "0.qkv / weight", "0.qkv / weight.grad", "0 / output", "0 / grad_input", "model / output"]:
        assert n in names, n
    # nn.Linear's own F.linear is the module itself: not repeated as an op.
    assert not any(r.op.startswith("linear") for r in rep.records)
    # grad of p in p @ v is G @ vᵀ; of v is pᵀ @ G.
    with torch.no_grad():
        q, k, v = model[0].qkv(x).chunk(3, dim=-1)
        p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    assert rep["0 / softmax"].rms == pytest.approx(rms(p), rel=1e-6)
    assert rep["0 / matmul#2.grad_input[0]"].rms == pytest.approx(rms(G @ v.transpose(-1, -2)), rel=1e-5)
    assert rep["0 / matmul#2.grad_input[1]"].rms == pytest.approx(rms(p.transpose(-1, -2) @ G), rel=1e-5)
    assert rep["0 / softmax"].site == rep["0 / softmax.grad_input"].site == "0 / softmax"
    # Forward records come before backward ones; the report keeps execution order.
    dirs = [r.direction for r in rep.records]
    assert dirs == sorted(dirs, key=lambda d: d == "backward")


def test_transformer_encoder_names_and_default_backward():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    x = torch.randn(2, 10, 32)
    rep = track_scales(model, x, fmt="e4m3")  # no loss: unit-Gaussian output gradient
    names = {r.name for r in rep.records}
    for i in range(3):
        for n in [f"layers.{i}.linear1 / output", f"layers.{i}.linear1 / grad_input",
                  f"layers.{i}.self_attn / output", f"layers.{i}.linear2 / weight.grad",
                  f"layers.{i}.norm1 / weight", f"layers.{i} / relu", f"layers.{i} / relu.grad_input",
                  f"layers.{i}.self_attn.out_proj / weight.grad"]:
            assert n in names, n
        # q, k and v are the same tensor: three gradients; none for layer 0, whose input needs no grad.
        attn_grads = {f"layers.{i}.self_attn / grad_input[{j}]" for j in range(3)}
        assert attn_grads <= names if i > 0 else not attn_grads & names
    # The output gradient is N(0, 1): the last layer's norm receives it unchanged.
    g = rep["layers.2.norm2 / output"]
    assert g.rms == pytest.approx(1.0, rel=0.02)  # LayerNorm output, unit by construction
    assert all(math.isfinite(r.rms) and r.nonfinite == 0 for r in rep.records)


def test_bert_style_model():
    pytest.importorskip("unitscale.functional", reason="unitscale.models needs unitscale.functional")
    from unitscale.models.bert import BertConfig, BertEncoder

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertEncoder(cfg)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    rep = track_scales(model, {"input_ids": ids, "attention_mask": mask})
    assert len(rep) > 40
    bwd = [r for r in rep.records if r.direction == "backward"]
    assert any(".0." in r.module and r.role == "gradient" for r in bwd)
    assert any(r.role == "weight_grad" and "embeddings" in r.module for r in bwd)


def test_loss_from_model_output_and_state_restored():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y, y.pow(2).mean()

    torch.manual_seed(0)
    model = WithLoss()
    old = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = old
    x = torch.randn(3, 4)
    rep = track_scales(model, (x,))
    with torch.no_grad():
        y = model.fc(x)
    ref = (2 * y / y.numel()).T @ x  # d mean(y²)/dW
    assert rep["fc / weight.grad"].rms == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-6)
    assert model.fc.weight.grad is old and model.fc.bias.grad is None
    assert not model._forward_hooks and not model.fc._forward_pre_hooks
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_nonfinite_is_reported():
    x = torch.randn(100)
    x[3] = math.nan
    r = _track_tensor(x, torch.ones_like(x), "e4m3")["model / output"]
    assert r.nonfinite == pytest.approx(0.01, abs=0)
    assert math.isfinite(r.rms)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: track_scales(Echo(), torch.ones(2, requires_grad=True), fmt="e9m9"), "e4m3"),
        (lambda: track_scales(Echo(), torch.ones(2, requires_grad=True), fmt="int8"), "integer"),
        (lambda: track_scales(lambda x: x, torch.ones(2)), "nn.Module"),
        (lambda: track_scales(Echo(), torch.ones(2, requires_grad=True), loss_fn=lambda y: y), "one-element"),
        (lambda: track_scales(Echo(), torch.ones(2)), "requires grad"),
        (lambda: track_scales(Echo(), torch.ones(2, requires_grad=True)).select(roles=["x"]), "activation"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- outputs: JSON, table, plot ----------------------------------------------------------------------------


def test_json_table_plot(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Block(8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(4, 8, requires_grad=True)
    x.data[0, 0] = math.inf  # a non-finite value must survive JSON (as null) and the plot
    rep = track_scales(model, x, fmt="e5m2")
    data = json.loads(rep.to_json(tmp_path / "s.json"))
    assert data["format"] == "fp8_e5b" and len(data["records"]) == len(rep)
    assert json.loads((tmp_path / "s.json").read_text()) == data
    rec = data["records"][0]
    for key in ("name", "site", "role", "direction", "rms", "absmax", "overflow", "subnormal", "underflow",
                "spread", "log2_rms", "nonfinite", "shape"):
        assert key in rec
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(rep.table())
    text = console.export_text()
    assert "0.fc / grad_input" in text and "underflow" in text
    fig = rep.plot(tmp_path / "s.png", fmt="fp16")
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == rep.sites() and "0.fc / weight" in labels


# -- unit-scaled vs standard models at initialisation ----------------------------------------------------


class UnitLinear(nn.Module):
    """A unit-scaled linear on a chain (every edge cut): α = m^-½, β_x = n^-½, β_W = b^-½ (REFERENCE §2)."""

    def __init__(self, m, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m))

    def forward(self, x):
        from unitscale.precision.backend import EXACT

        n, m = self.weight.shape
        b = x.numel() // m
        return EXACT.linear(x, self.weight, alpha=m**-0.5, beta_x=n**-0.5, beta_w=b**-0.5)


class UnitReLU(nn.Module):
    def forward(self, x):
        from unitscale.scale import scaled

        return scaled(torch.relu(scaled(x, 1.0, math.sqrt(2.0))), math.sqrt(2 / (1 - 1 / math.pi)), 1.0)


def _mlp(unit: bool, d: int = 64, depth: int = 6) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [UnitLinear(d, 4 * d), UnitReLU(), UnitLinear(4 * d, d)] if unit else [
            nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers)


def test_unit_mlp_stays_unit_and_standard_does_not():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    unit = track_scales(_mlp(unit=True, d=32), x, fmt="e4m3")
    std = track_scales(_mlp(unit=False, d=32), x, fmt="e4m3")
    assert len(unit) > 6 * 6 and len(std) > 6 * 6
    assert all(-3 <= r.log2_rms <= 3 for r in unit.records), [
        (r.name, r.log2_rms) for r in unit.records if not -3 <= r.log2_rms <= 3]
    grads = [r for r in std.records if r.role in ("gradient", "weight_grad")]
    assert any(abs(r.log2_rms) > 3 for r in grads)
    # The same story in format terms: nothing of the unit model overflows e4m3; the standard one does.
    assert max(r.overflow for r in unit.records) == 0
    assert max(r.overflow + r.underflow for r in std.records) > 0.01


def _gpt_reports(n_layers: int = 2, seed: int = 0) -> dict[str, ScaleReport]:
    pytest.importorskip("unitscale.functional", reason="unit-scaled GPT needs unitscale.functional (pending)")
    from unitscale.models import build

    reports = {}
    for scaling in ("unit", "standard"):
        torch.manual_seed(seed)
        model = build("gpt", 64, scaling=scaling, n_layers=n_layers, seq_len=64)
        idx = torch.randint(0, 64, (8, 65), generator=torch.Generator().manual_seed(seed))
        reports[scaling] = track_scales(model, (idx[:, :-1], idx[:, 1:]), fmt="e4m3")
    return reports


def test_gpt_unit_vs_standard_at_init():
    reports = _gpt_reports()
    unit, std = reports["unit"], reports["standard"]
    off = [(r.name, round(r.log2_rms, 2)) for r in unit.records
           if r.numel > 1 and math.isfinite(r.log2_rms) and not -3 <= r.log2_rms <= 3]
    assert not off, off
    # unitscale ops are recorded as whole ops (after α and β), not their torch internals
    assert any(r.name.endswith("norm / layer_norm") for r in unit.records)
    assert any(r.name.endswith("norm / weight.grad") for r in unit.records)
    std_grads = [r for r in std.records if r.role in ("gradient", "weight_grad") and r.numel > 1]
    assert std_grads and any(not -3 <= r.log2_rms <= 3 for r in std_grads)


def test_cli_analyse(tmp_path):
    pytest.importorskip("unitscale.functional", reason="GPT needs unitscale.functional (pending)")
    from unitscale.cli import main

    out, js = tmp_path / "scales.png", tmp_path / "scales.json"
    rc = main(["analyse", "--model", "gpt", "--scaling", "unit", "--format", "e4m3", "--out", str(out),
               "--json", str(js), "--layers", "2", "--seq-len", "32", "--batch-size", "2",
               "--vocab-size", "50"])
    assert rc == 0 and out.stat().st_size > 10_000
    data = json.loads(js.read_text())
    assert data["format"] == "fp8_e4b" and any(r["role"] == "weight_grad" for r in data["records"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--format", "e9m9"], "e4m3"),
        (["--batch-size", "0"], "batch-size"),
        (["--set", "oops"], "KEY=VALUE"),
        (["--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
    ],
)
def test_cli_errors(argv, match, tmp_path):
    import argparse

    from unitscale.commands import analyse

    parser = argparse.ArgumentParser()
    analyse.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "x.png"), *argv])
    with pytest.raises((ValueError, FileNotFoundError), match=match):  # the CLI maps both to exit code 2
        analyse.run(args)


@pytest.mark.parametrize("precision", ["int4"])  # INT4: the recipe owns state (LSQ step sizes) too
def test_cli_analyse_reads_model_recipe_and_vocab_from_a_train_or_demo_checkpoint(tmp_path, precision):
    """The demo's configuration (its own d_model, layers, seq_len, vocabulary of the data file), trained two
    steps; analyse rebuilds that model (INT4: its step sizes exist before the weights load) and records the
    trained weights, not a fresh initialisation."""
    from dataclasses import replace

    import torch

    from unitscale.cli import main
    from unitscale.train.demo import demo_config
    from unitscale.train.loop import train

    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    run = tmp_path / "run"
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2}
    cfg = replace(demo_config(run, steps=2, data=str(data)), precision=precision, eval_windows=2,
                  batch_size=4, vocab_min_count=1, monitor_every=0, model_overrides=model)
    train(cfg)
    js = tmp_path / "scales.json"
    rc = main(["analyse", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "s.png"),
               "--json", str(js), "--batch-size", "2"])
    assert rc == 0
    records = {r["name"]: r for r in json.loads(js.read_text())["records"]}
    weight = torch.load(run / "checkpoint.pt", weights_only=True)["model"]["tok.weight"]
    rms = float(weight.double().pow(2).mean().sqrt())
    got = records["tok / weight"]
    assert got["numel"] == weight.numel() == 29 * 32  # 26 letters, space, full stop, unknown; d_model 32
    assert 2 ** got["log2_rms"] == pytest.approx(rms, rel=1e-4)
    assert main(["analyse", "--checkpoint", str(run), "--out", str(tmp_path / "d.png")]) == 0  # the run dir
