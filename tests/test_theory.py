"""The paper's formal results, checked on whole unit-scaled models against float64 finite differences.

Theorem 5.2: a constraint-scaled graph delivers the true gradient of its scaled forward function times one
constant per parameter. So for every parameter P and any direction d, <g_P, d> / (dL/dε along d) must be
the same constant c_P: checked with central finite differences of the forward loss, which know nothing of
the scaled backward. A violated constraint (α ≠ β on a non-cut edge) makes the ratio depend on d.
"""

from __future__ import annotations

import pytest
import torch

from unitscale.models import build
from unitscale.precision import apply
from unitscale.precision.simulate import Simulate

VOCAB = 23


def _direction_ratios(model, idx, param_name: str, n_dirs: int = 4, eps: float = 1e-6) -> torch.Tensor:
    params = dict(model.named_parameters())
    p = params[param_name]
    model.zero_grad()
    _, loss = model(idx, idx)
    loss.backward()
    g = p.grad.detach().clone()
    gen = torch.Generator().manual_seed(hash(param_name) % 2**31)
    ratios = []
    for _ in range(n_dirs):
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * d)
            up = model(idx, idx)[1].item()
            p.sub_(2 * eps * d)
            down = model(idx, idx)[1].item()
            p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        ratios.append((g * d).sum().item() / fd)
    return torch.tensor(ratios, dtype=torch.float64)


@pytest.mark.slow  # float64 finite differences through six whole models
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gpt", {}),
        ("gpt-post", {}),
        ("gpt", {"residual": "running_mean", "activation": "gelu"}),
        ("conv", {}),
        ("rnn", {"n_layers": 1, "d_model": 8}),
        ("gpt", {"tie_embeddings": True}),
    ],
)
def test_scaled_gradient_is_parallel_to_true_gradient_per_parameter(name: str, overrides: dict) -> None:
    torch.manual_seed(0)
    kw = {"d_model": 16, "n_heads": 2, "seq_len": 12, "n_layers": 2, "conv_groups": 4, **overrides}
    model = build(name, vocab_size=VOCAB, scaling="unit", **kw).double()
    idx = torch.randint(0, VOCAB, (2, 12))
    checked = 0
    for pname, _ in model.named_parameters():
        r = _direction_ratios(model, idx, pname)
        assert torch.isfinite(r).all() and (r > 0).all(), (pname, r)
        spread = (r.max() - r.min()) / r.abs().mean()
        assert spread < 1e-4, f"{pname}: ratios {r.tolist()} differ (spread {spread:.2e})"
        checked += 1
    assert checked == len(list(model.parameters()))


def test_tied_table_normalises_the_sum_of_its_two_gradient_contributions() -> None:
    """Tied table: each use's contribution is scaled by 2^-½ (scale.shared), so σ_tied² equals the mean of
    the two untied σ² (embedding table and readout weight), not their sum. Random targets keep the two
    contributions uncorrelated, which is the rule's assumption."""
    kw = {"d_model": 128, "n_heads": 2, "seq_len": 64, "n_layers": 1}
    idx = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))
    grads = {}
    for tie in (False, True):
        torch.manual_seed(0)
        model = build("gpt", vocab_size=512, scaling="unit", tie_embeddings=tie, **kw)
        model(idx, targets)[1].backward()
        grads[tie] = model
    untied, tied = grads[False], grads[True]
    assert "lm_head.weight" not in dict(tied.named_parameters())
    var_emb = untied.tok.weight.grad.var().item()
    var_head = untied.lm_head.weight.grad.var().item()
    var_tied = tied.tok.weight.grad.var().item()
    # The tied network is not the untied one (its readout is the table), so its two contributions only
    # approximately match the untied variances: 25% tolerance; without the 2^-½ rule the ratio would be ≈2.
    ratio = var_tied / ((var_emb + var_head) / 2)
    assert 0.8 < ratio < 1.25, (var_emb, var_head, var_tied)


def test_tied_readout_is_reached_by_recipes() -> None:
    model = build("gpt", vocab_size=64, scaling="unit", tie_embeddings=True, d_model=32, n_heads=2, seq_len=8,
                  n_layers=1)
    apply(model, "fp8")
    assert isinstance(model.lm_head.precision, Simulate)
