"""The fused Triton Hadamard + LSQ quantise (+ pack) kernel through the interpreter, on representable values.

Runs in a subprocess with TRITON_INTERPRET=1 (the variable must be set before Triton is imported); skipped
cleanly where Triton does not import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHECK = textwrap.dedent(
    """
    import math, torch
    from unitscale.precision.int4.hadamard import block_hadamard, hadamard
    from unitscale.precision.int4.quantise import lsq_codes
    from unitscale.precision.int4.triton_hq import hadamard_quantise, unpack_int4

    gen = torch.Generator().manual_seed(0)
    # Representable: x = C·H (C integer codes, some out of range, none on the clip boundary), so
    # x·H = C up to ~1e-6, far from any tie: with s = 1 the codes are clamp(C) in any summation order.
    m, d, g = 40, 96, 32
    c = torch.randint(-11, 11, (m, d), generator=gen).float()
    c[(c == 7) | (c == -8)] = 0.0  # on the clip boundary x·H ≈ C could fall on either side
    x = block_hadamard(c.double(), g).float()
    s = torch.tensor(1.0)
    q, delta, packed = hadamard_quantise(x, s, g, 8, 7, pack=True)
    q_ref, d_ref = lsq_codes(block_hadamard(x, g), s, 8, 7)
    assert torch.equal(q, c.clamp(-8, 7)) and torch.equal(q, q_ref), "codes"
    torch.testing.assert_close(delta, d_ref, rtol=0, atol=1e-5)
    out = c.abs() > 7.5
    assert torch.equal(delta[out], d_ref[out]) and set(delta[out].tolist()) <= {-8.0, 7.0}, "clip residuals"
    assert torch.equal(unpack_int4(packed).float(), q), "pack round trip"
    assert packed.shape == (m, d // 2) and packed.dtype == torch.uint8

    # Ties, no rotation: exact half-integers round half to even, like torch.round.
    t = (torch.arange(-18, 18).float() / 2).repeat(3, 1)[:, :32]
    q2, d2, _ = hadamard_quantise(t, torch.tensor(0.5), 16, 8, 7, rotate=False)
    q2_ref, d2_ref = lsq_codes(t, torch.tensor(0.5), 8, 7)
    assert torch.equal(q2, q2_ref) and torch.equal(d2, d2_ref), "ties"

    # Non-finite inputs give NaN codes in their Hadamard block only.
    x[3, 5] = math.inf
    q3, _, _ = hadamard_quantise(x, s, g, 8, 7)
    assert torch.isnan(q3[3, :32]).all() and torch.isfinite(q3[3, 32:]).all() and torch.isfinite(q3[4]).all()
    print("OK")
    """
)


def test_fused_hadamard_quantise_pack_matches_torch_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": SRC}
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr
