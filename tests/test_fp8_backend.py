"""Fp8Backend on CPU (torch._scaled_mm runs FP8 on CPU from torch 2.13): numerics against the simulate
backend and float64 references built from torch's own float8 casts; dispatch, caching, memory, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from unitscale.precision import Recipe, apply
from unitscale.precision.backend import Exact
from unitscale.precision.fp8 import (
    Dispatch,
    Fp8Backend,
    cast_pair,
    check_pow2,
    fp8_backend_for,
    pow2_rms_scale,
)
from unitscale.precision.simulate import Simulate

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
ALWAYS = Dispatch.always()


def q64(t: torch.Tensor, dtype: torch.dtype, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Reference quantiser: torch's saturating-by-clamp RNE cast, as float64 (dequantised by ``scale``)."""
    fmax = torch.finfo(dtype).max
    s = torch.as_tensor(scale, dtype=torch.float64)
    return ((t.double() / s).clamp(-fmax, fmax).float().to(dtype).double()) * s


def run(backend, x, w, b, g, **factors):
    """Forward and backward of one linear; returns (y, dx, dw, db)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = backend.linear(x, w, b, **factors)
    y.backward(g)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def inputs(lead, k, n, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    g = torch.randn(*lead, n, generator=gen)
    return x, w, b, g


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / rms(ref), in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.pow(2).mean().sqrt())


FACTORS = {"alpha": 0.125, "beta_x": 0.25, "beta_w": 2.0 ** -5, "beta_b": 4.0}
SHAPES = [((32,), 64, 48), ((4, 16), 128, 32), ((2, 3, 16), 32, 64)]


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("factors", [{}, FACTORS], ids=["unit", "scaled"])
def test_matches_simulate_fp32(lead, k, n, bias, factors):
    # Same quantised operands and FP32 accumulation: equal up to summation order (rtol ~ K · 2^-24).
    x, w, b, g = inputs(lead, k, n, seed=k + n, bias=bias)
    fp8 = run(Fp8Backend(dispatch=ALWAYS), x, w, b, g, **factors)
    sim = run(Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b"), x, w, b, g, **factors)
    for got, ref in zip(fp8, sim):
        if ref is None:
            assert got is None
            continue
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.isfinite(got).all()
        assert max_rel(got, ref) < 1e-5


@pytest.mark.parametrize("lead,k,n", SHAPES[:2])
def test_matches_simulate_bf16_autocast(lead, k, n):
    # Both round the fp32 master weight and x to bf16 before FP8; y differs by bf16 output rounding (the
    # simulate backend rounds x Wᵀ and + bias separately: up to two bf16 ulps, 2^-7 relative), the bias
    # gradient by the simulate backend's bf16 row sum; dx and dw are fp32 from identical operands.
    x, w, b, g = inputs(lead, k, n, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp8 = run(Fp8Backend(dispatch=ALWAYS), x, w, b, g, **FACTORS)
        sim = run(Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b"), x, w, b, g, **FACTORS)
    assert fp8[0].dtype == torch.bfloat16
    for got, ref, rtol in zip(fp8, sim, (2 ** -7, 1e-5, 1e-5, 2 ** -6)):
        assert got.dtype == ref.dtype
        assert torch.isfinite(got).all()
        rms = float(ref.double().pow(2).mean().sqrt())
        torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=rtol * rms)


@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_factors_fold_exactly_vs_float64(lead, k, n):
    # Inputs already on the FP8 grids: the FP8 linear is then exact maths, checked against float64.
    x, w, b, g = inputs(lead, k, n, seed=3)
    x, w, g = (q64(t, dt).float() for t, dt in ((x, E4), (w, E4), (g, E5)))
    y, dx, dw, db = run(Fp8Backend(dispatch=ALWAYS), x, w, b, g, **FACTORS)
    X, W, B, G = (t.double() for t in (x, w, b, g))
    X2, G2 = X.reshape(-1, k), G.reshape(-1, n)
    ref = (FACTORS["alpha"] * X @ W.t() + B, FACTORS["beta_x"] * G @ W, FACTORS["beta_w"] * G2.t() @ X2,
           FACTORS["beta_b"] * G2.sum(0))
    for got, r in zip((y, dx, dw, db), ref):
        torch.testing.assert_close(got.double(), r, rtol=1e-6, atol=1e-6 * float(r.abs().max()))
    # ... and equals the compute-dtype Exact backend on the same inputs.
    for got, r in zip((y, dx, dw, db), run(Exact(), x, w, b, g, **FACTORS)):
        assert max_rel(got, r) < 1e-5


def test_unit_scaled_inputs_give_finite_outputs():
    # A unit-scaled linear (alpha = K^-1/2, betas from the paper) on σ = 1 data: no NaN/inf anywhere.
    m, k, n = 512, 1024, 256
    x, w, b, g = inputs((m,), k, n, seed=7)
    y, dx, dw, db = run(Fp8Backend(dispatch=ALWAYS), x, w, b, g, alpha=k ** -0.5, beta_x=n ** -0.5,
                        beta_w=m ** -0.5, beta_b=m ** -0.5)
    for t in (y, dx, dw, db):
        assert torch.isfinite(t).all()
    assert 0.5 < float(y.std()) < 2.0  # still unit scale after the FP8 GEMMs


def test_saturation_forward_and_backward():
    x, w, _, g = inputs((32,), 64, 32, seed=11, bias=False)
    x[0, :4] = torch.tensor([1e6, -1e6, math.inf, -math.inf])
    w[1, 5] = 1e4
    g[2, :2] = torch.tensor([1e9, -math.inf])
    y, dx, dw, _ = run(Fp8Backend(dispatch=ALWAYS), x, w, None, g)
    X, W, G = q64(x, E4), q64(w, E4), q64(g, E5)
    assert float(X[0, 0]) == 448 and float(X[0, 3]) == -448 and float(G[2, 0]) == 57344
    for got, r in zip((y, dx, dw), (X @ W.t(), G @ W, G.t() @ X)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), r, rtol=1e-6, atol=1e-6 * float(r.abs().max()))


def test_nan_propagates():
    x, w, _, g = inputs((16,), 32, 16, seed=12, bias=False)
    x[3, 7] = math.nan
    y, _, dw, _ = run(Fp8Backend(dispatch=ALWAYS), x, w, None, g)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[torch.arange(16) != 3]).all()
    assert torch.isnan(dw[:, 7]).all()


@pytest.mark.parametrize("x_scale,g_scale", [(64.0, 1.0), (1.0, 2.0 ** -20), (2.0 ** -3, 2.0 ** 4)])
def test_static_pow2_scales(x_scale, g_scale):
    # Tensors at σ = s: q(t / s)·s; the scales fold into the GEMM scales (float64 reference).
    x, w, _, g = inputs((32,), 64, 32, seed=13, bias=False)
    x, g = x * x_scale, g * g_scale
    be = Fp8Backend(dispatch=ALWAYS, activation_scale=x_scale, grad_scale=g_scale)
    y, dx, dw, _ = run(be, x, w, None, g, alpha=0.5, beta_x=2.0, beta_w=0.25)
    X, W, G = q64(x, E4, x_scale), q64(w, E4), q64(g, E5, g_scale)
    for got, r in zip((y, dx, dw), (0.5 * X @ W.t(), 2.0 * G @ W, 0.25 * G.t() @ X)):
        torch.testing.assert_close(got.double(), r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    # Without the matching static scale a gradient at σ = 2^-20 flushes to zero in E5M2 (min subnormal
    # 2^-16): the scaled path keeps it.
    if g_scale < 1:
        _, dx_unscaled, _, _ = run(Fp8Backend(dispatch=ALWAYS, activation_scale=x_scale), x, w, None, g,
                                   alpha=0.5, beta_x=2.0, beta_w=0.25)
        exact = 2.0 * g.double() @ w.double()
        assert max_rel(dx, exact) < 0.5 * max_rel(dx_unscaled, exact)


@pytest.mark.parametrize("rms", [2.0 ** -12, 0.02, 1.0, 37.0])
def test_pow2_rms_weight_scale(rms):
    x, w, _, g = inputs((32,), 64, 32, seed=14, bias=False)
    w = w / w.pow(2).mean().sqrt() * rms
    s = pow2_rms_scale(w)
    mantissa, exponent = math.frexp(float(s))
    assert s.dtype == torch.float32 and mantissa == 0.5
    assert abs((exponent - 1) - math.log2(rms)) <= 0.5
    y, dx, dw, _ = run(Fp8Backend(dispatch=ALWAYS, weight_scale="pow2_rms"), x, w, None, g)
    X, W, G = q64(x, E4), q64(w, E4, s), q64(g, E5)
    for got, r in zip((y, dx, dw), (X @ W.t(), G @ W, G.t() @ X)):
        torch.testing.assert_close(got.double(), r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    if rms < 2 ** -9:  # below E4M3's min subnormal 2^-9 a unit-scale cast flushes W; the RMS scale keeps it
        y_static = run(Fp8Backend(dispatch=ALWAYS), x, w, None, g)[0]
        exact = x.double() @ w.double().t()
        assert max_rel(y, exact) < 0.5 * max_rel(y_static, exact)


def test_pow2_rms_scale_of_zero_and_nonfinite_is_one():
    assert float(pow2_rms_scale(torch.zeros(4, 4))) == 1.0
    assert float(pow2_rms_scale(torch.full((2, 2), math.inf))) == 1.0


@pytest.mark.parametrize(
    "m,k,n,expected",
    [(8192, 4096, 4096, True), (16384, 4096, 14336, True), (8192, 8192, 8192, True),
     (4096, 2048, 2048, False), (2048, 1024, 1024, False), (16384, 4096, 1024, False),
     (8200, 4096, 4096, False)],  # 8200 is not a multiple of 16
)
def test_default_dispatch_rule(m, k, n, expected):
    assert Dispatch().use_fp8(m, k, n) is expected


def test_dispatch_falls_back_to_exact():
    # A small shape (default rule) and an unaligned shape (always-rule) run exactly as Exact does.
    cases = ((Fp8Backend(), ((32,), 64, 48)), (Fp8Backend(dispatch=ALWAYS), ((30,), 64, 48)))
    for backend, (lead, k, n) in cases:
        x, w, b, g = inputs(lead, k, n, seed=5)
        got, ref = run(backend, x, w, b, g, **FACTORS), run(Exact(), x, w, b, g, **FACTORS)
        for a, r in zip(got, ref):
            assert torch.equal(a, r)


def test_float64_input_falls_back():
    x, w, b, g = (t.double() for t in inputs((32,), 64, 48, seed=6))
    got, ref = run(Fp8Backend(dispatch=ALWAYS), x, w, b, g), run(Exact(), x, w, b, g)
    for a, r in zip(got, ref):
        assert a.dtype == torch.float64 and torch.equal(a, r)


def test_matmul_runs_in_compute_dtype():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 3, 16, 32, generator=gen), torch.randn(2, 3, 32, 8, generator=gen)
    assert torch.equal(Fp8Backend(dispatch=ALWAYS).matmul(a, b, alpha=0.5), Exact().matmul(a, b, alpha=0.5))


def test_only_fp8_copies_are_saved_for_backward():
    # Issue 12: the wgrad operand is the forward's FP8 copy of x; no fp32/bf16 activation is kept.
    x, w, b, _ = inputs((64,), 128, 32, seed=9)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Fp8Backend(dispatch=ALWAYS).linear(x, w, b)
    big = [t for t in saved if t.numel() > 1]
    assert sorted(tuple(t.shape) for t in big) == [(128, 32), (128, 64)]  # q(W)ᵀ and q(x)ᵀ
    assert all(t.dtype == E4 for t in big)


def test_frozen_weight_and_no_grad():
    x, w, b, g = inputs((32,), 64, 48, seed=10)
    be = Fp8Backend(dispatch=ALWAYS)
    xr = x.clone().requires_grad_()
    y = be.linear(xr, w, b)  # w and b do not require grad
    y.backward(g)
    torch.testing.assert_close(xr.grad.double(), q64(g, E5) @ q64(w, E4), rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(be.linear(x, w, b), y.detach())


def _forward(be: Fp8Backend, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return be.linear(x, w)


@pytest.mark.parametrize("weight_scale", ["static", "pow2_amax"])
def test_weight_changes_behind_autograd_reach_the_next_forward(weight_scale):
    # Regression (issue 20, item 1): FP8 weight copies were cached on (id, _version); ``weight.data``
    # mutations, ``weight.data = ...`` and FSDP2's all-gather into the same storage do not bump the version,
    # so later forwards kept multiplying by the old weight. Each call must read the weight as it is now.
    be = Fp8Backend(dispatch=ALWAYS, weight_scale=weight_scale)
    x, w0, _, g = inputs((32,), 64, 48, seed=11, bias=False)
    w = nn.Parameter(w0.clone())
    y0 = _forward(be, x, w)
    w.data.mul_(-1)  # in place on the storage, no version bump
    y1 = _forward(be, x, w)
    assert torch.equal(y1, -y0)  # RNE and the clamp are odd functions: q(-W) = -q(W), bit for bit
    w.data = torch.randn(48, 64, generator=torch.Generator().manual_seed(12))  # a new storage
    y2 = _forward(be, x, w)
    fresh = Fp8Backend(dispatch=ALWAYS, weight_scale=weight_scale)
    assert torch.equal(y2, _forward(fresh, x, w.detach()))
    # A training step through .data (what FSDP2 does when it copies the all-gathered shard in): forward and
    # input gradient of the next step use the new weight.
    xr = x.clone().requires_grad_()
    be.linear(xr, w).backward(g)
    w.data.copy_(w0)
    xr2 = x.clone().requires_grad_()
    y3 = be.linear(xr2, w)
    y3.backward(g)
    fresh = run(Fp8Backend(dispatch=ALWAYS, weight_scale=weight_scale), x, w0, None, g)
    assert torch.equal(y3.detach(), fresh[0]) and torch.equal(xr2.grad, fresh[1])


def test_cast_pair_layouts():
    t = torch.randn(5, 7)
    row, col = cast_pair(t, 1.0, E4)
    assert row.shape == (5, 7) and col.shape == (7, 5) and col.is_contiguous()
    assert torch.equal(row.t(), col) and torch.equal(row.double(), q64(t, E4))
    assert cast_pair(t, 1.0, E5, write_row=False)[0] is None
    assert cast_pair(t, 1.0, E5, write_col=False)[1] is None


@pytest.mark.parametrize(
    "kwargs,match",
    [({"weight_format": "fp8_e4a"}, "fp8_e4a"), ({"activation_format": "bf16"}, "bf16"),
     ({"weight_format": "fp8_e5b", "activation_format": "fp8_e5b"}, "E5M2 by E5M2"),
     ({"weight_format": "e5m2"}, "E5M2 by E5M2"),  # with the default E5M2 gradients
     ({"weight_scale": "amax"}, "amax"), ({"activation_scale": 3.0}, "power of two"),
     ({"grad_scale": 0.0}, "power of two"), ({"weight_static_scale": math.inf}, "power of two"),
     ({"weight_format": "nope"}, "nope")],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fp8Backend(**kwargs)


def test_other_errors():
    with pytest.raises(ValueError, match="does not match"):
        Fp8Backend().linear(torch.randn(4, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="min_k"):
        Dispatch(min_k=-1)
    with pytest.raises(ValueError, match="power of two"):
        check_pow2("s", 0.3)
    assert check_pow2("s", 2.0 ** -20) == 2.0 ** -20


def test_fp8_backend_for_recipe():
    be = fp8_backend_for(nn.Linear(4, 4), Recipe.fp8(backend="fp8"))
    assert isinstance(be, Fp8Backend) and be is fp8_backend_for(nn.Linear(8, 8), Recipe.fp8(backend="fp8"))
    assert be.formats == {"weight": E4, "activation": E4, "grad": E5} and be.dispatch == Dispatch()
    assert be.grad_scale == 1.0
    assert fp8_backend_for(nn.Linear(4, 4), Recipe.fp8(backend="fp8", loss_scale=2048.0)).grad_scale == 2048.0
    assert fp8_backend_for(nn.Linear(4, 4), Recipe.fp8(backend="fp8", loss_scale=1000.0)).grad_scale == 1024.0
    with pytest.raises(ValueError, match="fp8_e4a"):
        fp8_backend_for(nn.Linear(4, 4), Recipe.fp8(backend="fp8", variant="a"))
    with pytest.raises(ValueError, match="stochastic"):
        sr = Recipe(name="sr", weight_format="e4m3", activation_format="e4m3", grad_format="e5m2",
                    backend="fp8", grad_rounding="stochastic")
        fp8_backend_for(nn.Linear(4, 4), sr)


def test_apply_with_cuda_reported(monkeypatch):
    # precision.apply hands fp8 recipes to fp8_backend_for when CUDA is present; simulate that here.
    import unitscale.precision.fp8 as fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8, "fp8_supported", lambda device=None: True)  # a Hopper-class device
    model = apply(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), Recipe.fp8(backend="fp8"))
    assert all(isinstance(model[i].precision, Fp8Backend) for i in (0, 2))
    y = model(torch.randn(8, 64))  # default dispatch: these small shapes run in the compute dtype
    assert y.shape == (8, 16) and torch.isfinite(y).all()


def test_unit_scaled_gpt_trains_on_fp8_gemms():
    # Every aligned linear of a small unit-scaled GPT on FP8 GEMMs: finite, and the loss goes down.
    from unitscale.models import build

    torch.manual_seed(0)
    model = build("gpt", 64, scaling="unit", d_model=64, n_layers=2, n_heads=2, seq_len=32)
    backend = Fp8Backend(dispatch=ALWAYS)
    for module in model.modules():
        if hasattr(module, "precision"):
            module.precision = backend
    idx = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2 ** -6)
    calls, losses = [], []
    with mock.patch.object(torch, "_scaled_mm", wraps=torch._scaled_mm) as spy:
        for _ in range(10):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            calls.append(spy.call_count)
            assert torch.isfinite(loss)
            losses.append(float(loss))
    assert calls[0] >= 3 * 2 * 2  # at least qkv/out/ffn linears of both layers went through FP8 GEMMs
    assert losses[-1] < 0.8 * losses[0]


def _compiled_step(backend_name: str, weight_scale: str = "static") -> None:
    torch._dynamo.reset()
    be = Fp8Backend(dispatch=ALWAYS, weight_scale=weight_scale)
    x, w, b, g = inputs((2, 32), 64, 32, seed=4)

    compiled = torch.compile(be.linear, fullgraph=True, backend=backend_name)  # fullgraph: a break raises
    got = run(SimpleNamespace(linear=compiled), x, w, b, g, **FACTORS)
    ref = run(be, x, w, b, g, **FACTORS)
    for a, r in zip(got, ref):
        assert max_rel(a, r) < 1e-5


@pytest.mark.parametrize("weight_scale", ["static", "pow2_rms", "pow2_amax"])
def test_compile_fullgraph_aot_eager(weight_scale):
    _compiled_step("aot_eager", weight_scale)


def _op_calls(graphs) -> int:
    """How many calls of the registered cast op the traced graphs (and their subgraphs) hold."""
    op = torch.ops.unitscale.fp8_cast_transpose
    subs = [sub for gm in graphs for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)]
    return sum(node.target in (op, op.default) for sub in subs for node in sub.graph.nodes)


@pytest.mark.parametrize("autocast", [False, True])
def test_compile_traces_the_registered_cast_op_without_graph_breaks(autocast):
    # The compiled path must run the fused cast op (on CUDA: the Triton kernel), not Inductor's own cast.
    torch._dynamo.reset()
    be = Fp8Backend(dispatch=ALWAYS)
    x, w, b, g = inputs((2, 32), 64, 32, seed=5)

    def step(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return be.linear(x, w, b, **FACTORS)

    args = [t.detach().requires_grad_() for t in (x, w, b)]
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert _op_calls(explanation.graphs) == 3  # forward: x and W; backward: the output gradient
    torch._dynamo.reset()
    got = run(SimpleNamespace(linear=torch.compile(step, fullgraph=True, backend="aot_eager")), x, w, b, g)
    ref = run(SimpleNamespace(linear=step), x, w, b, g)
    assert all(torch.equal(a, r) for a, r in zip(got[1:], ref[1:]))
    # y: under bf16 autocast the traced _scaled_mm adds the bias after rounding (one bf16 ulp; also on main).
    tol = 2.0 ** -7 if autocast else 0.0
    rms = float(ref[0].float().pow(2).mean().sqrt())
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol * rms)


@pytest.mark.slow
def test_compile_fullgraph_inductor():  # ~5-10 s on 2 cores
    _compiled_step("inductor")


def test_warns_once_on_cuda_without_fp8_cores(monkeypatch):
    import unitscale.precision.fp8 as fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8, "fp8_supported", lambda device=None: False)  # e.g. an A100
    fp8._warn_no_fp8_cores.cache_clear()
    with pytest.warns(UserWarning, match="no FP8 tensor cores") as record:
        for _ in range(3):
            fp8_backend_for(nn.Linear(4, 4), Recipe.fp8(backend="fp8"))
    assert len([w for w in record if "FP8 tensor cores" in str(w.message)]) == 1


@pytest.mark.parametrize("k", [256, 1024])
def test_accumulation_bound_covers_13_bit_accumulation(k):
    # Independent check of the GPU tolerance model: sum K products sequentially, rounding every partial sum
    # to 13 mantissa bits (float64 frexp/ldexp), and compare with the exact sum.
    from unitscale.precision.fp8_accumulation import accumulation_bound, accumulation_tolerance

    p = torch.randn(4000, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    s = torch.zeros(4000, dtype=torch.float64)
    for j in range(k):
        mant, exp = torch.frexp(s + p[:, j])
        s = torch.ldexp(torch.round(mant * 2.0**14) / 2.0**14, exp)  # 1 + 13 bits
    err = float((s - p.sum(1)).norm() / p.sum(1).norm())
    assert accumulation_bound(k) / 10 < err < accumulation_bound(k)  # a bound, and not a vacuous one
    assert accumulation_tolerance(k) == 3 * accumulation_bound(k)
    with pytest.raises(ValueError, match="positive"):
        accumulation_bound(0)
