"""Fp8Backend on a CUDA FP8 device (sm_89+): equality with the simulate backend, bit-exact Triton casts,
torch.compile(fullgraph=True) without graph breaks. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from unitscale.precision.fp8 import Dispatch, Fp8Backend, fp8_supported
from unitscale.precision.fp8_accumulation import accumulation_tolerance
from unitscale.precision.simulate import Simulate

pytestmark = pytest.mark.skipif(not fp8_supported("cuda"), reason="needs CUDA with FP8 (sm_89+)")

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
ALWAYS = Dispatch.always()
FACTORS = {"alpha": 0.125, "beta_x": 0.25, "beta_w": 2.0**-5, "beta_b": 4.0}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the simulate reference must accumulate in full FP32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def inputs(lead, k, n, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen, device="cuda")
    w = torch.randn(n, k, generator=gen, device="cuda")
    b = torch.randn(n, generator=gen, device="cuda")
    g = torch.randn(*lead, n, generator=gen, device="cuda")
    return x, w, b, g


def run(linear, x, w, b, g, **factors):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = linear(x, w, b, **factors)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


def max_rel(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.pow(2).mean().sqrt())


def rel_rms(a, ref):
    """‖a − ref‖ / ‖ref‖ in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def assert_close_rms(a, ref, rtol):
    """|a − ref| ≤ rtol·(|ref| + rms(ref)) elementwise: relative, with an rms floor near zero."""
    rms = float(ref.double().pow(2).mean().sqrt())
    torch.testing.assert_close(a.double(), ref.double(), rtol=rtol, atol=rtol * rms)


@pytest.mark.parametrize("lead,k,n", [((256,), 512, 384), ((4, 128), 1024, 256), ((2, 8, 64), 256, 512)])
@pytest.mark.parametrize("factors", [{}, FACTORS], ids=["unit", "scaled"])
def test_matches_simulate_fp32(lead, k, n, factors):
    # Identical quantised operands: the GEMMs differ by Hopper's reduced-precision accumulation only (the
    # simulate reference accumulates in fp32 with TF32 off). Tolerance: 3× the 13-bit accumulation model's
    # bound (precision/fp8_accumulation.py) for each GEMM's reduction length (y: K = k; ∂x: K = n; ∂W: rows).
    x, w, b, g = inputs(lead, k, n, seed=k)
    fp8 = run(Fp8Backend(dispatch=ALWAYS).linear, x, w, b, g, **factors)
    sim = run(Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b").linear, x, w, b, g, **factors)
    rows = math.prod(lead)
    for name, got, ref, red in zip(("y", "dx", "dW"), fp8, sim, (k, n, rows)):
        assert got.dtype == ref.dtype and torch.isfinite(got).all()
        err, tol = rel_rms(got, ref), accumulation_tolerance(red)
        print(f"{name}: K={red} rel rms error {err:.2e} (tolerance {tol:.2e})")
        assert err < tol
    torch.testing.assert_close(fp8[3], sim[3], rtol=1e-6, atol=1e-6)  # ∂c: the same unquantised row sum


@pytest.mark.parametrize("lead,k,n", [((512,), 1024, 768), ((2, 256), 2048, 512)])
def test_matches_simulate_bf16_autocast(lead, k, n):
    x, w, b, g = inputs(lead, k, n, seed=n)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fp8 = run(Fp8Backend(dispatch=ALWAYS).linear, x, w, b, g, **FACTORS)
        sim = run(Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b").linear, x, w, b, g, **FACTORS)
    assert fp8[0].dtype == torch.bfloat16
    # y: bf16 output rounding (≤ 2 ulps, 2^-7) plus fast accumulation; dx: bf16 in the simulate backend.
    for got, ref, rtol in zip(fp8, sim, (2**-6, 2**-7, 2**-7, 2**-6)):
        assert torch.isfinite(got).all()
        assert_close_rms(got, ref, rtol)


def test_bias_added_after_the_scales():
    # Operands on the FP8 grids: y = alpha·x Wᵀ + c exactly (float64 reference) up to bf16 output rounding.
    x, w, b, _ = inputs((64,), 128, 64, seed=3)
    x, w = x.to(E4).float(), w.to(E4).float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = Fp8Backend(dispatch=ALWAYS).linear(x, w, b, alpha=0.125)
    ref = 0.125 * x.double() @ w.double().t() + b.bfloat16().double()
    torch.testing.assert_close(y.double(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))


def test_default_dispatch_runs_three_fp8_gemms_and_stays_finite():
    m, k, n = 8192, 4096, 4096
    x, w, b, g = inputs((m,), k, n, seed=5)
    be = Fp8Backend()  # default rule: this shape qualifies
    with mock.patch.object(torch, "_scaled_mm", wraps=torch._scaled_mm) as spy:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, dx, dw, db = run(
                be.linear, x, w, b, g, alpha=k**-0.5, beta_x=n**-0.5, beta_w=m**-0.5, beta_b=m**-0.5
            )
    assert spy.call_count == 3  # forward, dgrad, wgrad
    assert [c.kwargs["use_fast_accum"] for c in spy.call_args_list] == [True, False, False]
    for t in (y, dx, dw, db):
        assert torch.isfinite(t).all()


def test_small_shape_dispatches_to_compute_dtype():
    x, w, b, g = inputs((256,), 512, 512, seed=6)
    with mock.patch.object(torch, "_scaled_mm", wraps=torch._scaled_mm) as spy:
        run(Fp8Backend().linear, x, w, b, g)
    assert spy.call_count == 0


def _torch_cast(t, inv, dtype, round_to):
    """Reference: torch's own (RNE) casts with an explicit clamp, in float32."""
    y = (t.to(round_to) if round_to is not None else t).float() * inv
    fmax = torch.finfo(dtype).max
    return y.clamp(-fmax, fmax).to(dtype)


@pytest.mark.parametrize("dtype", [E4, E5])
@pytest.mark.parametrize(
    "src,round_to",
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
)
@pytest.mark.parametrize("inv", [1.0, 2.0**-4, 2.0**5])
@pytest.mark.parametrize("shape", [(1000, 333), (4096, 4096), (17, 4100)])
def test_triton_cast_bit_exact(dtype, src, round_to, inv, shape):
    pytest.importorskip("triton")
    from unitscale.precision.fp8_kernels import cast_transpose

    gen = torch.Generator(device="cuda").manual_seed(shape[0])
    # Every binade from deep subnormal to overflow, plus ±0, ±inf, NaN and ties.
    sigma = torch.pow(2.0, torch.randint(-24, 18, shape, generator=gen, device="cuda").float())
    t = torch.randn(shape, generator=gen, device="cuda") * sigma
    t.view(-1)[:8] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, 1.0625, -1.0625])
    t = t.to(src)
    row, col = cast_transpose(t, torch.tensor([inv], device="cuda"), dtype, round_to=round_to)
    ref = _torch_cast(t, inv, dtype, round_to)
    nan = torch.isnan(ref.float())
    assert torch.equal(torch.isnan(row.float()), nan)  # NaN stays NaN (no silent saturation)
    assert torch.equal(row.view(torch.uint8)[~nan], ref.view(torch.uint8)[~nan])
    # The transposed copy, bit for bit against torch's own cast (the layout a Triton miscompile corrupts).
    ref_t, nan_t = ref.t().contiguous(), nan.t().contiguous()
    assert torch.equal(torch.isnan(col.float()), nan_t)
    assert torch.equal(col.view(torch.uint8)[~nan_t], ref_t.view(torch.uint8)[~nan_t])


