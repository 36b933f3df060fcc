"""unitscale.export: plain-torch models equal to the unit-scaled ones; weights_only state_dicts; overrides.

Tolerances: exported vs unit model in float32, |Δ| ≤ 1e-5 + 1e-5·|y| (scales folded into weights change
only the rounding order). Independent references: REFERENCE §2 closed forms computed here in float64,
torch's float8_e4m3fn cast for the FP8 override check.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unitscale
import unitscale.export as ux
import unitscale.functional as U
import unitscale.nn as unn
from unitscale import models, precision
from unitscale.export import export, export_program, unitscale_references
from unitscale.models.bert import BertConfig, BertEncoder
from unitscale.precision import Recipe
from unitscale.transforms import unit_scale

VOCAB = 48
SMALL = {"seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 2}
FAMILIES = [*models.MODEL_NAMES, "gpt-tied"]


@pytest.fixture(autouse=True, scope="module")
def _activation_constants_cached():
    # rules.activation_constants fails when first called under torch.no_grad (reported to the lead);
    # export itself is immune (it traces under enable_grad), the unit models' reference runs are not.
    for name in ("relu", "gelu"):
        unitscale.rules.activation_constants(name, 1.0)


def _model(family: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    if family == "gpt-tied":
        return models.build("gpt", VOCAB, tie_embeddings=True, **{**SMALL, **overrides})
    return models.build(family, VOCAB, **{**SMALL, **overrides})


def _batch(seed: int, batch: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g), torch.randint(
        0, VOCAB, (batch, length), generator=g
    )


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _plain(gm: nn.Module) -> None:
    assert unitscale_references(gm) == []
    assert "unitscale" not in gm.code
    for module in gm.modules():
        assert not type(module).__module__.startswith("unitscale"), type(module)


# -- scale laws (the rules state them; export evaluates them in the graph) -----------------------------------


@pytest.mark.parametrize(
    ("scales", "constraint", "c", "k"),
    [
        (unitscale.rules.attention_rule(7), None, math.exp(-0.5), {"s": 0.5}),
        (unitscale.rules.softmax_rule(7), None, 1 / math.sqrt(math.e - 1), {"s": 1.0}),
        (unitscale.rules.matmul_rule(3, 5, 7), "gmean", 1.0, {"b": -1 / 6, "m": -1 / 6, "n": -1 / 6}),
        (unitscale.rules.linear_rule(3, 5, 7), "gmean", 1.0, {"fan_in": -0.25, "fan_out": -0.25}),
    ],
)
def test_rule_laws_match_closed_forms(scales, constraint, c, k):
    law = scales.resolve_laws(constraint)[0]
    assert law.coefficient == pytest.approx(c, rel=1e-12)
    assert dict(law.exponents) == pytest.approx(k, abs=1e-12)


@pytest.mark.parametrize("constraint", ["gmean", "to_output", None])
def test_rule_laws_give_the_rule_at_other_sizes(constraint):
    """The resolved law, built from the rule at one set of sizes, equals the rule at others."""
    R = unitscale.rules
    cases = [
        (lambda b, m, n: R.matmul_rule(b, m, n), ("b", "m", "n")),
        (lambda b, m, n: R.linear_rule(b, m, n), ("fan_in", "fan_out", "rows")),
        (lambda b, m, n: R.add_rule(b, m), ("left", "right", "unused")),
        (lambda b, m, n: R.softmax_rule(b, 0.7), ("s", "x", "y")),
        (lambda b, m, n: R.attention_rule(b, 0.1), ("s", "x", "y")),
    ]
    for rule, names in cases:
        alpha_law, beta_laws = rule(2, 3, 5).resolve_laws(constraint)
        for sizes in ((37, 101, 7), (3, 1000, 250)):
            alpha, betas = rule(*sizes).resolve(constraint)
            named = dict(zip(names, sizes))
            assert alpha_law(**named) == pytest.approx(alpha, rel=1e-12)
            for name, beta in betas.items():
                assert beta_laws[name](**named) == pytest.approx(beta, rel=1e-12)


# -- exported models equal the unit-scaled ones ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_unit_model(family):
    model = _model(family)
    model.train()
    idx, targets = _batch(1)
    gm = export(model, idx, targets)
    _plain(gm)
    assert all(m.training for m in model.modules()), "export must restore the training flags"
    model.eval()
    with torch.no_grad():
        logits, loss = model(idx, targets)
        got_logits, got_loss = gm(idx, targets)
    _close(got_logits, logits)
    _close(got_loss, loss)
    # logits only: `targets` keeps its default
    only = export(model, idx)
    _close(only(idx)[0], logits)
    assert only(idx)[1] is None


def test_tied_export_keeps_one_table():
    with torch.no_grad():  # export works under a caller's no_grad
        gm = export(_model("gpt-tied"), _batch(0)[0])
    names = [name for name, _ in gm.named_parameters()]
    assert "tok.weight" in names and not any(n.startswith("lm_head") for n in names)


@pytest.mark.parametrize("length", [5, 16])
def test_gpt_attention_scale_follows_sequence_length(length):
    """Exported at length 12, run at another length: the SDPA α = √(s/e) is computed in the graph."""
    model = _model("gpt").eval()
    gm = export(model, _batch(0)[0])
    idx = _batch(2, batch=3, length=length)[0]
    with torch.no_grad():
        _close(gm(idx)[0], model(idx)[0])


def test_rnn_specialisation_is_guarded():
    model = _model("rnn").eval()
    gm = export(model, _batch(0, length=12)[0])
    with pytest.raises(AssertionError, match="specialised"):
        gm(_batch(0, length=9)[0])


@pytest.mark.parametrize("recipe", ["fp8", "int4"])
def test_export_drops_backends(recipe):
    model = _model("gpt", d_model=64).eval()
    idx = _batch(3)[0]
    with torch.no_grad():
        exact = model(idx)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision.apply(model, recipe)
    with torch.no_grad():
        quantised = model(idx)[0]
    before = {name: getattr(m, "precision", None) for name, m in model.named_modules()}
    gm = export(model, idx)
    _plain(gm)
    assert before == {name: getattr(m, "precision", None) for name, m in model.named_modules()}
    assert (quantised - exact).abs().max() > 1e-3  # the recipe really quantises
    _close(gm(idx)[0], exact)


class _Ops(nn.Module):
    """Every functional op the converters know, with broadcasting and size-dependent scales."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 16))
        self.bias = nn.Parameter(torch.randn(24))
        self.gain = nn.Parameter(torch.randn(16))
        self.table = nn.Parameter(torch.randn(10, 16))
        self.rms = unn.RMSNorm(16)
        self.soft = unn.Softmax(mult=0.7)
        self.sig = unn.Sigmoid(mult=2.0)
        self.gelu = unn.GELU("tanh", constraint="to_output")

    def forward(self, x, ids, target):
        h = U.add(x, self.gain)  # broadcast: α depends on the broadcast ratio
        h = U.weighted_add(self.rms(h), U.layer_norm(x, 16, self.gain, None), 0.6, 0.8)
        h = U.rms_norm(U.silu(h, mult=1.5), 16, self.gain)
        a = U.matmul(h, h.transpose(-1, -2))  # (b, t, t): α from (b·m·n)
        h = U.matmul(self.soft(a), h, constraint="to_output")
        h = U.softmax(h, dim=1) + self.sig(h) + U.tanh(h) + U.relu(h) + self.gelu(h)
        h = U.dropout(h, 0.3, training=False) + U.embedding(ids, self.table)
        logits = U.linear(h, self.w, self.bias, constraint="to_output") + U.scaled(h, 2.0, 3.0).sum(
            -1, keepdim=True
        )
        out = U.linear_readout(logits, self.w.t().contiguous())
        ce = U.cross_entropy(logits, target, ignore_index=0)
        none = U.cross_entropy(logits, target, reduction="none")
        fixed = U.cross_entropy(logits, target, grad_rows=7.0)
        return out, ce, none, fixed


@pytest.mark.parametrize("shape", [(2, 5), (3, 11)])
def test_functional_ops_symbolic_export(shape):
    torch.manual_seed(0)
    module = _Ops().double()  # float64: a long chain of ops, compared to 1e-10
    gm = export(module)  # no example inputs: purely symbolic, every size-dependent α in the graph
    _plain(gm)
    b, t = shape
    x, ids = torch.randn(b, t, 16, dtype=torch.float64), torch.randint(0, 10, (b, t))
    target = torch.randint(0, 24, (b, t))
    target[0, 0] = 0  # an ignored row
    with torch.no_grad():
        for got, want in zip(gm(x, ids, target), module(x, ids, target)):
            _close(got, want, tol=1e-10)


def test_cross_entropy_all_ignored_is_zero():
    class CE(nn.Module):
        def forward(self, logits, target):
            return U.cross_entropy(logits, target, ignore_index=3)

    gm = export(CE())
    target = torch.full((4,), 3)
    assert gm(torch.randn(4, 5), target).item() == 0.0 == CE()(torch.randn(4, 5), target).item()


@pytest.mark.parametrize(
    ("fan_in", "fan_out", "constraint"), [(32, 96, "gmean"), (16, 8, "to_output"), (64, 64, None)]
)
def test_linear_weight_folding_closed_form(fan_in, fan_out, constraint):
    """Folded nn.Linear weight = α·W with α from REFERENCE §2: gmean (in·out)^-¼, to_output/None in^-½."""
    torch.manual_seed(0)
    lin = unn.Linear(fan_in, fan_out, constraint=constraint)
    gm = export(nn.Sequential(lin))  # as a submodule (a root's own forward is traced through)
    alpha = (fan_in * fan_out) ** -0.25 if constraint == "gmean" else fan_in**-0.5
    (plain,) = [m for m in gm.modules() if type(m) is nn.Linear]
    torch.testing.assert_close(plain.weight.double(), lin.weight.double() * alpha, rtol=1e-7, atol=0)
    assert torch.equal(plain.bias, lin.bias)
    x = torch.randn(5, fan_in)
    _close(gm(x), lin(x))


