"""Weighted add a·x + c·y: the true gradient on inputs over non-cut edges, 1 on cut ones (docs/theory.md,
Add and weighted add), and the char-LM's token + position embedding sum at initialisation."""

from __future__ import annotations

import pytest
import torch

import unitscale.functional as U
import unitscale.nn as unn
from unitscale import models, rules

A, C = 0.6, 0.8


@pytest.mark.parametrize("cut", [(), ("left",), ("right",), ("left", "right")])
def test_weighted_add_gradients_by_edge(cut):
    """Forward a·x + c·y always; going back a non-cut input gets its weight (the true gradient), a cut one
    the output gradient itself."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 32, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(64, 32, dtype=torch.float64, generator=g)
    out = U.weighted_add(x, y, A, C, cut=cut)
    torch.testing.assert_close(out, A * x + C * y, rtol=1e-15, atol=1e-15)
    gx, gy = torch.autograd.grad(out, (x, y), dy)
    torch.testing.assert_close(gx, dy * (1.0 if "left" in cut else A), rtol=0, atol=0)
    torch.testing.assert_close(gy, dy * (1.0 if "right" in cut else C), rtol=0, atol=0)
    assert rules.weighted_add_rule(A, C, cut=cut).betas == {
        "left": 1.0 if "left" in cut else A, "right": 1.0 if "right" in cut else C}  # fmt: skip
    torch.testing.assert_close(U.weighted_add.plain(x, y, A, C, cut=cut), out, rtol=1e-15, atol=1e-15)


def test_weighted_add_cut_names_are_checked():
    with pytest.raises(ValueError, match=r"cut.*'middle'.*accepted"):
        U.weighted_add(torch.ones(2), torch.ones(2), A, C, cut=("middle",))


def test_charlm_embedding_tables_get_unit_gradients_at_init(monkeypatch):
    """Token and position tables of the unit char-LM are cut inputs of the embedding sum: at init both
    tables' gradients have σ ≈ 1 (they were ≈ 0.73 with a = c = 2^-½ applied going back), and the sum
    itself stays unit.

    Tolerance: each σ is estimated from V·d = 256·64 (token) and T·d = 128·64 (position) entries, a
    standard error of σ/√(2n) ≤ 0.8% if they were independent; they are not (a position row sums the 16
    gradients of one position, a token row a Poisson number of them), and over seeds 0…4 the measured σ
    ranged 0.99…1.07 (token) and 0.99…1.09 (position), sd ≈ 0.03 and 0.04. ±0.15 is ≥ 3.5 sd of that
    spread and rejects the old 0.71 / 0.72 (seed 0 here: 1.00 / 1.02)."""
    seen: list[torch.Tensor] = []
    original = U.weighted_add

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(U, "weighted_add", recording)
    torch.manual_seed(0)
    vocab, seq, d = 256, 128, 64
    model = models.build("gpt", vocab, d_model=d, n_layers=2, n_heads=2, seq_len=seq)
    idx = torch.randint(0, vocab, (16, seq))
    _, loss = model(idx, torch.randint(0, vocab, (16, seq)))
    loss.backward()
    tables = {m.num_embeddings: m.weight for m in model.modules() if isinstance(m, unn.Embedding)}
    tok, pos = tables[vocab], tables[seq]
    sigma_tok, sigma_pos = tok.grad.std().item(), pos.grad.std().item()
    print(f"embedding gradient σ: token {sigma_tok:.3f}, position {sigma_pos:.3f}; sum σ {seen[0].std():.3f}")
    assert len(seen) == 1
    assert abs(seen[0].std().item() - 1) < 0.05  # 16·128·64 entries of a unit sum
    assert abs(sigma_tok - 1) < 0.15 and abs(sigma_pos - 1) < 0.15
