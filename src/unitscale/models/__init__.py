"""Models: the paper's char-LM families (one trunk, three mixers) and a MiniLM/BERT encoder.

``build(name, vocab_size, scaling=..., **overrides)`` makes a char-LM by name: "gpt" (decoder-only
transformer, pre-norm), "gpt-post" (post-norm), "gpt-nonorm", "conv" (causal convolution) and "rnn"
(recurrent highway cell, 2 layers).
"""

from __future__ import annotations

from typing import Any

from unitscale.models.charlm import CharLM, CharLMConfig

GPT = CharLM
GPTConfig = CharLMConfig

_PRESETS: dict[str, dict[str, Any]] = {
    "gpt": {"mixer": "attention", "norm": "pre"},
    "gpt-post": {"mixer": "attention", "norm": "post"},
    "gpt-nonorm": {"mixer": "attention", "norm": "none"},
    "conv": {"mixer": "conv", "norm": "pre"},
    "rnn": {"mixer": "rnn", "norm": "pre", "n_layers": 2},
}
MODEL_NAMES: tuple[str, ...] = tuple(_PRESETS)


def build(name: str, vocab_size: int, *, scaling: str = "unit", **overrides: Any) -> CharLM:
    """A char-LM by preset name (see MODEL_NAMES); ``overrides`` set any CharLMConfig field."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODEL_NAMES)}")
    fields = {**_PRESETS[name], **overrides, "vocab_size": vocab_size, "scaling": scaling}
    unknown = set(fields) - set(CharLMConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {sorted(unknown)}; accepted: "
            f"{', '.join(sorted(CharLMConfig.__dataclass_fields__))}"
        )
    return CharLM(CharLMConfig(**fields))


__all__ = ["GPT", "GPTConfig", "MODEL_NAMES", "CharLM", "CharLMConfig", "build"]
