"""Our BERT encoder against transformers.BertModel loaded from the same offline MiniLM files."""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from safetensors.torch import load_file

from unitscale.models.bert import (
    BertClassifier,
    BertConfig,
    BertEncoder,
    load_bert_state,
    load_minilm,
    map_checkpoint_key,
    mean_pool,
    minilm_dir,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must load from local files only

SENTENCES = [
    "The cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Rome was the capital of an empire that ruled the Mediterranean for centuries; its emperors built roads.",
]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_minilm(max_len=64)


@pytest.fixture(scope="module")
def checkpoint():
    return load_file(str(minilm_dir() / "model.safetensors"))


def test_config_from_wheel():
    c = BertConfig.from_json(minilm_dir() / "config.json")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (
        384,
        6,
        12,
        1536,
    )
    assert (c.vocab_size, c.max_position_embeddings, c.type_vocab_size) == (30522, 512, 2)
    assert c.hidden_act == "gelu" and c.layer_norm_eps == 1e-12 and c.head_dim == 32


@pytest.mark.parametrize(
    "kwargs, match", [({"hidden_act": "relu"}, "hidden_act 'relu'"), ({"num_attention_heads": 5}, "multiple")]
)
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BertConfig(**kwargs)


def test_every_checkpoint_tensor_loaded_exactly(minilm, checkpoint):
    encoder, _ = minilm
    params = dict(encoder.named_parameters())
    used = {}
    for key, value in checkpoint.items():
        name = map_checkpoint_key(key)
        if name is None:
            assert key == "embeddings.position_ids"
            continue
        assert torch.equal(params[name], value), name
        used[name] = key
    assert set(used) == set(params)  # a bijection: every parameter from exactly one checkpoint key
    assert len(checkpoint) == len(params) + 1 == 104


def test_load_reports_missing_unexpected_and_shapes(checkpoint):
    encoder = BertEncoder(BertConfig())
    broken = dict(checkpoint)
    del broken["encoder.layer.3.intermediate.dense.bias"]
    broken["encoder.layer.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_bert_state(encoder, broken)
    assert "layers.3.ffn_in.bias" in str(err.value) and "encoder.layer.0.extra.weight" in str(err.value)
    small = BertEncoder(BertConfig(vocab_size=100))
    with pytest.raises(ValueError, match=r"embeddings\.word\.weight: checkpoint \(30522, 384\)"):
        load_bert_state(small, checkpoint)


def test_without_pooler_skips_pooler_keys(checkpoint):
    encoder = BertEncoder(BertConfig(), with_pooler=False)
    skipped = load_bert_state(encoder, checkpoint)
    assert sorted(skipped) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    with pytest.raises(ValueError, match="with_pooler=False"):
        encoder.pool(torch.zeros(1, 2, 384))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_transformers(minilm, attn_implementation):
    transformers = pytest.importorskip("transformers")
    encoder, tok = minilm
    ref = transformers.BertModel.from_pretrained(
        str(minilm_dir()), attn_implementation=attn_implementation, local_files_only=True
    ).eval()
    batch = tok(SENTENCES)
    batch["token_type_ids"][0, 4:] = 1  # exercise the segment table too
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    ours = []
    hooks = [layer.register_forward_hook(lambda m, i, o: ours.append(o)) for layer in encoder.layers]
    hooks.append(encoder.embeddings.register_forward_hook(lambda m, i, o: ours.insert(0, o)))
    try:
        with torch.no_grad():
            hidden = encoder(**batch)
            out = ref(**batch, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    keep = batch["attention_mask"].bool()
    assert len(ours) == len(out.hidden_states) == 7
    for ours_l, ref_l in zip(ours, out.hidden_states):
        assert torch.isfinite(ours_l).all()
        torch.testing.assert_close(ours_l[keep], ref_l[keep], atol=2e-5, rtol=1e-5)
    # padded query rows are unused junk, but still the same junk up to float32 rounding
    torch.testing.assert_close(hidden, out.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encoder.pool(hidden), out.pooler_output, atol=1e-5, rtol=1e-5)


def test_gradients_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    encoder, tok = minilm
    ref = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    batch = tok(SENTENCES[:2])
    target = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    ((mean_pool(encoder(**batch), batch["attention_mask"]) - target) ** 2).sum().backward()
    ((mean_pool(ref(**batch).last_hidden_state, batch["attention_mask"]) - target) ** 2).sum().backward()
    ref_params = dict(ref.named_parameters())
    try:
        for key, p in ref_params.items():
            mine = encoder.get_parameter(map_checkpoint_key(key))
            if key.startswith("pooler"):
                assert p.grad is None and mine.grad is None
                continue
            if key.endswith("attention.self.key.bias"):
                # q·b_k is the same for every key, and softmax is shift-invariant: the true gradient is 0
                assert mine.grad.abs().max() < 1e-5 and p.grad.abs().max() < 1e-5
                continue
            scale = p.grad.abs().max()
            assert scale > 0, key
            torch.testing.assert_close(mine.grad / scale, p.grad / scale, atol=1e-4, rtol=0, msg=key)
    finally:
        encoder.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "text", ["hello world", "unit scaling keeps every tensor near one.", "naïve café 42"]
)
def test_tokenizer_round_trip(minilm, text):
    _, tok = minilm
    batch = tok(text)
    ids = batch["input_ids"][0]
    assert ids[0].item() == 101 and ids[-1].item() == 102  # [CLS] ... [SEP]
    expected = text.lower().replace("ï", "i").replace("é", "e")  # uncased BERT strips accents
    assert tok.decode(ids).replace(" .", ".") == expected


def test_tokenizer_matches_python_wordpiece(minilm):
    transformers = pytest.importorskip("transformers")
    _, tok = minilm
    ref = transformers.BertTokenizer(str(minilm_dir() / "vocab.txt"), do_lower_case=True)
    for text in SENTENCES:
        assert tok(text)["input_ids"][0].tolist() == ref(text)["input_ids"]


def test_tokenizer_truncates_and_pads(minilm):
    _, tok = minilm
    batch = tok(["short", "word " * 200])
    assert batch["input_ids"].shape == (2, 64)
    assert batch["input_ids"][1, -1].item() == 102  # truncated sequences still end with [SEP]
    assert batch["attention_mask"][0].sum().item() == 3
    assert (batch["input_ids"][0, 3:] == 0).all() and (batch["attention_mask"][0, 3:] == 0).all()
    assert batch["token_type_ids"].eq(0).all()


def test_paraphrases_closer_than_unrelated(minilm):
    encoder, tok = minilm
    pairs = [
        (
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The stock market fell sharply today.",
        ),
        (
            "How do I bake bread at home?",
            "What is a recipe for homemade bread?",
            "Volcanoes erupt when magma rises.",
        ),
        (
            "The child is sleeping in bed.",
            "A kid is asleep in his bed.",
            "Parliament passed the new tax law.",
        ),
    ]
    texts = [t for triple in pairs for t in triple]
    batch = tok(texts)
    with torch.no_grad():
        emb = F.normalize(mean_pool(encoder(**batch), batch["attention_mask"]), dim=-1).view(3, 3, -1)
    para = (emb[:, 0] * emb[:, 1]).sum(-1)
    unrelated = (emb[:, 0] * emb[:, 2]).sum(-1)
    assert (para > 0.5).all() and (unrelated < 0.2).all() and (para - unrelated > 0.4).all(), (
        para,
        unrelated,
    )


def test_classifier_padding_invariant(minilm):
    encoder, tok = minilm
    for pooling in ("mean", "cls"):
        torch.manual_seed(0)
        clf = BertClassifier(encoder, num_labels=11, pooling=pooling).eval()
        one, many = tok(SENTENCES[0]), tok(SENTENCES)
        with torch.no_grad():
            alone = clf(one["input_ids"], one["attention_mask"])
            batched = clf(many["input_ids"], many["attention_mask"])
        assert alone.shape == (1, 11) and batched.shape == (3, 11)
        torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1e6, -1e6]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize(
    "kwargs, match", [({"pooling": "max"}, "pooling 'max'"), ({"num_labels": 1}, "num_labels")]
)
def test_classifier_rejects(kwargs, match):
    encoder = BertEncoder(BertConfig(num_hidden_layers=1, vocab_size=10))
    with pytest.raises(ValueError, match=match):
        BertClassifier(encoder, **{"num_labels": 3, **kwargs})


def test_classifier_traces_with_fx(minilm):
    """unitscale.unit_scale rewrites models through torch.fx: the classifier must trace as is."""
    encoder, tok = minilm
    torch.manual_seed(0)
    clf = BertClassifier(encoder, num_labels=11).eval()
    graph = torch.fx.symbolic_trace(clf)
    ops = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert F.scaled_dot_product_attention in ops and F.gelu in ops
    batch = tok(SENTENCES)
    with torch.no_grad():
        expected = clf(batch["input_ids"], batch["attention_mask"])
        got = graph(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, expected)
