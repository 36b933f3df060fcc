"""unit_scale on the models people have: Hugging Face BERT (the pretrained MiniLM-L6), GPT-2 and Llama, a
torchvision-style ResNet and a timm-style ViT (tests/convert_models.py).

Independent references: the original models themselves (float64), torch's own autograd gradients, and the
op counts a reader can verify from each architecture. Conversions capture at the example's sizes
(``dynamic=False``) except where another size is run.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch

import unitscale as us
from convert_models import ResNet, ViT, gpt2, llama, minilm_classifier, trained_batch_norms, unit_statistics
from unitscale.export import export, unitscale_references

pytest.importorskip("transformers")

VOCAB = 96


def _ids(batch: int, length: int, seed: int, low: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def _case(name: str):
    """(model in float64 eval mode, example keyword inputs, name of its main output)."""
    g = torch.Generator().manual_seed(0)
    if name == "resnet":
        model = trained_batch_norms(ResNet())
        return model, {"x": torch.randn(2, 3, 16, 16, generator=g)}, None
    if name == "vit":  # is_causal forwarded to SDPA as timm does; the capture specialises on it
        return ViT(), {"x": torch.randn(2, 3, 16, 16, generator=g), "is_causal": True}, None
    if name == "gpt2":
        ids = _ids(2, 9, 1)
        return gpt2(VOCAB), {"input_ids": ids, "labels": ids}, "logits"
    if name == "llama":
        ids = _ids(2, 9, 2)
        return llama(VOCAB), {"input_ids": ids, "labels": ids}, "logits"
    try:
        model = minilm_classifier(3)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    example = {
        "input_ids": _ids(2, 9, 3, 1000, 20000),
        "attention_mask": mask,
        "labels": torch.tensor([0, 2]),
    }
    return model, example, "logits"


MODELS = ["bert", "gpt2", "llama", "resnet", "vit"]


def _f64(example: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in example.items()}


@pytest.fixture(scope="module", params=MODELS)
def keep(request):
    """(original, example, output name, converted with init="keep")."""
    model, example, out = _case(request.param)
    model, example = model.double().eval(), _f64(example)
    return request.param, model, example, out, us.unit_scale(model, example, dynamic=False)


def _main(output, name):
    return output if name is None else getattr(output, name)


def test_keep_outputs_equal_the_original_in_float64(keep):
    name, model, example, out, unit = keep
    with torch.no_grad():
        want, got = model(**example), unit(**example)
    assert type(got) is type(want)  # an HF ModelOutput stays one
    torch.testing.assert_close(_main(got, out), _main(want, out), rtol=1e-10, atol=1e-10)
    if out is not None:  # HF causal LMs take the loss of logits.float(): float32 arithmetic by design
        tol = 1e-10 if name == "bert" else 1e-6
        torch.testing.assert_close(got.loss, want.loss, rtol=tol, atol=tol)
    assert not unit.unit_scale_info.unsupported


def test_keep_gradients_are_the_original_times_one_constant_per_parameter(keep):
    """Theorem 5.2, per parameter, with a random probe of the main output; names are the original's."""
    name, model, example, out, unit = keep
    probe = None
    for m in (model, unit):
        y = _main(m(**example), out)
        probe = (
            torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=y.dtype)
            if probe is None
            else probe
        )
        m.zero_grad()
        (y * probe).sum().backward()
    converted = dict(unit.named_parameters())
    assert list(converted) == [n for n, _ in model.named_parameters()]
    # Llama normalises in float32 (HF upcasts inside LlamaRMSNorm): gradients carry float32 rounding.
    tol = 1e-6 if name == "llama" else 1e-9
    scale_a = max(p.grad.norm() for p in model.parameters())
    scale_b = max(p.grad.norm() for p in converted.values())
    for pname, p in model.named_parameters():
        a, b = p.grad.flatten(), converted[pname].grad.flatten()
        if a.norm() < 1e-10 * scale_a:  # a key bias: softmax is shift-invariant, its gradient is 0 (rounding)
            assert b.norm() < 1e-10 * scale_b, pname
            continue
        kappa = (a @ b) / (a @ a)
        assert kappa > 0 and (b - kappa * a).norm() / b.norm() < tol, pname


def test_result_is_usable_where_the_original_was(keep):
    name, model, example, _, unit = keep
    assert list(unit.state_dict()) == list(model.state_dict())
    assert inspect.signature(unit.forward) == inspect.signature(model.forward)
    assert not any(p is q for p, q in zip(unit.parameters(), model.parameters()))  # a copy
    twin = copy.deepcopy(unit)
    assert type(twin).__name__ == type(unit).__name__ == f"Unit{type(model).__name__}"
    with torch.no_grad():
        torch.testing.assert_close(twin(**example), unit(**example), rtol=0, atol=0)
    if hasattr(model, "config"):
        assert unit.config is model.config
    if name == "gpt2":  # tied embedding and readout: one parameter, one gradient constant
        assert unit.unit_scale_info.ties == [("lm_head.weight", "transformer.wte.weight")]
        assert unit.get_parameter("lm_head.weight") is unit.get_parameter("transformer.wte.weight")
    if name == "vit":  # a LayerNorm subclass becomes the unit LayerNorm; the capture is for is_causal=True
        assert isinstance(unit.get_submodule("norm"), us.nn.LayerNorm)
        with pytest.raises(ValueError, match=r"converted with \['is_causal'\] = True, called with False"):
            unit(example["x"], is_causal=False)
    if name == "resnet":  # one nn.ReLU module called at two sites: a unit relu at each, own factor
        assert unit.unit_scale_info.rules["relu"] == 9
        kinds = [r.kind for r in us.precision.plan(unit, "fp8")]  # no conv backend: convs are reported
        assert kinds.count("unreachable") == 10 and kinds.count("linear") == 1


