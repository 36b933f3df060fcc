"""Unit-scaled functional ops: exact structure (float64) and unit statistics at realistic sizes.

Exactness: each op's output equals the plain torch op times its documented alpha and each input gradient
equals the plain op's gradient times its documented beta (factors written out here from REFERENCE §2).
Statistics: unit-variance inputs and a unit-variance output gradient give σ ≈ 1 (±10%) everywhere the
paper promises unit scale; elsewhere the test says so and checks the promised value instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import unitscale.functional as U
from unitscale import rules
from unitscale.precision.backend import EXACT, Exact

E = math.e


def _inputs(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=dtype, generator=gen).requires_grad_() for s in shapes]


def _run(fn, xs, g):
    y = fn(*xs)
    grads = torch.autograd.grad(y, xs, g)
    return y.detach(), grads


def _check_exact(scaled_fn, plain_fn, shapes, alpha, betas, seed=0, bias_after_alpha=False):
    """y = alpha·plain(x) (or alpha·x Wᵀ + c for a linear's bias), ∂x_i = beta_i·∂plain/∂x_i."""
    xs = _inputs(shapes, seed=seed)
    with torch.no_grad():
        y0 = plain_fn(*xs)
    g = torch.randn(y0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    y, grads = _run(scaled_fn, xs, g)
    y_ref, grads_ref = _run(plain_fn, xs, g)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    if bias_after_alpha:  # the bias is added after the scale (backend: addmm(c, x, Wᵀ, alpha))
        y_ref = y_ref + (1 / alpha - 1) * xs[2].detach()
    torch.testing.assert_close(y, alpha * y_ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(betas)
    for got, ref, beta in zip(grads, grads_ref, betas):
        torch.testing.assert_close(got, beta * ref, rtol=1e-12, atol=1e-12)


# -- exact structure -----------------------------------------------------------------------------------

M, N, ROWS = 16, 24, 30  # linear fan_in, fan_out, rows of a (6, 5, 16) input
GM = (M * N) ** -0.25

EXACT_CASES = {
    "linear-gmean": (
        lambda x, w, b: U.linear(x, w, b),
        lambda x, w, b: F.linear(x, w, b),
        [(6, 5, M), (N, M), (N,)],
        GM,
        [GM, ROWS**-0.5, ROWS**-0.5],
    ),
    "linear-to_output": (
        lambda x, w: U.linear(x, w, constraint="to_output"),
        F.linear,
        [(6, 5, M), (N, M)],
        M**-0.5,
        [M**-0.5, ROWS**-0.5],
    ),
    "linear-none": (
        lambda x, w: U.linear(x, w, constraint=None),
        F.linear,
        [(6, 5, M), (N, M)],
        M**-0.5,
        [N**-0.5, ROWS**-0.5],
    ),
    "linear-grad_rows": (
        lambda x, w, b: U.linear(x, w, b, grad_rows=7.5),
        F.linear,
        [(6, 5, M), (N, M), (N,)],
        GM,
        [GM, 7.5**-0.5, 7.5**-0.5],
    ),
    "linear_readout": (
        lambda x, w, b: U.linear_readout(x, w, b),
        F.linear,
        [(6, 5, M), (N, M), (N,)],
        M**-0.5,
        [N**-0.5, ROWS**-0.5, ROWS**-0.5],
    ),
    "matmul-gmean": (
        U.matmul,
        torch.matmul,
        [(12, 8), (8, 20)],
        (12 * 8 * 20) ** (-1 / 6),
        [(12 * 8 * 20) ** (-1 / 6)] * 2,
    ),
    "matmul-batched": (
        lambda a, b: U.matmul(a, b, constraint=None),
        torch.matmul,
        [(3, 12, 8), (3, 8, 20)],
        8**-0.5,
        [20**-0.5, 12**-0.5],
    ),
    "matmul-broadcast-right": (
        lambda a, b: U.matmul(a, b, constraint=None),
        torch.matmul,
        [(3, 12, 8), (8, 20)],
        8**-0.5,
        [20**-0.5, 36**-0.5],
    ),
    "matmul-broadcast-left": (
        lambda a, b: U.matmul(a, b, constraint=None),
        torch.matmul,
        [(12, 8), (3, 8, 20)],
        8**-0.5,
        [60**-0.5, 12**-0.5],
    ),
    "matmul-to_output": (
        lambda a, b: U.matmul(a, b, constraint="to_output"),
        torch.matmul,
        [(12, 8), (8, 20)],
        8**-0.5,
        [8**-0.5, 8**-0.5],
    ),
    "layer_norm": (
        lambda x, w, b: U.layer_norm(x, 12, w, b),
        lambda x, w, b: F.layer_norm(x, (12,), w, b),
        [(4, 5, 12), (12,), (12,)],
        1.0,
        [1.0, 20**-0.5, 20**-0.5],
    ),
    "layer_norm-2d-shape": (
        lambda x, w: U.layer_norm(x, (5, 12), w),
        lambda x, w: F.layer_norm(x, (5, 12), w),
        [(4, 5, 12), (5, 12)],
        1.0,
        [1.0, 4**-0.5],
    ),
    "rms_norm": (
        lambda x, w: U.rms_norm(x, 12, w, grad_rows=9),
        lambda x, w: F.rms_norm(x, (12,), w),
        [(4, 5, 12), (12,)],
        1.0,
        [1.0, 9**-0.5],
    ),
    "softmax-gmean": (
        lambda x: U.softmax(x),
        lambda x: torch.softmax(x, -1),
        [(6, 40)],
        40 / math.sqrt(math.sqrt((E - 1) * E)),
        [40 / math.sqrt(math.sqrt((E - 1) * E))],
    ),
    "softmax-none-dim0-mult": (
        lambda x: U.softmax(x, 0, constraint=None, mult=0.5),
        lambda x: torch.softmax(0.5 * x, 0),
        [(40, 6)],
        40 / math.sqrt(math.expm1(0.25)),
        [40 / (0.5 * math.exp(0.125))],
    ),
    "add-gmean": (U.add, torch.add, [(4, 6), (4, 6)], 2 ** (-1 / 6), [2 ** (-1 / 6)] * 2),
    "add-broadcast-none": (
        lambda a, b: U.add(a, b, constraint=None),
        torch.add,
        [(4, 6), (6,)],
        2**-0.5,
        [1.0, 4**-0.5],
    ),
    "add-to_output": (
        lambda a, b: U.add(a, b, constraint="to_output"),
        torch.add,
        [(4, 6), (4, 6)],
        2**-0.5,
        [2**-0.5, 2**-0.5],
    ),
    # The weights are part of f: the scaled op *is* the plain weighted sum with its true gradient.
    "weighted_add": (
        lambda a, b: U.weighted_add(a, b, 0.6, 0.8),
        lambda a, b: 0.6 * a + 0.8 * b,
        [(4, 6), (4, 6)],
        1.0,
        [1.0, 1.0],
    ),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_structure(case):
    scaled_fn, plain_fn, shapes, alpha, betas = EXACT_CASES[case]
    _check_exact(
        scaled_fn,
        plain_fn,
        shapes,
        alpha,
        betas,
        bias_after_alpha=case.startswith("linear") and len(shapes) == 3,
    )


ACT_PLAIN = {
    "relu": torch.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _act(name):
    if name == "gelu_tanh":
        return lambda x, **kw: U.gelu(x, approximate="tanh", **kw)
    return getattr(U, name)


@pytest.mark.parametrize("name", list(ACT_PLAIN))
@pytest.mark.parametrize("constraint", ["gmean", None, "to_output"])
@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_activation_exact(name, constraint, mult):
    # Constants validated against REFERENCE in test_rules.py; here: where they are applied.
    a, b = rules.activation_constants(name, mult)
    if constraint == "gmean":
        a = b = math.sqrt(a * b)
    elif constraint == "to_output":
        b = a
    plain = ACT_PLAIN[name]
    _check_exact(
        lambda x: _act(name)(x, constraint=constraint, mult=mult),
        lambda x: plain(mult * x) / mult,
        [(8, 33)],
        a,
        [b],
    )


def test_embedding_exact_and_padding():
    V, d = 11, 6
    idx = torch.tensor([[1, 2, 3, 0, 10, 2, 2], [4, 4, 5, 6, 7, 8, 0]] * 2 + [[9, 9, 1, 1, 0, 0, 3]])
    beta = math.sqrt(V / idx.numel())
    _check_exact(lambda w: U.embedding(idx, w), lambda w: F.embedding(idx, w), [(V, d)], 1.0, [beta])
    _check_exact(
        lambda w: U.embedding(idx, w, grad_rows=4),
        lambda w: F.embedding(idx, w),
        [(V, d)],
        1.0,
        [math.sqrt(V / 4)],
    )
    (w,) = _inputs([(V, d)])
    U.embedding(idx, w, padding_idx=0).sum().backward()
    assert w.grad[0].abs().max() == 0 and w.grad[1].abs().min() > 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_exact(p):
    (x,) = _inputs([(64, 32)])
    torch.manual_seed(3)
    y = U.dropout(x, p)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.manual_seed(3)
    y0 = F.dropout(x, p)
    (g0,) = torch.autograd.grad(y0, x, g)
    torch.testing.assert_close(y, y0 * math.sqrt(1 - p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, g0 * math.sqrt(1 - p), rtol=1e-12, atol=1e-12)
    assert U.dropout(x, p, training=False) is x and U.dropout(x, 0.0) is x


ATTN_KW = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool-mask": {"attn_mask": torch.rand(10, 10, generator=torch.Generator().manual_seed(5)) > 0.3},
    "float-mask": {
        "attn_mask": torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    },
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("kw", list(ATTN_KW))
@pytest.mark.parametrize("precision", [None, EXACT])
def test_attention_exact(kw, precision):
    kwargs = dict(ATTN_KW[kw])
    if kw == "bool-mask":
        kwargs["attn_mask"] = kwargs["attn_mask"] | torch.eye(10, dtype=torch.bool)  # no fully masked row
    s = 10
    f = math.sqrt(s / E)
    _check_exact(
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v, precision=precision, **kwargs),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs),
        [(2, 3, 10, 8), (2, 3, s, 8), (2, 3, s, 5)],
        f,
        [f, f, f],
    )


def test_attention_dropout_exact():
    p, s = 0.25, 10
    f = math.sqrt(s / E * (1 - p))
    q, k, v = _inputs([(2, 3, 10, 8), (2, 3, s, 8), (2, 3, s, 8)])
    g = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    torch.manual_seed(7)
    y, grads = _run(lambda *t: U.scaled_dot_product_attention(*t, dropout_p=p), [q, k, v], g)
    torch.manual_seed(7)
    y0, grads0 = _run(lambda *t: F.scaled_dot_product_attention(*t, dropout_p=p), [q, k, v], g)
    torch.testing.assert_close(y, f * y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, f * b, rtol=1e-12, atol=1e-12)


# -- cross-entropy -------------------------------------------------------------------------------------


def test_cross_entropy_forward_and_backward():
    V = 7
    (x,) = _inputs([(3, 5, V)])
    t = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    t[0, :2] = -100
    t[2, 4] = -100
    valid = t != -100
    loss = U.cross_entropy(x, t)
    ref = F.cross_entropy(x.reshape(-1, V), t.reshape(-1))  # torch's mean already divides by valid rows
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(F.cross_entropy(x[valid], t[valid], reduction="sum").item() / 12)
    (g,) = torch.autograd.grad(loss, x)
    (g_sum,) = torch.autograd.grad(F.cross_entropy(x.reshape(-1, V), t.reshape(-1), reduction="sum"), x)
    beta = V / math.sqrt(V - 1)
    torch.testing.assert_close(g, beta * g_sum, rtol=1e-12, atol=1e-12)  # per row, not ÷ rows
    assert g[~valid].abs().max() == 0
    softmax_minus_onehot = torch.softmax(x, -1) - F.one_hot(t.clamp(min=0), V)
    torch.testing.assert_close(g[valid], beta * softmax_minus_onehot[valid].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cross_entropy_reductions(reduction):
    V = 5
    (x,) = _inputs([(4, 6, V)])
    t = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(4))
    t[1, 1] = 3  # keep in range
    t[2, 2] = -1
    loss = U.cross_entropy(x, t, ignore_index=-1, reduction=reduction)
    ref = F.cross_entropy(x.permute(0, 2, 1), t, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(loss.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, x, w)
    (g0,) = torch.autograd.grad(ref, x, w)
    torch.testing.assert_close(g, 2.5 * g0, rtol=1e-12, atol=1e-12)


def test_cross_entropy_grad_rows_and_empty():
    V = 4
    (x,) = _inputs([(6, V)])
    t = torch.tensor([0, 1, 2, 3, -100, -100])
    loss = U.cross_entropy(x, t, grad_rows=8)
    assert loss.item() == pytest.approx(F.cross_entropy(x, t, reduction="sum").item() / 8, rel=1e-12)
    empty = U.cross_entropy(x, torch.full((6,), -100))
    assert empty.item() == 0.0
    (g,) = torch.autograd.grad(empty, x)
    assert g.abs().max() == 0


@pytest.mark.parametrize(
    "logits, target, kw, match",
    [
        ((4, 5), (3,), {}, "target shape \\(3,\\)"),
        ((4, 5), (4,), {"reduction": "avg"}, "'avg'"),
        ((4, 5), None, {}, "integer dtype"),
    ],
)
def test_cross_entropy_errors(logits, target, kw, match):
    x = torch.randn(*logits)
    t = torch.rand(4) if target is None else torch.zeros(target, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        U.cross_entropy(x, t, **kw)


# -- residuals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 0.01, 1.0])
def test_residual_split_add(tau):
    x, w = _inputs([(16, 8), (8,)])
    g = torch.randn(16, 8, dtype=torch.float64)
    skip, branch_in = U.residual_split(x, tau)
    branch_out = branch_in * w
    branch_out.retain_grad()
    y = U.residual_add(skip, branch_out, tau)
    y.backward(g)
    a, c = math.sqrt(1 - tau), math.sqrt(tau)
    torch.testing.assert_close(y, a * x + c * x * w, rtol=1e-12, atol=1e-12)
    # The branch output gets the unscaled gradient (delayed scale) ...
    torch.testing.assert_close(branch_out.grad, g, rtol=0, atol=0)
    # ... and the split applies √τ / √(1−τ): in total the true gradient of the forward function.
    torch.testing.assert_close(x.grad, a * g + c * w.detach() * g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, c * (x.detach() * g).sum(0) / c, rtol=1e-12, atol=1e-12)


def test_residual_unit_statistics():
    torch.manual_seed(0)
    x = torch.randn(4096, 512, requires_grad=True)
    skip, branch = U.residual_split(x, 0.3)
    h = U.gelu(branch, constraint=None)  # a unit branch
    h.retain_grad()
    y = U.residual_add(skip, U.linear(h, torch.randn(512, 512), constraint=None), 0.3)
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, h.grad):
        assert t.std().item() == pytest.approx(1.0, rel=0.1)


def test_residual_tau_rules():
    assert U.residual_tau(3) == 0.5
    assert U.residual_tau(3, tau=0.01) == 0.01
    assert [U.residual_tau(i, "running_mean") for i in range(4)] == [1.0, 0.5, 1 / 3, 0.25]
    assert [U.residual_tau(i, "running_mean", offset=2) for i in range(3)] == [0.5, 1 / 3, 0.25]
    assert U.residual_tau(0, "ratio", tau=1.0) == 0.5
    assert U.residual_tau(0, "ratio", tau=2.0) > 0.5  # larger ratio favours the branch
    with pytest.raises(ValueError, match="tau=1.0"):
        U.residual_tau(0, "fixed", tau=1.0)
    with pytest.raises(ValueError, match="tau=0"):
        U.residual_tau(0, "fixed", tau=0)
    with pytest.raises(ValueError, match="offset=0"):
        U.residual_tau(0, "running_mean", offset=0)
    with pytest.raises(ValueError, match="index=-1"):
        U.residual_tau(-1)
    with pytest.raises(ValueError, match="'cosine'.*running_mean"):
        U.residual_tau(0, "cosine")
    with pytest.raises(ValueError, match="tau=1.5"):
        U.residual_split(torch.ones(2), 1.5)
    with pytest.raises(ValueError, match="tau=-0.1"):
        U.residual_add(torch.ones(2), torch.ones(2), -0.1)
    with pytest.raises(ValueError, match="skip shape"):
        U.residual_add(torch.ones(2), torch.ones(3), 0.5)


# -- unit statistics at realistic sizes ----------------------------------------------------------------

B, D, H = 4096, 512, 2048
PROMISED = {
    # name: (fn, shapes, expected output σ, expected input-grad σs)
    "linear-none": (lambda x, w: U.linear(x, w, constraint=None), [(B, D), (H, D)], 1.0, [1.0, 1.0]),
    # gmean: forward off by (m/n)^¼, input grad by (n/m)^¼ (REFERENCE §1.3); weight grad (cut) unit.
    "linear-gmean": (lambda x, w: U.linear(x, w), [(B, D), (H, D)], (D / H) ** 0.25, [(H / D) ** 0.25, 1.0]),
    "linear-bias": (
        lambda x, w, b: U.linear(x, w, b, constraint=None),
        [(B, D), (D, D), (D,)],
        1.0,
        [1.0, 1.0, 1.0],
    ),
    "linear_readout": (lambda x, w: U.linear_readout(x, w), [(B, D), (H, D)], 1.0, [1.0, 1.0]),
    "matmul-none": (lambda a, b: U.matmul(a, b, constraint=None), [(B, D), (D, 1024)], 1.0, [1.0, 1.0]),
    "matmul-batched": (
        lambda a, b: U.matmul(a, b, constraint=None),
        [(16, 256, 64), (16, 64, 256)],
        1.0,
        [1.0, 1.0],
    ),
    "layer_norm": (lambda x, w, b: U.layer_norm(x, D, w, b), [(B, D), (D,), (D,)], 1.0, [1.0, 1.0, 1.0]),
    "rms_norm": (lambda x, w: U.rms_norm(x, D, w), [(B, D), (D,)], 1.0, [1.0, 1.0]),
    "softmax-none": (lambda x: U.softmax(x, constraint=None), [(B, 256)], 1.0, [1.0]),
    # gmean softmax: forward σ = gmean/alpha = √(β/α) ≈ 0.89, gradient √(α/β) ≈ 1.12 (constrained, not unit).
    "softmax-gmean": (
        lambda x: U.softmax(x),
        [(B, 256)],
        math.sqrt(math.sqrt(E - 1) / math.sqrt(E)),
        [math.sqrt(math.sqrt(E) / math.sqrt(E - 1))],
    ),
    "add-none": (lambda a, b: U.add(a, b, constraint=None), [(B, D), (B, D)], 1.0, [1.0, 1.0]),
    "add-broadcast": (lambda a, b: U.add(a, b, constraint=None), [(B, D), (D,)], 1.0, [1.0, 1.0]),
    "weighted_add": (lambda a, b: U.weighted_add(a, b, 0.6, 0.8), [(B, D), (B, D)], 1.0, [0.6, 0.8]),
    "dropout": (lambda x: U.dropout(x, 0.3), [(B, D)], 1.0, [1.0]),
    "attention": (
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v),
        [(4, 8, 256, 64)] * 3,
        1.0,
        [1.0, 1.0, 1.0],
    ),
    "attention-dropout": (
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v, dropout_p=0.2),
        [(4, 8, 256, 64)] * 3,
        1.0,
        [1.0, 1.0, 1.0],
    ),
    "attention-backend": (
        lambda q, k, v: U.scaled_dot_product_attention(q, k, v, precision=EXACT),
        [(4, 8, 256, 64)] * 3,
        1.0,
        [1.0, 1.0, 1.0],
    ),
}
for _name in ("relu", "gelu", "silu", "tanh", "sigmoid"):
    PROMISED[f"{_name}-none"] = (lambda x, n=_name: getattr(U, n)(x, constraint=None), [(B, D)], 1.0, [1.0])
    _a, _b = rules.activation_constants(_name)
    # gmean: forward σ = gmean/alpha = √(β/α); input grad σ = √(α/β).
    PROMISED[f"{_name}-gmean"] = (
        lambda x, n=_name: getattr(U, n)(x),
        [(B, D)],
        math.sqrt(_b / _a),
        [math.sqrt(_a / _b)],
    )
PROMISED["gelu-mult"] = (lambda x: U.gelu(x, constraint=None, mult=0.55), [(B, D)], 1.0, [1.0])


@pytest.mark.parametrize("name", list(PROMISED))
def test_unit_statistics(name):
    fn, shapes, out_std, grad_stds = PROMISED[name]
    torch.manual_seed(0)
    xs = [torch.randn(*s).requires_grad_() for s in shapes]
    if name == "linear-bias":  # biases start at 0 (unit init)
        xs[2].data.zero_()
    if name == "layer_norm":  # gains 1, biases 0 at init, as the modules initialise them
        xs[1].data.fill_(1.0)
        xs[2].data.zero_()
    if name == "rms_norm":
        xs[1].data.fill_(1.0)
    y = fn(*xs)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, xs, g)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    assert y.std().item() == pytest.approx(out_std, rel=0.1), "output"
    for i, (t, want) in enumerate(zip(grads, grad_stds)):
        assert t.std().item() == pytest.approx(want, rel=0.1), f"grad {i}"


def test_sigmoid_mean_is_not_normalised():
    # REFERENCE §2: sigmoid's alpha normalises σ, not the mean; the scaled output has mean ≈ 4.801/2.
    torch.manual_seed(0)
    y = U.sigmoid(torch.randn(B, D), constraint=None)
    assert y.mean().item() == pytest.approx(4.801 / 2, rel=0.01)


def test_attention_causal_is_not_unit():
    # The US-2023 rule assumes every query sees all s keys; under a causal mask row i sees i+1 keys, so
    # the output σ exceeds 1 (no unit promise). What is promised is the factor: exactness tests above.
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 8, 256, 64) for _ in range(3))
    y = U.scaled_dot_product_attention(q, k, v, is_causal=True)
    print(f"causal attention output σ = {y.std().item():.2f} (non-causal ≈ 1)")
    assert 1.5 < y.std().item() < math.sqrt(math.log(256) + 0.58) * 1.1


