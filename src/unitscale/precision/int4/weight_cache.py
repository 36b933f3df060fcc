"""Quantise a weight once per optimizer step: a per-layer cache of its INT4 codes (issue: not per GEMM).

A cached entry is served only while all of these are unchanged: the weight object (weak reference, so a
freed temporary whose address is reused never matches), its storage pointer and version counter (in-place
updates, ``load_state_dict``, ``copy_``), the versions of the layer's step-size tensors, the work dtype,
and the global count of optimizer steps (a ``torch.optim`` step post-hook bumps it after *any* optimizer's
step, so copies that bypass the version counter — FSDP2's all-gather into the unsharded parameter, an
optimizer writing through ``.data`` — are re-quantised on the next step). Not seen: a ``weight.data``
mutation between two forwards with no optimizer step in between; call ``clear()`` after such surgery.
Under ``torch.compile`` nothing is cached (the compiled graph recomputes the codes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps = 0
_hook: Any = None


def _count_step(*_: object) -> None:
    global _steps
    _steps += 1


def optimizer_steps() -> int:
    """Optimizer steps taken in this process since the first INT4 layer was built (any optimizer)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)
    return _steps


class WeightCache:
    """One entry: the codes of the last weight seen, and the key they are valid for."""

    def __init__(self) -> None:
        optimizer_steps()  # install the hook before the first step, not at the first forward
        self._entry: tuple[weakref.ref, tuple, Any] | None = None
        self.hits = 0

    def clear(self) -> None:
        self._entry = None

    def get(self, weight: Tensor, extra: tuple, make: Callable[[], Any]) -> Any:
        """make()'s value for ``weight``, reused while the key (module docstring) is unchanged."""
        if torch.compiler.is_compiling():
            return make()
        key = (optimizer_steps(), weight.data_ptr(), weight._version, *extra)
        e = self._entry
        if e is not None and e[0]() is weight and e[1] == key:
            self.hits += 1
            return e[2]
        value = make()
        self._entry = (weakref.ref(weight), key, value)
        return value
