"""Models: the paper's char-LM families (one trunk, three mixers) and a MiniLM/BERT encoder.

``build(name, vocab_size, scaling=..., **overrides)`` makes a char-LM from a named preset: "gpt"
(decoder-only transformer, pre-norm), "gpt-post" (post-norm), "gpt-nonorm", "conv" (causal convolution) and
"rnn" (recurrent highway cell, 2 layers). A preset fixes its family: overrides cannot turn a "gpt" into an
RNN.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from unitscale.models.charlm import CharLM, CharLMConfig

PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType({
    name: MappingProxyType(fields)
    for name, fields in {
        "gpt": {"mixer": "attention", "norm": "pre"},
        "gpt-post": {"mixer": "attention", "norm": "post"},
        "gpt-nonorm": {"mixer": "attention", "norm": "none"},
        "conv": {"mixer": "conv", "norm": "pre"},
        "rnn": {"mixer": "rnn", "norm": "pre", "n_layers": 2},
    }.items()
})  # fmt: skip
MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)


def build(name: str, vocab_size: int, *, scaling: str = "unit", **overrides: Any) -> CharLM:
    """A char-LM by preset name (see MODEL_NAMES); ``overrides`` set any CharLMConfig field except the
    preset's family (``mixer``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)}")
    if "mixer" in overrides and overrides["mixer"] != PRESETS[name]["mixer"]:
        raise ValueError(
            f"model {name!r} has mixer {PRESETS[name]['mixer']!r}; mixer={overrides['mixer']!r} is another "
            f"preset's (accepted models: {', '.join(MODEL_NAMES)})"
        )
    fields = {**PRESETS[name], **overrides, "vocab_size": vocab_size, "scaling": scaling}
    unknown = set(fields) - set(CharLMConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {sorted(unknown)}; accepted: "
            f"{', '.join(sorted(CharLMConfig.__dataclass_fields__))}"
        )
    return CharLM(CharLMConfig(**fields))


__all__ = ["MODEL_NAMES", "PRESETS", "CharLM", "CharLMConfig", "build"]