def test_cross_entropy_gradient_is_unit():
    # Forward is the loss (no unit promise); the logit gradient is unit at near-uniform softmax.
    torch.manual_seed(0)
    x = torch.randn(B, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (B,))
    loss = U.cross_entropy(x, t)
    loss.backward()
    assert loss.item() == pytest.approx(F.cross_entropy(x, t).item(), rel=1e-6)
    assert x.grad.std().item() == pytest.approx(1.0, rel=0.1)


def test_embedding_gradient_is_unit():
    torch.manual_seed(0)
    w = torch.randn(512, D, requires_grad=True)
    idx = torch.randint(0, 512, (8, 512))
    y = U.embedding(idx, w)
    y.backward(torch.randn_like(y))
    assert y.std().item() == pytest.approx(1.0, rel=0.1)
    assert w.grad.std().item() == pytest.approx(1.0, rel=0.1)


# -- backends and errors -------------------------------------------------------------------------------


class Counting(Exact):
    def __init__(self):
        self.calls = []

    def cast_forward(self, t, role):
        self.calls.append(role)
        return t


@pytest.mark.parametrize(
    "call, n_calls",
    [
        (lambda p: U.linear(torch.randn(3, 4), torch.randn(5, 4), precision=p), 2),
        (lambda p: U.linear_readout(torch.randn(3, 4), torch.randn(5, 4), precision=p), 2),
        (lambda p: U.matmul(torch.randn(3, 4), torch.randn(4, 5), precision=p), 2),
        (
            lambda p: U.scaled_dot_product_attention(
                *(torch.randn(1, 2, 6, 4) for _ in range(3)), precision=p
            ),
            4,
        ),
    ],
)
def test_matmuls_go_through_the_backend(call, n_calls):
    backend = Counting()
    call(backend)
    assert len(backend.calls) == n_calls


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: U.linear(torch.ones(2, 3), torch.ones(4, 5)), "input feature size 3"),
        (lambda: U.linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(5)), "bias shape \\(5,\\)"),
        (lambda: U.linear(torch.ones(2, 3), torch.ones(4, 3), constraint="mean"), "'mean'"),
        (lambda: U.linear(torch.ones(2, 3), torch.ones(4, 3), grad_rows=0), "grad_rows.*0"),
        (lambda: U.matmul(torch.ones(2, 3), torch.ones(4, 5)), "\\(2, 3\\) and \\(4, 5\\)"),
        (lambda: U.matmul(torch.ones(2, 2, 3), torch.ones(3, 3, 5)), "do not broadcast"),
        (lambda: U.matmul(torch.ones(2, 3), torch.ones(3, 5), constraint="x"), "'x'"),
        (lambda: U.gelu(torch.ones(2), constraint="bad"), "'bad'"),
        (lambda: U.gelu(torch.ones(2), approximate="fast"), "'fast'"),
        (lambda: U.relu(torch.ones(2), mult=-1.0), "mult.*-1.0"),
        (lambda: U.softmax(torch.ones(2, 3), constraint="nope"), "'nope'"),
        (lambda: U.add(torch.ones(2, 3), torch.ones(4)), "\\(2, 3\\) and \\(4,\\)"),
        (lambda: U.add(torch.ones(2), torch.ones(2), constraint="sum"), "'sum'"),
        (lambda: U.weighted_add(torch.ones(2), torch.ones(2), 1.0, 1.0), "= 1"),
        (lambda: U.dropout(torch.ones(2), 1.0), "p=1.0"),
        (lambda: U.layer_norm(torch.ones(2, 3), 4), "normalized_shape \\(4,\\)"),
        (lambda: U.rms_norm(torch.ones(2, 3), (2, 4)), "normalized_shape \\(2, 4\\)"),
        (lambda: U.embedding(torch.zeros(3, dtype=torch.long), torch.ones(4)), "weight must be"),
        (
            lambda: U.scaled_dot_product_attention(
                torch.ones(1, 4, 8), torch.ones(1, 4, 6), torch.ones(1, 4, 8)
            ),
            "incompatible query",
        ),
        (lambda: U.scaled_dot_product_attention(*(torch.ones(1, 4, 8),) * 3, dropout_p=1.5), "dropout_p=1.5"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- matmul_scales: the shape → (b, m, n) bookkeeping, checked against rules.matmul_rule -------------------


def _terms_per_grad_element(left_shape, right_shape) -> tuple[float, float]:
    """(b, n) counted by autograd: with all-ones inputs and output gradient, each element of ∂right is the
    number of terms summed into it (b), each element of ∂left likewise (n); they must be uniform."""
    left = torch.ones(left_shape, dtype=torch.float64, requires_grad=True)
    right = torch.ones(right_shape, dtype=torch.float64, requires_grad=True)
    y = torch.matmul(left, right)
    g_left, g_right = torch.autograd.grad(y, (left, right), torch.ones_like(y))
    assert torch.all(g_left == g_left.flatten()[0]) and torch.all(g_right == g_right.flatten()[0])
    return g_right.flatten()[0].item(), g_left.flatten()[0].item()


@pytest.mark.parametrize("constraint", [None, "gmean", "to_output"])
@pytest.mark.parametrize(
    ("left", "right"),
    [
        ((7, 5), (5, 3)),
        ((4, 7, 5), (4, 5, 3)),
        ((2, 4, 7, 5), (5, 3)),  # right broadcast over 8 batch elements: b counts them
        ((7, 5), (2, 4, 5, 3)),  # left broadcast: n counts them
        ((2, 1, 7, 5), (1, 3, 5, 9)),  # both broadcast
        ((6, 1, 5), (6, 5, 1)),
    ],
)
def test_matmul_scales_match_the_rule(left, right, constraint):
    b, n = _terms_per_grad_element(left, right)
    want = rules.matmul_rule(b, left[-1], n).resolve(constraint)
    alpha, beta_left, beta_right = U.matmul_scales(torch.Size(left), list(right), constraint)
    assert (alpha, beta_left, beta_right) == pytest.approx(
        (want[0], want[1]["left"], want[1]["right"]), rel=1e-12
    )
    # ... and U.matmul applies exactly these factors (float64: the output, both input gradients)
    _check_exact(
        lambda a, c: U.matmul(a, c, constraint=constraint),
        torch.matmul,
        [left, right],
        alpha,
        [beta_left, beta_right],
    )


@pytest.mark.parametrize(
    ("left", "right", "constraint", "match"),
    [
        ((2, 3), (4, 5), "gmean", "\\(2, 3\\) and \\(4, 5\\)"),
        ((3,), (3, 5), "gmean", "\\(3,\\) and \\(3, 5\\)"),
        ((2, 2, 3), (3, 3, 5), "gmean", "do not broadcast"),
        ((2, 3), (3, 5), "mean", "'mean'"),
    ],
)
def test_matmul_scales_errors(left, right, constraint, match):
    with pytest.raises(ValueError, match=match):
        U.matmul_scales(left, right, constraint)


def test_attention_probabilities_enter_the_backend_scaled_into_e4m3_normal_range():
    """The PV matmul receives P·2^8 (``rules.attention_probs_scale`` of a backend naming no format): causal
    rows at s = 512 carry P ≈ 1/(i+1), mostly below E4M3's smallest normal 2^-6; scaled, almost all are
    normal and the largest (p = 1, row 0) is 256, below E4M3's max 448."""
    from unitscale.formats import get_format

    seen: list[torch.Tensor] = []

    class Recording(Exact):
        def cast_forward(self, t, role):
            seen.append(t.detach())
            return t

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 512, 16, generator=g) for _ in range(3))
    y = U.scaled_dot_product_attention(q, k, v, is_causal=True, precision=Recording())
    plain = U.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
    probs = seen[2]  # casts: q, kᵀ (QKᵀ), then P, v (PV)
    e4m3 = get_format("e4m3")
    assert rules.attention_probs_scale(None) == 256 and probs.max().item() == 256 < e4m3.max
    torch.testing.assert_close(probs.sum(-1), torch.full(probs.shape[:-1], 256.0))
    nonzero = probs[probs > 0]
    scaled_subnormal = (nonzero < e4m3.min_normal).float().mean().item()
    plain_subnormal = (nonzero / 256 < e4m3.min_normal).float().mean().item()
    print(f"E4M3 subnormal fraction of P: plain {plain_subnormal:.3f}, scaled {scaled_subnormal:.4f}")
    assert scaled_subnormal < 0.01 and plain_subnormal > 0.5
