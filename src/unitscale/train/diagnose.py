"""Diagnosis of a non-finite training step: the first tensor that overflowed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def first_nonfinite(model: nn.Module, run: Callable[[], None]) -> str:
    """Re-run ``run`` (a forward + backward of the failing step) with hooks and describe the first
    non-finite tensor: a parameter, then a module output in forward order, then an output gradient in
    backward order, then a parameter gradient."""
    for name, p in model.named_parameters():
        if not _finite(p):
            return f"parameter {name!r} {tuple(p.shape)} (non-finite before the step)"
    found: dict[str, str] = {}

    def on_grad(g: Tensor, name: str) -> None:
        if "backward" not in found and not _finite(g):
            found["backward"] = f"gradient of the output of module {name} {tuple(g.shape)} (backward pass)"

    def on_forward(module: nn.Module, _inp: Any, out: Any, name: str) -> None:
        for t in _tensors(out):
            if not t.is_floating_point():
                continue
            if "forward" not in found and not _finite(t):
                found["forward"] = f"output of module {name} ({type(module).__name__}) {tuple(t.shape)}"
            if t.requires_grad:
                t.register_hook(functools.partial(on_grad, name=name))

    hooks = [
        m.register_forward_hook(functools.partial(on_forward, name=repr(n) if n else "<model>"))
        for n, m in model.named_modules()
    ]
    try:
        model.zero_grad(set_to_none=True)
        run()
    except RuntimeError as err:  # e.g. a backend refusing non-finite input
        found.setdefault("forward", f"(the re-run raised: {err})")
    finally:
        for h in hooks:
            h.remove()
    if "forward" in found:
        return found["forward"]
    if "backward" in found:
        return found["backward"]
    for name, p in model.named_parameters():
        if p.grad is not None and not _finite(p.grad):
            return f"gradient of parameter {name!r} {tuple(p.shape)}"
    return "none found on re-run (the overflow did not reproduce)"
