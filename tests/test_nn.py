"""Unit-scaled modules: unit init, agreement with plain torch maths, backends, and a deep stack at init."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unitscale.functional as U
import unitscale.nn as unn
from unitscale.precision import apply, plan
from unitscale.precision.backend import Exact


def test_unit_init():
    torch.manual_seed(0)
    lin = unn.Linear(512, 1024)
    assert lin.weight.shape == (1024, 512) and lin.bias.abs().max() == 0
    assert lin.weight.std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(lin.weight.mean().item()) < 0.01
    assert unn.Linear(4, 3, bias=False).bias is None
    emb = unn.Embedding(1000, 256, padding_idx=-1)
    assert emb.padding_idx == 999 and emb.weight[999].abs().max() == 0
    assert emb.weight[:999].std().item() == pytest.approx(1.0, rel=0.01)
    ln = unn.LayerNorm(64)
    assert torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))
    assert (
        unn.LayerNorm(64, bias=False).bias is None
        and unn.LayerNorm(64, elementwise_affine=False).weight is None
    )
    assert torch.equal(unn.RMSNorm(8).weight, torch.ones(8))
    assert unn.Linear(4, 3, dtype=torch.float64).weight.dtype == torch.float64


def test_linear_matches_plain_maths_and_uses_grad_rows():
    torch.manual_seed(0)
    lin = unn.Linear(16, 24, dtype=torch.float64)
    nn.init.normal_(lin.bias)
    lin.grad_rows = 5.0
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 10, 24, dtype=torch.float64)
    lin(x).backward(g)
    alpha = (16 * 24) ** -0.25
    w, b = lin.weight.detach(), lin.bias.detach()
    torch.testing.assert_close(lin(x), alpha * x @ w.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, alpha * g @ w, rtol=1e-12, atol=1e-12)  # gmean: beta_x = alpha
    g2 = g.reshape(-1, 24)
    torch.testing.assert_close(
        lin.weight.grad, 5**-0.5 * g2.T @ x.detach().reshape(-1, 16), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(lin.bias.grad, 5**-0.5 * g2.sum(0), rtol=1e-12, atol=1e-12)


def test_readout_and_constraint_flags():
    torch.manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64)
    ro = unn.Linear(16, 24, bias=False, readout=True, dtype=torch.float64)
    torch.testing.assert_close(ro(x), x @ ro.weight.detach().T / 4, rtol=1e-12, atol=1e-12)
    to = unn.Linear(16, 24, bias=False, constraint="to_output", dtype=torch.float64)
    torch.testing.assert_close(to(x), x @ to.weight.detach().T / 4, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="'max'"):
        unn.Linear(2, 2, constraint="max")


class Counting(Exact):
    def __init__(self):
        self.roles = []

    def cast_forward(self, t, role):
        self.roles.append(role)
        return t


def test_precision_attribute_reaches_every_matmul():
    torch.manual_seed(0)
    mha = unn.MultiHeadAttention(32, 4)
    backend = Counting()
    mha.precision = mha.qkv.precision = mha.out.precision = backend
    mha(torch.randn(2, 6, 32))
    # qkv linear (2), QKᵀ and PV (4), out linear (2)
    assert backend.roles.count("weight") == 2 and backend.roles.count("activation") == 6


def test_precision_apply_sees_modules():
    torch.manual_seed(0)
    layer = unn.TransformerLayer(32, 4, 64, dropout=0.0)
    kinds = {row.path: row.kind for row in plan(layer, "fp8")}
    assert kinds["self_attn"] == "attention"
    assert kinds["self_attn.qkv"] == kinds["mlp.up"] == kinds["mlp.down"] == "linear"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA: fp8 runs as simulate" (warned once per process)
        apply(layer, "fp8")
    assert layer.mlp.up.precision is not None and layer.self_attn.precision is not None
    y = layer(torch.randn(2, 8, 32))
    assert torch.isfinite(y).all()


def test_set_grad_rows():
    layer = unn.TransformerLayer(16, 2, 32, dropout=0.0)
    # qkv, out, up, down linears + 2 layer norms
    assert unn.set_grad_rows(layer, 100.0) == 6
    assert layer.mlp.down.grad_rows == 100.0 and layer.norm2.grad_rows == 100.0
    assert unn.set_grad_rows(layer, None) == 6 and layer.norm1.grad_rows is None
    with pytest.raises(ValueError, match="-3"):
        unn.set_grad_rows(layer, -3)


@pytest.mark.parametrize(
    "module, fn",
    [
        (unn.GELU(), lambda x: U.gelu(x)),
        (unn.GELU("tanh", mult=0.5), lambda x: U.gelu(x, approximate="tanh", mult=0.5)),
        (unn.ReLU(), lambda x: U.relu(x)),
        (unn.SiLU(constraint=None), lambda x: U.silu(x, constraint=None)),
        (unn.Tanh(), lambda x: U.tanh(x)),
        (unn.Sigmoid(), lambda x: U.sigmoid(x)),
        (unn.Softmax(0), lambda x: U.softmax(x, 0)),
        (unn.RMSNorm(12).double(), lambda x: U.rms_norm(x, 12, torch.ones(12, dtype=torch.float64))),
    ],
)
def test_elementwise_modules_match_functional(module, fn):
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(module(x), fn(x), rtol=1e-12, atol=1e-12)


def test_mlp_matches_plain_maths():
    torch.manual_seed(0)
    mlp = unn.MLP(16, activation="relu").double()
    assert mlp.up.out_features == 64
    x = torch.randn(3, 16, dtype=torch.float64)
    a = (16 * 64) ** -0.25
    relu_a, relu_b = math.sqrt(2 / (1 - 1 / math.pi)), math.sqrt(2)  # REFERENCE §2 closed forms
    h = math.sqrt(relu_a * relu_b) * torch.relu(a * x @ mlp.up.weight.detach().T)
    torch.testing.assert_close(mlp(x), a * h @ mlp.down.weight.detach().T, rtol=1e-12, atol=1e-12)


def test_mha_matches_plain_maths():
    torch.manual_seed(0)
    d, heads, t = 32, 4, 9
    mha = unn.MultiHeadAttention(d, heads).double()
    for p in (mha.qkv.bias, mha.out.bias):
        nn.init.normal_(p)
    x = torch.randn(2, t, d, dtype=torch.float64)
    qkv = (d * 3 * d) ** -0.25 * x @ mha.qkv.weight.detach().T + mha.qkv.bias.detach()
    q, k, v = (z.reshape(2, t, heads, d // heads).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
    att = math.sqrt(t / math.e) * F.scaled_dot_product_attention(q, k, v)
    ref = d**-0.5 * att.transpose(1, 2).reshape(2, t, d) @ mha.out.weight.detach().T + mha.out.bias.detach()
    torch.testing.assert_close(mha(x), ref, rtol=1e-12, atol=1e-12)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    causal = unn.MultiHeadAttention(d, heads, is_causal=True).double()
    causal.load_state_dict(mha.state_dict())
    torch.testing.assert_close(causal(x), mha(x, attn_mask=mask), rtol=1e-12, atol=1e-12)


def test_transformer_layer_post_norm_output_is_normalised():
    torch.manual_seed(0)
    layer = unn.TransformerLayer(32, 4, 64, dropout=0.0, norm_first=False)
    y = layer(torch.randn(4, 16, 32))
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 16), atol=1e-5, rtol=0)


def test_transformer_layer_dropout_train_eval():
    torch.manual_seed(0)
    layer = unn.TransformerLayer(32, 4, 64, dropout=0.5)
    x = torch.randn(2, 8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def _stack_stats(unit: bool, norm_first: bool, depth=6, batch=8, seq=64, d=128, vocab=256):
    """Per-layer output σ and output-gradient σ of a depth-layer stack + norm + readout + mean CE."""
    torch.manual_seed(0)
    if unit:
        layers = [unn.TransformerLayer(d, 4, 4 * d, dropout=0.0, norm_first=norm_first) for _ in range(depth)]
        norm, head, ce = unn.LayerNorm(d), unn.Linear(d, vocab, readout=True), U.cross_entropy
    else:
        layers = [
            nn.TransformerEncoderLayer(
                d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
            )
            for _ in range(depth)
        ]
        norm, head, ce = nn.LayerNorm(d), nn.Linear(d, vocab), F.cross_entropy
    x = torch.randn(batch, seq, d)
    outs = []
    for layer in layers:
        x = layer(x)
        x.retain_grad()
        outs.append(x)
    logits = head(norm(x) if norm_first else x)
    ce(logits.reshape(-1, vocab), torch.randint(0, vocab, (batch * seq,))).backward()
    assert all(torch.isfinite(o).all() and torch.isfinite(o.grad).all() for o in outs)
    return [o.std().item() for o in outs], [o.grad.std().item() for o in outs]


@pytest.mark.parametrize("norm_first", [True, False])
def test_deep_stack_stays_unit_where_torch_does_not(norm_first):
    # Both stacks end in readout + mean cross-entropy, as in training. The unit stack's CE gradient is not
    # divided by the b = 512 rows and every op is unit-scaled; torch's grads shrink by ~1/b (the FP16
    # underflow that loss scaling exists for).
    act_u, grad_u = _stack_stats(True, norm_first)
    act_t, grad_t = _stack_stats(False, norm_first)
    print(f"\nnorm_first={norm_first}")
    print(
        "unit  act σ:", " ".join(f"{v:.3g}" for v in act_u), "| grad σ:", " ".join(f"{v:.3g}" for v in grad_u)
    )
    print(
        "torch act σ:", " ".join(f"{v:.3g}" for v in act_t), "| grad σ:", " ".join(f"{v:.3g}" for v in grad_t)
    )
    assert all(0.5 <= v <= 2 for v in act_u + grad_u)
    assert not all(0.5 <= v <= 2 for v in act_t + grad_t)
    assert max(grad_t) < 1e-2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: unn.MultiHeadAttention(30, 4), "embed_dim=30.*num_heads=4"),
        (lambda: unn.MultiHeadAttention(32, 4)(torch.randn(2, 5, 16)), "\\(2, 5, 16\\)"),
        (lambda: unn.MLP(8, activation="swish"), "'swish'"),
        (lambda: unn.GELU("fast"), "'fast'"),
        (lambda: unn.TransformerLayer(16, 2, tau_attn=0.0), "tau=0.0"),
        (lambda: unn.TransformerLayer(16, 2, tau_mlp=1.2), "tau=1.2"),
        (lambda: unn.Embedding(10, 4, padding_idx=10), "padding_idx=10"),
        (lambda: unn.Dropout(1.0), "p=1.0"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.slow
def test_compile_fullgraph_forward_backward():
    torch.manual_seed(0)
    layer = unn.TransformerLayer(32, 4, 64, dropout=0.0)
    x = torch.randn(2, 8, 32, requires_grad=True)

    def step(inp):
        return layer(inp).square().mean()

    compiled = torch.compile(step, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = compiled(x)
    # the cached scale rules are bypassed while tracing (dynamo warns once per process about lru_cache)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    loss.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    step(x).backward()
    torch.testing.assert_close(g_compiled, x.grad, rtol=1e-4, atol=1e-6)
