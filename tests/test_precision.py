"""Recipes and their application: every matmul quantised, values equal to torch's own float8 casts."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unitscale import precision
from unitscale.precision import QuantisedLinear, Recipe, apply, describe, get_recipe
from unitscale.precision.simulate import Simulate


def _torch_cast(t: torch.Tensor, dtype: torch.dtype, max_value: float) -> torch.Tensor:
    """Independent reference: saturate, then round-trip through torch's own float8 dtype."""
    return t.clamp(-max_value, max_value).to(dtype).to(t.dtype)


# What each named recipe must be, written out independently of recipe.py: (weight, activation, grad) format
# with their torch dtypes where one exists, compute dtype, loss scale, backend, and module paths that an
# override sends elsewhere -> (compute dtype, quantised?) of the recipe they get.
E4B, E5B, E4A, E5A = torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz
F32, B16, F16 = torch.float32, torch.bfloat16, torch.float16
NAMED = {
    "fp32": ((None, None, None), F32, None, "simulate", {}),
    "bf16": ((None, None, None), B16, None, "simulate", {}),
    "fp16": ((None, None, None), F16, None, "simulate", {}),
    "fp16-loss-scaled": ((None, None, None), F16, 2048.0, "simulate", {}),
    "fp16-sim": ((F16, F16, F16), F32, None, "simulate", {}),
    "fp16-sim-loss-scaled": ((F16, F16, F16), F32, 2048.0, "simulate", {}),
    "fp8": ((E4B, E4B, E5B), F32, None, "simulate", {}),
    "fp8-e4a": ((E4A, E4A, E5A), F32, None, "simulate", {}),
    "fp8-loss-scaled": ((E4B, E4B, E5B), F32, 2048.0, "simulate", {}),
    "fp8-hw": ((E4B, E4B, E5B), F32, None, "fp8", {}),
    "fp8-paper": ((E4B, E4B, E5B), F32, None, "simulate", {}),
    "fp8-paper-e4a": ((E4A, E4A, E5A), F32, None, "simulate", {}),
    "fp8-paper-loss-scaled": ((E4B, E4B, E5B), F32, 2048.0, "simulate", {}),
    "fp8-critical-bf16": ((E4B, E4B, E5B), F32, None, "simulate",
                          {"lm_head": (B16, False), "blocks.1.body.down": (B16, False),
                           "blocks.0.body.out": (B16, False),
                           "encoder.0.attention.output.dense": (B16, False)}),
    "int4": (("int4", "int4", None), F32, None, "int4",
             {"lm_head": (F32, False), "classifier": (F32, False)}),
    "int4-pretrain": (("int4", "int4", None), F32, None, "int4", {"lm_head": (F32, False)}),
    "int4-naive": (("int4", "int4", None), F32, None, "int4", {"head": (F32, False)}),
}


def test_named_recipe_table_is_complete() -> None:
    assert set(precision.RECIPE_NAMES) == set(NAMED)


@pytest.mark.parametrize("name", precision.RECIPE_NAMES)
def test_named_recipes_resolve(name: str) -> None:
    from unitscale.formats import get_format

    r = get_recipe(name)
    formats, compute, loss_scale, backend, overridden = NAMED[name]
    got = tuple(None if f is None else get_format(f).torch_dtype or f for f in
                (r.weight_format, r.activation_format, r.grad_format))
    assert got == formats
    assert (r.compute_dtype, r.loss_scale, r.backend) == (compute, loss_scale, backend)
    for path, (dtype, quantised) in overridden.items():
        sub, why = r.for_module(path)
        assert why.startswith("override") and (sub.compute_dtype, sub.quantises) == (dtype, quantised), path
    # Everything else (the bulk of a model's matmuls) takes the recipe itself.
    for path in ("blocks.0.body.qkv", "blocks.1.body.up", "encoder.0.attention.query"):
        assert r.for_module(path) == (r, "default"), path
    if backend == "int4":  # the naive ablation drops both of the paper's INT4 estimators
        assert (r.int4_config.hadamard, r.int4_config.bit_split) == ((False, False) if "naive" in name else
                                                                      (True, True))
        # a cold start (LSQ steps re-initialised, not learned) only for training from scratch
        assert r.int4_config.lsq_cold_start_steps == (75 if name == "int4-pretrain" else 0)
    assert r.name == name and get_recipe(r) is r


