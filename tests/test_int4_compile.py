"""torch.compile of an INT4 layer compiles once: nothing the forward reads changes from step to step."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from unitscale.precision.int4 import Int4Config, Int4Linear


@pytest.mark.slow
@pytest.mark.parametrize("cold_start", [0, 2])
def test_compiled_int4_layer_does_not_recompile_every_step(cold_start):
    torch.manual_seed(0)
    backend = Int4Linear(32, Int4Config(lsq_cold_start_steps=cold_start))
    weight = nn.Parameter(torch.randn(16, 32))
    opt = torch.optim.SGD([weight, *backend.parameters()], lr=1e-3)
    step = torch.compile(lambda x: backend.linear(x, weight).square().mean(), backend="eager")
    x = torch.randn(8, 32)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(8):
            # after the warm-up (first call, cold start) any recompilation is an error
            with torch._dynamo.config.patch(error_on_recompile=i > cold_start + 1):
                step(x).backward()
            opt.step()
            opt.zero_grad()
    # cached constants (the Hadamard matrix) are built uncached while tracing: dynamo warns about lru_cache
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert backend.calls == cold_start and not backend.cold