def test_export_gives_plain_torch_with_equal_outputs_and_a_torch_export_round_trip(keep):
    name, model, example, out, unit = keep
    plain = export(unit)
    assert unitscale_references(plain) == []
    with torch.no_grad():
        want = _main(unit(**example), out)
        torch.testing.assert_close(_main(plain(**example), out), want, rtol=1e-10, atol=1e-10)
        program = torch.export.export(plain, (), example, strict=False)
        torch.testing.assert_close(_main(program.module()(**example), out), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_dynamic_capture_runs_at_other_sizes(name):
    model, example, out = _case(name)
    model = model.eval()
    unit = us.unit_scale(model, example)  # dynamic sizes: the default
    ids = _ids(3, 14, 7, 1000, 20000) if name == "bert" else _ids(3, 14, 7)
    other = {"input_ids": ids, "labels": ids if name == "gpt2" else torch.tensor([0, 1, 2])}
    if name == "bert":
        other["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(unit(**other).logits, model(**other).logits, rtol=1e-5, atol=1e-5)


# -- init="unit": unit scale at initialisation ---------------------------------------------------------------

B, S = 8, 64  # statistics need more than a handful of tokens


def _unit_case(name: str):
    """(model, example, node to put the probe at): token/position-level outputs only (see docstring)."""
    torch.manual_seed(0)
    ids = _ids(B, S, 8)  # no padding token (id 0): a zero row would make RMSNorm's gradient 1/√eps
    if name == "resnet":
        return ResNet(width=16), {"x": torch.randn(8, 3, 32, 32)}, "relu_8"
    if name == "vit":
        return ViT(dim=64, image=32), {"x": torch.randn(8, 3, 32, 32)}, "norm"
    if name == "gpt2":
        return gpt2(VOCAB), {"input_ids": ids}, None
    if name == "llama":
        return llama(VOCAB), {"input_ids": ids}, None
    model, _, _ = _case("bert")
    return (
        model,
        {"input_ids": ids + 1000, "attention_mask": torch.ones_like(ids)},
        ("bert_encoder_layer_5_output_layer_norm"),
    )


# Attention modules, and the norm right before one (its output gradient is the q, k, v gradients' sum).
_ATTENTION = ("attn", "attention", "input_layernorm", "ln_1", "norm1")


def _attention(name: str) -> bool:
    return any(word in name.split(" (")[0] for word in _ATTENTION)


@pytest.mark.parametrize("name", MODELS)
def test_unit_init_has_unit_activations_and_gradients(name):
    """σ of every converted op's output and of its gradient in [0.5, 2], weight gradients in [0.25, 4], for
    a unit random probe at the last token-level tensor (a classifier's pooled/cls readout sends one
    gradient to many rows: no unit promise there). Where the paper promises no unit scale:

    * attention (ops inside attention modules and the norm feeding one): at init it averages the values of
      every token, so the tensors and row sums around it are correlated across tokens, causal masking
      makes the output σ ≈ √(ln s), the q/k gradients are the softmax Jacobian's (no rule), GQA sums each
      key/value head's gradient over its group; tested: σ in [0.2, 3] (gradients: × √group), weight
      gradients in [0.2, 6], and a
      key bias gets exactly no gradient (softmax is shift-invariant);
    * products of two unit tensors (gated MLPs) and the rotary terms x·cos, rot(x)·sin (only their sum is
      unit): σ in [0.35, 2];
    * ResNet: post-ReLU tensors are not zero-mean, and its skips carry them, so the convs of later blocks
      see RMS > σ (the rules normalise zero-mean inputs): activations σ in [0.5, 5]; max pooling sends each
      gradient to one of 4 inputs: gradients σ in [0.25, 2], weight gradients in [0.15, 4].
    Parameters no rule owns (cls token, position table) are unit-initialised too.
    """
    model, example, probe = _unit_case(name)
    unit = us.unit_scale(model, example, init="unit", dynamic=False)
    unit.train(name == "resnet")  # batch norm at initialisation normalises with batch statistics
    acts, grads = unit_statistics(unit, example, probe)
    assert len(acts) > 20
    for node, (rule, op, act, grad) in acts.items():
        lo, hi, g_lo, g_hi = 0.5, 2.0, 0.5, 2.0
        if _attention(op):  # Llama: 4 query heads share 2 key/value heads (GQA group 2)
            lo, hi, g_lo, g_hi = 0.2, 3.0, 0.2, 3.0 * math.sqrt(2 if name == "llama" else 1)
        elif rule == "mul":
            lo = 0.35
        if name == "resnet":
            hi, g_lo = 5.0, 0.25
        assert lo <= act <= hi and g_lo <= grad <= g_hi, (
            f"{node} ({rule}, {op}): σ {act:.3f}, grad σ {grad:.3f}"
        )
    for pname, g in grads.items():
        lo, hi = (0.15, 4.0) if name == "resnet" else (0.25, 4.0)
        if _attention(pname):
            lo, hi = 0.2, 6.0
        if pname.endswith("key.bias"):  # softmax is shift-invariant: no gradient (rounding only)
            assert g < 1e-6, pname
            continue
        assert lo <= g <= hi, f"{pname}: weight-gradient σ {g:.3f}"
    for pname in unit.unit_scale_info.unit_initialised:
        assert abs(unit.get_parameter(pname).std().item() - 1) < 0.3, pname
    if name == "vit":
        assert sorted(unit.unit_scale_info.unit_initialised) == ["cls_token", "pos_embed"]


# -- low precision -----------------------------------------------------------------------------------------


class _Casts:
    def __init__(self, monkeypatch):
        from unitscale.precision.simulate import Simulate

        self.forward = {"weight": 0, "activation": 0}
        fwd = Simulate.cast_forward

        def cast_forward(backend, t, role):
            self.forward[role] += 1
            return fwd(backend, t, role)

        monkeypatch.setattr(Simulate, "cast_forward", cast_forward)


@pytest.mark.parametrize(("name", "linears", "matmuls"), [("bert", 6 * 6 + 2, 12), ("gpt2", 4 * 2 + 1, 4),
                                                          ("llama", 7 * 2 + 1, 4)])  # fmt: skip
def test_fp8_quantises_every_linear_and_both_attention_matmuls(name, linears, matmuls, monkeypatch):
    """BERT: q, k, v, out, up, down per layer + pooler + classifier; GPT-2: c_attn, c_proj, c_fc, c_proj +
    the tied readout; Llama: q, k, v, o, gate, up, down + lm_head. QKᵀ and PV per attention layer."""
    model, example, _ = _case(name)
    unit = us.unit_scale(model.eval(), example, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA: the fp8 recipe runs as the simulate backend
        us.precision.apply(unit, "fp8")
    counter = _Casts(monkeypatch)
    with torch.no_grad():
        unit(**example)
    assert counter.forward == {"weight": linears, "activation": linears + 2 * matmuls}


@pytest.mark.slow  # two 100-step training runs (~1-2 min on a busy 2-core CPU)
def test_fp8_training_of_converted_gpt2_on_wikipedia_matches_fp32():
    """100 AdamW steps of a converted GPT-2 (init="keep") on Wikipedia lead paragraphs through the MiniLM
    WordPiece tokenizer (the 255 most frequent tokens of 800 articles, the rest one shared id): simulated FP8
    (E4M3 weights/activations, E5M2 gradients, no loss scale) ends within 2% of the same model's fp32 loss
    (mean of the last 10 steps)."""
    from unitscale.train.topics import load_topics

    try:
        data = load_topics("train", 32)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ids = data.input_ids[data.attention_mask.sum(1) == 32][:800]  # articles filling all 32 tokens
    counts = torch.bincount(ids.flatten())
    vocab, top = 256, counts.argsort(descending=True)[:255]
    remap = torch.full((counts.numel(),), vocab - 1)
    remap[top] = torch.arange(vocab - 1)
    ids = remap[ids]
    curves = {}
    for recipe in ("fp32", "fp8"):
        torch.manual_seed(0)
        unit = us.unit_scale(gpt2(vocab).train(), {"input_ids": ids[:8], "labels": ids[:8]}, dynamic=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no CUDA: fp8 runs as the simulate backend
            us.precision.apply(unit, recipe)
        opt = torch.optim.AdamW(unit.parameters(), lr=1e-2)
        losses = []
        for step in range(100):
            batch = ids[(step * 8) % len(ids) :][:8]
            loss = unit(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses)
        curves[recipe] = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    first, last = curves["fp32"]
    assert last < first - 1.0  # it learned (measured: 4.68 → 2.97)
    assert abs(curves["fp8"][1] - last) <= 0.02 * last, curves


def test_finetune_builds_the_hugging_face_classifier_unit_scaled():
    """`unitscale finetune --model hf-bert --scaling unit`: HF BertForSequenceClassification converted,
    called as the loop calls a classifier, with the AdamW learning-rate map of every parameter."""
    from unitscale.train.finetune import FinetuneConfig, build_model, param_groups

    ids, mask = _ids(2, 12, 9, 1000, 20000), torch.ones(2, 12, dtype=torch.long)
    try:
        model, _ = build_model(FinetuneConfig(model="hf-bert", scaling="unit"), seed=0, example=(ids, mask))
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert type(model.model).__name__ == "UnitBertForSequenceClassification"
    assert model(ids, mask).shape == (2, 11)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(model.lr_scales) == sorted(names) and all(n.startswith("model.bert.") or n.startswith(
        "model.classifier.") for n in names)  # fmt: skip
    assert len(param_groups(model, 0.01, 1e-4)) == len(names)  # one group per parameter: lr·k, decay/k
    with pytest.raises(ValueError, match="unknown model 'gpt'; accepted: minilm, hf-bert"):
        FinetuneConfig(model="gpt")
