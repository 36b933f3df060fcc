"""Simulation never hides overflow (issue 20, item 8): simulated FP16 overflows and diverges like real FP16;
only the recipes that ask for saturation (the FP8 recipes) clamp, and only finite values."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from cli_helpers import command, env
from unitscale.precision import Recipe, get_recipe
from unitscale.precision.simulate import Simulate


def linear_grads(backend, x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    backend.linear(x, w).backward(g)
    return x.grad, w.grad


def test_fp16_sim_gradient_overflows_like_a_real_fp16_cast():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    g = torch.randn(8, 4, generator=gen) * 3e4
    g[0, 0], g[1, 1], g[2, 2] = 7e4, -1e5, float("inf")  # past fp16's max 65504, and an inf gradient
    gx, gw = linear_grads(Simulate("fp16", "fp16", "fp16"), x, w, g)
    # the same op with real torch.float16 casts of the matmul inputs and the output gradient
    g16, x16, w16 = (t.to(torch.float16).float() for t in (g, x, w))
    assert torch.equal(torch.isfinite(gx), torch.isfinite(g16 @ w16))
    assert torch.equal(torch.isfinite(gw), torch.isfinite(g16.t() @ x16))
    assert not torch.isfinite(gx[:3]).any() and torch.isfinite(gx[3:]).all()


def test_saturating_simulation_clamps_finite_values_only():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    g = torch.randn(8, 4, generator=gen)
    g[0, 0] = 1e6  # beyond E5M2's 57344: clamped by the saturating FP8 cast
    sat = Simulate("fp8_e4b", "fp8_e4b", "fp8_e5b", saturate=True)
    gx, _ = linear_grads(sat, x, w, g)
    assert torch.isfinite(gx).all()
    g[1, 1] = float("inf")  # an inf gradient is not a finite value to saturate: it stays non-finite
    gx, _ = linear_grads(sat, x, w, g)
    assert not torch.isfinite(gx[1]).any() and torch.isfinite(gx[[0, *range(2, 8)]]).all()


def test_recipes_saturate_only_where_asked():
    assert get_recipe("fp8").saturate and get_recipe("fp8-loss-scaled").saturate
    assert get_recipe("fp8-critical-bf16").saturate and get_recipe("fp8-e4a").saturate
    for name in ("fp16-sim", "fp16-sim-loss-scaled", "fp32", "bf16"):
        assert not get_recipe(name).saturate, name
    assert "saturate=False" in repr(Simulate("fp16", "fp16", "fp16", saturate=Recipe().saturate))


STOP = re.compile(r"non-finite gradient at step (\d+)")


@pytest.mark.slow
def test_fp16_sim_diverges_where_real_fp16_does(tmp_path):
    # issue 20's run: simulated fp16 used to finish all 20 steps while real fp16 stopped at step 1
    steps = {}
    for recipe in ("fp16-sim-loss-scaled", "fp16-loss-scaled"):
        args = ["train", "--model", "gpt-nonorm", "--precision", recipe, "--steps", "20", "--seq-len", "64",
                "--set", "d_model=64", "--set", "n_layers=2", "--out", tmp_path / recipe]  # fmt: skip
        run = subprocess.run(command(*args), capture_output=True, text=True, env=env(), timeout=600)
        found = STOP.search(run.stderr + run.stdout)
        assert run.returncode != 0 and found, (recipe, run.returncode, run.stderr[-2000:])
        steps[recipe] = int(found.group(1))
    assert steps["fp16-sim-loss-scaled"] == steps["fp16-loss-scaled"] == 1, steps