@pytest.mark.parametrize("s", [3, 40])
def test_sdpa_scale_closed_form(s):
    """Unit SDPA exports as F.sdpa · √(s/e) (REFERENCE §2, US-2023 rule), checked against float64."""

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return U.scaled_dot_product_attention(q, k, v, is_causal=False)

    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(2, 3, s, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v) * math.sqrt(s / math.e)
    _close(export(Attn())(q, k, v), want, tol=1e-12)


def test_transformer_layer_and_plain_bert_export():
    torch.manual_seed(0)
    layer = unn.TransformerLayer(32, 4, 64, dropout=0.1, activation="gelu", norm_first=False, is_causal=True)
    x = torch.randn(2, 10, 32)
    gm = export(layer, x)
    _plain(gm)
    assert layer.training
    with torch.no_grad():
        _close(gm(x), layer.eval()(x))
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    bert = BertEncoder(config).eval()
    ids, mask = torch.randint(0, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    gm = export(bert, ids, mask)
    with torch.no_grad():
        _close(gm(ids, mask), bert(ids, mask))


# -- converted models (unitscale.transforms: softmax_at, matmul_at, attention_at, UnitMultiheadAttention) --


def _padded_batch(
    seed: int, batch: int, length: int, vocab=(1000, 2000)
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(*vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    return ids, mask


def test_converted_minilm_export():
    """MiniLM classifier → unit_scale (init="keep") → export: plain torch, equal to the converted model and
    (float32 rounding aside) to the original, also at a batch shape other than the example's."""
    from unitscale.models.bert import BertClassifier, load_minilm

    encoder, _ = load_minilm(max_len=32)
    torch.manual_seed(0)
    model = BertClassifier(encoder, 11).eval()
    ids, mask = _padded_batch(0, 2, 12)
    unit = unit_scale(model, example_inputs=(ids, mask), attention_mask=mask)
    gm = export(unit, ids, mask)
    _plain(gm)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())  # BERT attention is SDPA
    for batch in ((ids, mask), _padded_batch(1, 3, 20)):
        with torch.no_grad():
            got, want, original = gm(*batch), unit(*batch), model(*batch)
        _close(got, want)
        _close(got, original, tol=1e-4)


def _encoder_stack(batch_first: bool, norm_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
    with torch.no_grad():  # norm gains/biases away from 1/0, as after training
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.double().eval()


def _src(batch_first: bool, batch: int, length: int, seed: int) -> torch.Tensor:
    x = torch.randn(batch, length, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("init", ["keep", "unit"])
@pytest.mark.parametrize(("batch_first", "norm_first"), [(True, False), (False, True)])
def test_converted_transformer_encoder_export(batch_first, norm_first, init):
    """nn.TransformerEncoder → unit_scale → export: plain torch, equal to the converted model (float64,
    1e-10) at the example length and another; with init="keep" equal to the original. init="unit" has no
    target: the attention α(s) is computed in the graph. Converted per argument set (the capture's)."""
    model = _encoder_stack(batch_first, norm_first)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = pad[2, 2:] = True  # True = padding, as nn.MultiheadAttention
    for kwargs in ({}, {"src_key_padding_mask": pad}):
        unit = unit_scale(model, {"src": _src(batch_first, 3, 7, seed=3), **kwargs}, init=init)
        gm = export(unit)
        _plain(gm)
        for batch, length in ((4, 10), (3, 7)):
            if kwargs and (batch, length) != (3, 7):
                continue
            src = _src(batch_first, batch, length, seed=batch)
            with torch.no_grad():
                got, want = gm(src, **kwargs), unit(src, **kwargs)
                _close(got, want, tol=1e-10)
                if init == "keep":
                    _close(got, model(src, **kwargs), tol=1e-10)


class _Attention(nn.Module):
    """Explicit attention (torch.matmul, softmax) and two nn.MultiheadAttention: cross-attention with
    kdim ≠ embed_dim and no biases (need_weights), and sequence-first self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.cross = nn.MultiheadAttention(16, 2, bias=False, kdim=8, vdim=8, batch_first=True)
        self.self_attn = nn.MultiheadAttention(16, 4)

    def forward(self, x, y):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        h, weights = self.cross(h, y, y)
        t = h.transpose(0, 1)
        return self.self_attn(t, t, t, need_weights=False)[0].transpose(0, 1), weights


@pytest.mark.parametrize("init", ["keep", "unit"])
def test_converted_attention_ops_export(init):
    """softmax_at / MatmulAt / attention weights (with and without a target) and both MHA layouts."""
    torch.manual_seed(0)
    model = _Attention().double().eval()
    g = torch.Generator().manual_seed(0)

    def inputs(b, t, s):
        return torch.randn(b, t, 16, dtype=torch.float64, generator=g), torch.randn(
            b, s, 8, dtype=torch.float64, generator=g
        )

    example = inputs(3, 5, 7)
    unit = unit_scale(model, example, init=init)
    names = {n.target.__name__ for n in unit.graph.nodes if n.op == "call_function"}
    modules = {type(unit.get_submodule(n.target)).__name__ for n in unit.graph.nodes if n.op == "call_module"}
    assert "softmax_at" in names and "MatmulAt" in modules
    gm = export(unit, *example)
    _plain(gm)
    for args in (example, inputs(2, 9, 4)):
        with torch.no_grad():
            for got, want, original in zip(gm(*args), unit(*args), model(*args), strict=True):
                _close(got, want, tol=1e-10)
                if init == "keep":
                    _close(got, original, tol=1e-10)


def test_converted_export_program_dynamic_length():
    """init="unit" encoder (attention α(s) in the graph) through torch.export with a dynamic length."""
    unit = unit_scale(_encoder_stack(True, True), (_src(True, 2, 6, seed=0),), init="unit")
    length = torch.export.Dim("length", min=2, max=64)
    program = export_program(unit, (_src(True, 2, 6, seed=0),), dynamic_shapes=({1: length},))
    src = _src(True, 2, 11, seed=1)
    with torch.no_grad():
        _close(program.module()(src), unit(src), tol=1e-10)


def test_nested_converted_module_export():
    """A converted submodule inside a plain model: its graph's unitscale calls are found too."""
    model = _encoder_stack(True, False)
    x = _src(True, 2, 6, seed=0)
    wrapper = nn.Sequential(nn.Linear(32, 32).double(), unit_scale(model, (x,)))
    gm = export(wrapper, x)
    _plain(gm)
    with torch.no_grad():
        _close(gm(x), wrapper(x), tol=1e-10)


@pytest.mark.parametrize(
    ("left", "right", "b", "n"),
    [
        ((7, 5), (5, 3), 7, 3),
        ((2, 4, 7, 5), (5, 3), 56, 3),  # right reused by 8 batch elements: b = 7·8
        ((7, 5), (2, 4, 5, 3), 7, 24),  # left reused: n = 3·8
        ((2, 1, 7, 5), (1, 3, 5, 9), 14, 27),  # batch 6: b = 7·6/3, n = 9·6/2
    ],
)
def test_matmul_export_broadcast_closed_form(left, right, b, n):
    """U.matmul exports as torch.matmul · (b·m·n)^-⅙ (gmean), b and n written out here, at any shapes."""

    class MatMul(nn.Module):
        def forward(self, a, c):
            return U.matmul(a, c)

    gm = export(MatMul())
    _plain(gm)
    g = torch.Generator().manual_seed(0)
    a, c = (torch.randn(s, dtype=torch.float64, generator=g) for s in (left, right))
    _close(gm(a, c), torch.matmul(a, c) * (b * left[-1] * n) ** (-1 / 6), tol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="nn.Module"):
        export("not a model")
    with pytest.raises(ValueError, match="example inputs do not match"):
        export(_model("gpt"), torch.zeros(1, 4, dtype=torch.long), bogus=1)
    with pytest.raises(ValueError, match="pass example inputs"):
        export(_model("gpt"))
    with pytest.raises(ValueError, match="tuple"):
        export_program(_model("gpt"), torch.zeros(1, 4, dtype=torch.long))


def test_module_is_callable():
    model, idx = _model("conv").eval(), _batch(0)[0]
    assert callable(ux)
    _close(unitscale.export(model, idx)(idx)[0], ux.export(model, idx)(idx)[0])


# -- fresh process without unitscale ---------------------------------------------------------------------

_CHILD = """
import sys
sys.path.append({site!r})
try:
    import unitscale
except ImportError:
    pass
else:
    raise SystemExit("unitscale is importable in the child")
import torch
gm = torch.load("gm.pt", weights_only=False)
program = torch.export.load("gpt.pt2")
idx, targets = torch.load("inputs.pt", weights_only=True)
with torch.no_grad():
    logits, loss = gm(idx, targets)
    other = gm(idx[:, :7], targets[:, :7])[0]
    program_logits = program.module()(idx)[0]
assert "unitscale" not in sys.modules, sorted(m for m in sys.modules if "unitscale" in m)
torch.save({{"logits": logits, "loss": loss, "other": other, "program": program_logits}}, "out.pt")
"""


@pytest.mark.slow  # spawns a fresh Python process
def test_fresh_process_without_unitscale(tmp_path):
    model = _model("gpt").eval()
    idx, targets = _batch(5)
    torch.save(export(model, idx, targets), tmp_path / "gm.pt")
    torch.export.save(export_program(model, (idx,)), tmp_path / "gpt.pt2")
    torch.save((idx, targets), tmp_path / "inputs.pt")
    site = sysconfig.get_paths()["purelib"]
    # -I: no env vars, user site or cwd; -S: no site module, so the editable install's .pth never runs.
    env = {"PATH": os.environ.get("PATH", "")}
    code = textwrap.dedent(_CHILD.format(site=site))
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        other = model(idx[:, :7])[0]
    _close(out["logits"], logits)
    _close(out["loss"], loss)
    _close(out["other"], other)
    _close(out["program"], logits)


# -- weights_only state_dicts ----------------------------------------------------------------------------


def _applied(family: str, recipe: str | None, seed: int) -> nn.Module:
    model = _model(family, seed=seed, d_model=64)
    if recipe is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            precision.apply(model, recipe)
    return model


@pytest.mark.parametrize(
    ("family", "recipe"), [(f, None) for f in FAMILIES] + [("gpt", "fp8"), ("gpt", "int4"), ("conv", "int4")]
)
def test_state_dict_loads_weights_only(family, recipe, tmp_path):
    model = _applied(family, recipe, seed=0)
    idx, targets = _batch(7)
    model.train()
    loss = model(idx, targets)[1]  # one step: int4 initialises its LSQ step sizes, then learns them
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values()), {k: type(v) for k, v in state.items()}
    assert not any(k.endswith("_extra_state") for k in state)
    if recipe == "int4":
        assert any(k.endswith("precision.log_s_x") for k in state)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = _applied(family, recipe, seed=1)
    fresh.load_state_dict(loaded, strict=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], fresh(idx)[0])


# -- per-layer overrides ---------------------------------------------------------------------------------

CRITICAL = (("lm_head", "bf16"), ("*.body.out", "bf16"), ("*.body.down", "bf16"))


def test_overrides_plan_apply_and_describe():
    """fp8 by default, the u-μP critical matmuls in BF16, one of them forced back to fp8 (first match).
    A BF16 override in a float32 model is simulated (bf16 rounding in float32 compute)."""
    model = _model("gpt")
    recipe = Recipe.fp8().with_overrides(("blocks.2.body.out", "fp8"), *CRITICAL)
    rows = {r.path: r for r in precision.plan(model, recipe)}
    assert all(r.backend == "simulate" for r in rows.values())
    quantised = sorted(p for p, r in rows.items() if r.recipe.weight_format == "fp8_e4b")
    high = sorted(p for p, r in rows.items() if r.recipe.weight_format == "bf16")
    assert quantised == [
        "blocks.0.body",  # attention matmuls (QKᵀ, PV)
        "blocks.0.body.qkv",
        "blocks.1.body.up",
        "blocks.2.body",
        "blocks.2.body.out",
        "blocks.2.body.qkv",
        "blocks.3.body.up",
    ]
    assert "blocks.0.body.out" in high and "blocks.2.body.out" in quantised
    assert high == ["blocks.0.body.out", "blocks.1.body.down", "blocks.3.body.down", "lm_head"]
    assert all(rows[p].recipe.grad_format == "fp8_e5b" for p in quantised)
    assert all(rows[p].recipe.grad_format == "bf16" for p in high)
    assert rows["lm_head"].reason.startswith("override 'lm_head'; bf16 rounding simulated")
    assert rows["blocks.2.body.out"].reason == "override 'blocks.2.body.out'"
    assert rows["blocks.0.body.qkv"].reason.startswith("default")
    text = precision.describe(model, recipe)
    assert text.count("override '*.body.down'") == 2 and "bf16/bf16/bf16" in text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision.apply(model, recipe)
    modules = dict(model.named_modules())
    assert all(modules[p].precision is not None for p in quantised + high)

    # The forced layer really casts to E4M3, lm_head to BF16 (torch's float8 / bfloat16 as references).
    seen = {}

    def keep(path):
        def hook(module, args, output):
            seen[path] = (args[0], output)

        return hook

    hooks = [modules[p].register_forward_hook(keep(p)) for p in ("blocks.2.body.out", "lm_head")]
    model.eval()
    with torch.no_grad():
        model(_batch(4)[0])
    for h in hooks:
        h.remove()
    e4m3 = lambda t: t.to(torch.float8_e4m3fn).double()  # noqa: E731
    bf16 = lambda t: t.to(torch.bfloat16).double()  # noqa: E731

    def e4m3_weight(w):  # the fp8 recipe scales W by 2^k, the largest power of two with max|W|·2^k ≤ 448
        k = 0
        while float(w.abs().max()) * 2.0 ** (k + 1) <= 448.0:
            k += 1
        while float(w.abs().max()) * 2.0**k > 448.0:
            k -= 1
        return e4m3(w * 2.0**k) * 2.0**-k

    for path, cast, cast_w in (("blocks.2.body.out", e4m3, e4m3_weight), ("lm_head", bf16, bf16)):
        x, y = seen[path]
        w = modules[path].weight
        alpha = (w.shape[0] * w.shape[1]) ** -0.25 if path != "lm_head" else w.shape[1] ** -0.5
        want = F.linear(cast(x), cast_w(w)) * alpha
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
