"""INT4 GEMMs on the Hopper FP8 carrier match the exact reference bit for bit (REFERENCE §5.7)."""

from __future__ import annotations

import pytest
import torch

from unitscale.precision.int4 import Int4Config, Int4Linear, fp8_available, fp8_gemm, reference_gemm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fp8_available(), reason="needs CUDA with FP8 (sm_89+)"),
]


@pytest.mark.parametrize("m,k,n", [(64, 768, 48), (33, 4096, 17), (256, 16384, 128)])
def test_fp8_gemm_bit_equal_to_reference(m, k, n):
    gen = torch.Generator(device="cuda").manual_seed(k)
    a = torch.randint(-8, 8, (m, k), generator=gen, device="cuda").float()
    b = torch.randint(-8, 9, (k, n), generator=gen, device="cuda").float()
    assert torch.equal(fp8_gemm(a, b), reference_gemm(a, b))
    assert torch.equal(fp8_gemm(a, b).cpu().to(torch.int64), a.cpu().long() @ b.cpu().long())


@pytest.mark.parametrize("value,k", [(7, 768), (7, 16384), (-8, 65536)])
def test_fp8_gemm_worst_case(value, k):
    a = torch.full((16, k), float(value), device="cuda")
    b = torch.full((k, 16), float(value), device="cuda")
    out = fp8_gemm(a, b)
    assert torch.equal(out, reference_gemm(a, b)) and float(out[0, 0]) == value * value * k


def test_int4_linear_fp8_matches_reference_backend():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(128, 256, generator=gen, device="cuda")
    w = torch.randn(64, 256, generator=gen, device="cuda")
    ref = Int4Linear(256, Int4Config(gemm="reference"), device="cuda")
    fp8 = Int4Linear(256, Int4Config(gemm="fp8"), device="cuda")
    y_ref, y_fp8 = ref.linear(x, w), fp8.linear(x, w)
    # Same codes (up to float32 vs float64 Hadamard ties) and exact GEMMs: outputs agree to float32 rounding.
    torch.testing.assert_close(y_fp8, y_ref, rtol=1e-5, atol=1e-5)


def test_fused_triton_hadamard_quantise_matches_torch_on_gpu():
    pytest.importorskip("triton")
    from unitscale.precision.int4.hadamard import block_hadamard
    from unitscale.precision.int4.quantise import lsq_codes
    from unitscale.precision.int4.triton_hq import hadamard_quantise, unpack_int4

    gen = torch.Generator(device="cuda").manual_seed(0)
    c = torch.randint(-11, 11, (4096, 1024), generator=gen, device="cuda").float()
    c[(c == 7) | (c == -8)] = 0.0  # representable: x·H ≈ C, far from ties and from the clip boundary
    x = block_hadamard(c.double(), 32).float()
    s = torch.tensor(1.0, device="cuda")
    q, delta, packed = hadamard_quantise(x, s, 32, 8, 7, pack=True)
    q_ref, d_ref = lsq_codes(block_hadamard(x, 32), s, 8, 7)
    assert torch.equal(q, c.clamp(-8, 7)) and torch.equal(q, q_ref)
    torch.testing.assert_close(delta, d_ref, rtol=0, atol=1e-5)
    assert torch.equal(unpack_int4(packed).float(), q)
