"""Wikipedia topic classification: lead paragraphs of the offline Wikipedia file, labelled by topic.

Articles come from ``unitscale.train.data`` (sorted by title, split by ``article_split(title)``, so the
split is a fixed function of the title). "Uncategorized" articles are dropped, leaving the 11 topics of
``TOPICS``; label k is ``TOPICS[k]`` (alphabetical, fixed). Texts are tokenised once per (split, max_len)
and the tensors kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from unitscale.models.bert import BertTokenizer, minilm_dir

TOPICS: tuple[str, ...] = (
    "Arts",
    "Biology and health sciences",
    "Everyday life",
    "Geography",
    "History",
    "Mathematics",
    "People",
    "Philosophy and religion",
    "Physical sciences",
    "Society and social sciences",
    "Technology",
)
DROPPED_TOPIC = "Uncategorized"
SPLITS = ("train", "valid", "test")
SUBSET_SEED = 1234


@dataclass(frozen=True)
class TopicData:
    """One split, tokenised: ids / mask (n, max_len) int64 padded with 0, labels (n,) int64, titles."""

    split: str
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    titles: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.titles)

    def subset(self, n: int | None) -> TopicData:
        """A fixed random ``n`` examples, in title order (all when None); the same for every run seed."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1 or None, got {n}")
        # A generator of its own: the subset is part of the dataset definition, not of the run's randomness.
        idx = (
            torch.randperm(len(self), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n].sort().values
        )
        return TopicData(
            self.split,
            self.input_ids[idx],
            self.attention_mask[idx],
            self.labels[idx],
            tuple(self.titles[i] for i in idx.tolist()),
        )

    def class_counts(self) -> Tensor:
        return torch.bincount(self.labels, minlength=len(TOPICS))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")


def topic_articles(split: str) -> list[tuple[str, str, int]]:
    """(title, text, label) of every categorised article in ``split``, in title order."""
    from unitscale.train.data import article_split, load_wiki_articles

    _check_split(split)
    label_of = {t: k for k, t in enumerate(TOPICS)}
    rows = []
    for article in load_wiki_articles():
        if article.topic == DROPPED_TOPIC or article_split(article.title) != split:
            continue
        if article.topic not in label_of:
            raise ValueError(
                f"article {article.title!r} has topic {article.topic!r}; accepted: {', '.join(TOPICS)} "
                f"(or {DROPPED_TOPIC!r}, dropped)"
            )
        rows.append((article.title, article.text, label_of[article.topic]))
    return rows


@cache
def _minilm_tokenizer(max_len: int) -> BertTokenizer:
    return BertTokenizer.from_file(minilm_dir() / "tokenizer.json", max_len)


@cache
def load_topics(split: str, max_len: int = 128) -> TopicData:
    """The tokenised topic data of ``split`` (MiniLM WordPiece, truncated and padded to ``max_len``)."""
    _check_split(split)
    rows = topic_articles(split)
    tok = _minilm_tokenizer(max_len)
    batch = tok([text for _, text, _ in rows])
    pad = max_len - batch["input_ids"].shape[1]
    ids = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=tok.pad_id)
    mask = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
    labels = torch.tensor([label for _, _, label in rows], dtype=torch.long)
    return TopicData(split, ids, mask, labels, tuple(title for title, _, _ in rows))