def test_triton_and_torch_paths_give_the_same_linear():
    pytest.importorskip("triton")
    x, w, b, g = inputs((512,), 1024, 512, seed=8)
    be = Fp8Backend(dispatch=ALWAYS)
    eager = run(be.linear, x, w, b, g)  # eager CUDA: Triton casts
    with mock.patch("unitscale.precision.fp8_kernels.TRITON_AVAILABLE", False):  # the op's torch-ops path
        plain = run(be.linear, x, w, b, g)
    for a, r in zip(eager, plain):
        assert torch.equal(a, r)


@pytest.mark.parametrize("autocast", [False, True])
def test_compile_fullgraph_no_graph_breaks(autocast):
    torch._dynamo.reset()
    x, w, b, g = inputs((4, 1024), 1024, 2048, seed=9)
    be = Fp8Backend(dispatch=ALWAYS)

    def step(x, w, b):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return be.linear(x, w, b, **FACTORS)

    explanation = torch._dynamo.explain(step)(*(t.detach().requires_grad_() for t in (x, w, b)))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True), x, w, b, g)
    eager = run(step, x, w, b, g)
    for a, r in zip(compiled, eager):
        assert torch.isfinite(a).all()
        assert_close_rms(a, r, 2**-7 if autocast else 1e-5)  # bf16 y: fusion may move it by one ulp


def test_compiled_linear_runs_the_fused_triton_cast():
    # Registered as a triton_op, the cast appears in Inductor's code as this kernel (not Inductor's own).
    pytest.importorskip("triton")
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w, b, g = inputs((1024,), 1024, 512, seed=11)
    be = Fp8Backend(dispatch=ALWAYS)
    compiled = torch.compile(lambda x, w: be.linear(x, w), fullgraph=True)
    xr, wr = x.requires_grad_(), w.requires_grad_()
    _, code = run_and_get_code(lambda: compiled(xr, wr).backward(g))
    text = "\n".join(code)
    assert "_cast_transpose_body" in text, text[:2000]


def test_pow2_rms_on_cuda_matches_reference():
    x, w, b, g = inputs((256,), 512, 256, seed=10)
    w = w * 0.003
    be = Fp8Backend(dispatch=ALWAYS, weight_scale="pow2_rms")
    y = be.linear(x, w)
    s = 2.0 ** round(math.log2(float(w.pow(2).mean().sqrt())))
    ref = x.to(E4).double() @ ((w / s).to(E4).double() * s).t()
    assert max_rel(y, ref) < 1e-2