def test_unknown_recipe_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'fp7'.*fp32.*fp8"):
        get_recipe("fp7")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "tpu"}, "unknown backend 'tpu'"),
        ({"grad_rounding": "up"}, "unknown grad_rounding 'up'"),
        ({"loss_scale": -1.0}, "loss_scale must be a positive"),
        ({"weight_format": "fp9"}, "fp9"),
        ({"compute_dtype": torch.float64}, "unsupported compute_dtype"),
    ],
)
def test_recipe_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_fp8_recipe_formats() -> None:
    r = Recipe.fp8()
    assert (r.weight_format, r.activation_format, r.grad_format) == ("fp8_e4b", "fp8_e4b", "fp8_e5b")
    a = Recipe.fp8(variant="a")
    assert (a.weight_format, a.grad_format) == ("fp8_e4a", "fp8_e5a")
    with pytest.raises(ValueError, match="variant 'c'"):
        Recipe.fp8(variant="c")


@pytest.mark.parametrize("recipe", ["fp8", "fp8-paper"])
def test_quantised_linear_matches_torch_float8_casts(recipe: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = (torch.randn(16, 64) * 3).requires_grad_()
    ref_w = lin.weight.detach().clone()
    apply(lin, recipe)
    assert isinstance(lin, QuantisedLinear)
    y = lin(x)
    g = torch.randn_like(y) * 1e-3
    y.backward(g)
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    # fp8 scales the weight by 2^k, the largest power of two keeping max|W|·2^k ≤ 448; fp8-paper by 1.
    k = 0
    while recipe == "fp8" and float(ref_w.abs().max()) * 2.0 ** (k + 1) <= 448.0:
        k += 1
    xq, wq, gq = (
        _torch_cast(x.detach(), e4, 448.0),
        _torch_cast(ref_w * 2.0**k, e4, 448.0) * 2.0**-k,
        _torch_cast(g, e5, 57344.0),
    )
    torch.testing.assert_close(y, F.linear(xq, wq, lin.bias), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.weight.grad, gq.t() @ xq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.bias.grad, g.sum(0))  # the bias is not a matmul input


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.forward = {"weight": 0, "activation": 0}
        self.backward = 0
        fwd, bwd = Simulate.cast_forward, Simulate.cast_backward

        def cast_forward(backend, t, role):
            self.forward[role] += 1
            return fwd(backend, t, role)

        def cast_backward(backend, g):
            self.backward += 1
            return bwd(backend, g)

        monkeypatch.setattr(Simulate, "cast_forward", cast_forward)
        monkeypatch.setattr(Simulate, "cast_backward", cast_backward)


@pytest.mark.parametrize("scaling", ["unit", "standard"])
def test_every_matmul_of_a_gpt_is_quantised(scaling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from unitscale.models import build

    n_layers = 3
    model = build("gpt", vocab_size=40, scaling=scaling, n_layers=n_layers, d_model=32, n_heads=2, seq_len=16)
    apply(model, "fp8")
    counter = _Counter(monkeypatch)
    idx = torch.randint(0, 40, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    # Per layer: qkv, out, up, down linears + QK^T and PV attention matmuls; plus the LM head.
    linears, attention = 4 * n_layers + 1, 2 * n_layers
    assert counter.forward == {"weight": linears, "activation": linears + 2 * attention}
    assert counter.backward == linears + attention


def test_plain_torch_model_every_linear_swapped_and_unreachable_reported() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Conv1d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"3 \(Conv1d\)"):
        apply(model, "fp8")
    assert isinstance(model[0], QuantisedLinear) and isinstance(model[2][0], QuantisedLinear)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.0.weight", "2.0.bias", "3.weight", "3.bias"}


def test_overrides_by_glob_and_describe() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("lm_head", nn.Linear(8, 4))
    recipe = Recipe.fp8().with_overrides(("lm_head", "bf16"))
    apply(model, recipe)
    assert isinstance(model.body.precision, Simulate)
    text = describe(model, recipe)
    assert "override 'lm_head'" in text and "fp8_e4b/fp8_e4b/fp8_e5b" in text
    # A BF16 layer inside an fp32-compute model: its matmul inputs are rounded to bf16 (torch's own cast).
    x = torch.randn(5, 8)
    expected = F.linear(x.bfloat16().float(), model.lm_head.weight.bfloat16().float(), model.lm_head.bias)
    torch.testing.assert_close(model.lm_head(x), expected, rtol=0, atol=1e-6)
    assert "bf16 rounding simulated in float32 compute" in text


def test_critical_matmuls_preset_keeps_out_down_and_head_in_bf16() -> None:
    from unitscale.models import build

    model = build("gpt", vocab_size=20, d_model=16, n_heads=2, seq_len=8, n_layers=2)
    rows = {r.path: r for r in precision.plan(model, "fp8-critical-bf16")}
    bf16 = sorted(p for p, r in rows.items() if r.recipe.weight_format == "bf16")
    assert bf16 == ["blocks.0.body.out", "blocks.1.body.down", "blocks.2.body.out", "blocks.3.body.down",
                    "lm_head"]
    assert all(rows[p].recipe.weight_format == "fp8_e4b" for p in rows if p not in bf16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp8_backend_falls_back_to_simulate_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_warned_fp8_fallback", False)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply(model, Recipe.fp8(backend="fp8"))
    fallbacks = [w for w in caught if "no CUDA device" in str(w.message)]
    assert len(fallbacks) == 1  # one line, not one per layer
    assert isinstance(model[0].precision, Simulate)


def test_fp8_backend_keeps_attention_on_fused_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    # On an FP8 GPU the linears get Fp8Backend and attention no backend: torch's fused SDPA, not the
    # unfused matmul-softmax-matmul path (Fp8Backend runs batched matmuls in the compute dtype anyway).
    import unitscale.precision.fp8 as fp8
    from unitscale.models import build
    from unitscale.precision.backend import Exact

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8, "fp8_supported", lambda device=None: True)
    model = build("gpt", 32, scaling="unit", d_model=32, n_layers=2, n_heads=2, seq_len=16)
    rows = {r.path: r for r in precision.plan(model, Recipe.fp8(backend="fp8"))}
    attention = [p for p, r in rows.items() if r.kind == "attention"]
    assert len(attention) == 2 and all(rows[p].backend == "exact" for p in attention)
    assert all(r.backend == "fp8" for r in rows.values() if r.kind == "linear")
    apply(model, Recipe.fp8(backend="fp8"))
    modules = dict(model.named_modules())
    assert all(modules[p].precision is None for p in attention)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # run the CPU forward
    idx = torch.randint(0, 32, (2, 16))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", wraps=sdpa) as fused, \
            mock.patch.object(Exact, "matmul", wraps=Exact.matmul, autospec=True) as unfused:
        model(idx)
    assert fused.call_count == 2 and unfused.call_count == 0


def test_autocast_fp16_runs_matmuls_in_fp16_and_keeps_fp32_grads() -> None:
    torch.manual_seed(0)
    lin = apply(nn.Linear(16, 8), "fp32")
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = lin(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(
        lin.weight.grad, torch.ones(4, 8).t() @ x.detach().half().float(), rtol=1e-3, atol=1e-3
    )


def test_every_matmul_of_a_converted_bert_is_quantised(monkeypatch: pytest.MonkeyPatch) -> None:
    """unit_scale(BERT) calls SDPA through an AttentionAt module: apply reaches its QKᵀ and PV matmuls as
    well as every Linear, and names each (the describe table) by the path of the code it came from."""
    from unitscale import unit_scale
    from unitscale.models.bert import BertClassifier, BertConfig, BertEncoder
    from unitscale.transforms import AttentionAt

    torch.manual_seed(0)
    n_layers = 2
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=n_layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    model = BertClassifier(BertEncoder(config, with_pooler=False), 3)
    ids, mask = torch.randint(0, 50, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    unit = apply(unit_scale(model, (ids, mask), attention_mask=mask), "fp8")
    attention = [m for m in unit.modules() if isinstance(m, AttentionAt)]
    assert len(attention) == n_layers and all(isinstance(m.precision, Simulate) for m in attention)
    table = describe(unit, "fp8")
    assert "layers.0.attention.scaled_dot_product_attention  attention" in table
    counter = _Counter(monkeypatch)
    unit(ids, mask).sum().backward()
    # Per layer: q, k, v, out, up, down linears + QKᵀ and PV; plus the classifier head.
    linears, matmuls = 6 * n_layers + 1, 2 * n_layers
    assert counter.forward == {"weight": linears, "activation": linears + 2 * matmuls}
    assert counter.backward == linears + matmuls
