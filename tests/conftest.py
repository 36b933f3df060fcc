"""Fixtures shared by the CPU suite."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small plain-text corpus (6000 words over an 11-word vocabulary, fixed seed) for training runs."""
    rng = random.Random(0)
    words = ["unit", "scaling", "keeps", "tensors", "near", "one", "so", "fp8", "works", "the", "a"]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path
