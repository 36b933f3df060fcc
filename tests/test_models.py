"""Char-LM families: contracts, causality, scales at init, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from unitscale.models import MODEL_NAMES, build

SMALL = {"d_model": 32, "n_heads": 2, "seq_len": 24, "n_layers": 2}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("scaling", ["unit", "standard"])
def test_forward_backward_contract(name: str, scaling: str) -> None:
    torch.manual_seed(0)
    model = build(name, vocab_size=50, scaling=scaling, **SMALL)
    idx = torch.randint(0, 50, (3, 24))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 24, 50)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model(idx)[1] is None


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("scaling", ["unit", "standard"])
def test_causal(name: str, scaling: str) -> None:
    """Logits at position t must not depend on tokens after t."""
    torch.manual_seed(1)
    model = build(name, vocab_size=50, scaling=scaling, **SMALL).double()
    idx = torch.randint(0, 50, (2, 24))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-10, atol=1e-10)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt", "conv", "rnn"])
def test_unit_model_initial_loss_near_uniform_and_logits_unit(name: str) -> None:
    """At init a unit-scaled LM's readout has unit-scale logits and a loss near ln V (+ the logit spread)."""
    torch.manual_seed(0)
    vocab = 64
    model = build(name, vocab_size=vocab, scaling="unit", d_model=64, n_heads=2, seq_len=64, n_layers=2)
    idx = torch.randint(0, vocab, (8, 64))
    logits, loss = model(idx, idx)
    assert 0.7 < logits.std().item() < 1.4
    # E[CE] for N(0, σ²) logits is ≈ ln V + σ²/2: independent of the model, only of the logit scale.
    expected = math.log(vocab) + logits.var().item() / 2
    assert abs(loss.item() - expected) < 0.25


def test_bad_names_list_accepted_values() -> None:
    with pytest.raises(ValueError, match="unknown model 'lstm'; accepted: gpt"):
        build("lstm", vocab_size=10)
    with pytest.raises(ValueError, match="unknown scaling 'half'"):
        build("gpt", vocab_size=10, scaling="half")
    with pytest.raises(ValueError, match="unknown norm 'mid'"):
        build("gpt", vocab_size=10, norm="mid")
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['width'\]"):
        build("gpt", vocab_size=10, width=3)
    with pytest.raises(ValueError, match="tau_attn must lie in"):
        build("gpt", vocab_size=10, tau_attn=1.5)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        build("gpt", vocab_size=10, d_model=30, n_heads=4)


def test_too_long_sequence_is_an_error() -> None:
    model = build("gpt", vocab_size=10, **SMALL)
    with pytest.raises(ValueError, match="exceeds the model's seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_unit_optim_groups_divide_vector_lr_by_sqrt_dim() -> None:
    model = build("gpt", vocab_size=10, **SMALL)
    groups = model.optim_groups(lr=0.1)
    assert groups[0]["lr"] == 0.1 and groups[1]["lr"] == pytest.approx(0.1 / math.sqrt(32))
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_presets_fix_their_family() -> None:
    """A preset names a family: "gpt" cannot be built as an RNN, and the preset table is read-only."""
    from unitscale.models import PRESETS

    with pytest.raises(ValueError, match="model 'gpt' has mixer 'attention'; mixer='rnn' is another"):
        build("gpt", vocab_size=10, mixer="rnn")
    assert build("conv", vocab_size=10, mixer="conv", **SMALL).cfg.mixer == "conv"
    with pytest.raises(TypeError):
        PRESETS["gpt"]["mixer"] = "rnn"  # type: ignore[index]
    assert {name: PRESETS[name]["mixer"] for name in MODEL_NAMES} == {
        "gpt": "attention", "gpt-post": "attention", "gpt-nonorm": "attention", "conv": "conv", "rnn": "rnn"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_hold_no_scale_rule_or_backend_call(name: str) -> None:
    """The char-LM file composes blocks only: its unit model's modules come from unitscale.nn (or are
    containers defined in the model file), never a hand-written scale."""
    from pathlib import Path

    import unitscale.models as models

    for path in sorted(Path(models.__file__).parent.glob("*.py")):  # every model file, not only charlm
        source = path.read_text(encoding="utf-8")
        for forbidden in ("_rule(", "EXACT", ".resolve(", "precision.", ".matmul(", "rules."):
            assert forbidden not in source, (path.name, forbidden)
    model = build(name, vocab_size=10, **SMALL)
    for path, module in model.named_modules():
        origin = type(module).__module__
        allowed = origin in ("unitscale.nn", "unitscale.models.charlm") or origin.startswith("torch.")
        assert allowed, (path, origin)
