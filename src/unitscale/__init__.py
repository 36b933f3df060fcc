"""unitscale: low-precision training out of the box (unit scaling, FP8 with static scales, INT4)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "analysis",
    "formats",
    "functional",
    "models",
    "nn",
    "precision",
    "scale",
    "train",
    "transforms",
}
_ATTRS = {
    "scaled": ("unitscale.scale", "scaled"),
    "Recipe": ("unitscale.precision", "Recipe"),
    "unit_scale": ("unitscale.transforms", "unit_scale"),
    "export": ("unitscale.export", "export"),
    "export_program": ("unitscale.export", "export_program"),
    "track_scales": ("unitscale.analysis", "track_scales"),
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import unitscale` stays cheap and the CLI starts fast.
    if name in _SUBMODULES:
        return importlib.import_module(f"unitscale.{name}")
    if name in _ATTRS:
        module, attr = _ATTRS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'unitscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_ATTRS})
