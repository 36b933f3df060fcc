"""One cache rule for pure functions of Python constants that torch.compile also traces."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def eager_cache(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for eager calls; while torch.compile traces, the plain function.

    Dynamo ignores an lru_cache wrapper (with a warning) and folds such constants at trace time itself, so
    tracing calls the function directly. ``cache_clear`` is kept.
    """

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate
