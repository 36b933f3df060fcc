"""Character language models of the unit-scaling paper (§6.1): one trunk, three sequence mixers.

    tokens → embedding (+ positions) → L × [ mixer residual block, FFN residual block ] → norm → readout

mixer = "attention" (decoder-only transformer, causal), "conv" (causal 1-D grouped convolution, kernel 7,
groups 8) or "rnn" (a recurrent highway cell, coupled carry gate, gate bias −1). ``scaling="standard"`` is
ordinary PyTorch (torch.nn modules, N(0, 0.02) init, plain residual adds, mean cross-entropy);
``scaling="unit"`` uses ``unitscale.nn`` blocks (unit init, scaled ops, weighted residuals with τ). This file
only composes blocks: the unit ones come from ``unitscale.nn``/``unitscale.functional``, the standard ones
from their plain-torch twins in ``unitscale.standard`` (same names and signatures), so the two models are
twins with the same parameter names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

import unitscale.functional as U
import unitscale.nn as unn
from unitscale import standard as S
from unitscale.rules import check_tau

Mixer = Literal["attention", "conv", "rnn"]
Scaling = Literal["unit", "standard"]
Norm = Literal["pre", "post", "none"]
ResidualRule = Literal["fixed", "running_mean"]
Activation = Literal["relu", "gelu"]
MIXERS: tuple[str, ...] = get_args(Mixer)
SCALINGS: tuple[str, ...] = get_args(Scaling)
NORMS: tuple[str, ...] = get_args(Norm)
RESIDUALS: tuple[str, ...] = get_args(ResidualRule)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


def _check(name: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, accepted))}")


@dataclass
class CharLMConfig:
    """Hyper-parameters; the defaults are the paper's char-LM sizes except depth (CPU-friendly)."""

    vocab_size: int = 256
    seq_len: int = 256
    mixer: Mixer = "attention"
    scaling: Scaling = "unit"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2
    ffn_mult: int = 4
    activation: Activation = "relu"
    norm: Norm = "pre"
    residual: ResidualRule = "fixed"  # unit only; standard models use plain adds
    tau_attn: float = 0.01  # fixed τ of sequence mixers, ≈0.01 for attention (docs/theory.md, Residuals)
    tau_mlp: float = 0.5  # fixed τ of FFN blocks
    conv_kernel: int = 7
    conv_groups: int = 8
    rnn_gate_bias: float = -1.0
    tie_embeddings: bool = False  # readout shares the token table (its gradient sums both uses)
    init_std: float = 0.02  # standard scaling only
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check("mixer", self.mixer, MIXERS)
        _check("scaling", self.scaling, SCALINGS)
        _check("norm", self.norm, NORMS)
        _check("residual", self.residual, RESIDUALS)
        _check("activation", self.activation, ACTIVATIONS)
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "ffn_mult"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.mixer == "conv" and self.d_model % self.conv_groups:
            raise ValueError(f"d_model={self.d_model} is not divisible by conv_groups={self.conv_groups}")
        for name in ("tau_attn", "tau_mlp"):
            check_tau(getattr(self, name), name=name)

    @property
    def unit(self) -> bool:
        return self.scaling == "unit"


def _twins(cfg: CharLMConfig) -> tuple[Any, Any]:
    """(blocks, ops) of the twin: ``unitscale.nn``/``unitscale.functional`` or their standard twins."""
    return (unn, U) if cfg.unit else (S, S)


class HighwayRNN(nn.Module):
    """Recurrent highway layer (one micro-step, coupled carry): s_t = (1−g)⊙s_{t−1} + g⊙tanh(a),
    g = σ(z + gate_bias), [a, z] = W x_t ⊕ R s_{t−1}. The two pre-activations meet in the twin's add (unit:
    scaled add); tanh and the gate stay plain (a gate must stay in [0, 1])."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        blocks, self.ops = _twins(cfg)
        self.gate_bias = cfg.rnn_gate_bias
        self.inp = blocks.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.rec = blocks.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        wx = self.inp(x)
        s = x.new_zeros(b, d)
        outs = []
        for i in range(t):
            a, z = self.ops.add(wx[:, i], self.rec(s)).chunk(2, dim=-1)
            gate = torch.sigmoid(z + self.gate_bias)
            s = s + gate * (torch.tanh(a) - s)
            outs.append(s)
        return torch.stack(outs, dim=1)


def _mixer(cfg: CharLMConfig) -> nn.Module:
    blocks, _ = _twins(cfg)
    if cfg.mixer == "attention":
        return blocks.MultiHeadAttention(cfg.d_model, cfg.n_heads, bias=False, is_causal=True)
    if cfg.mixer == "conv":
        return blocks.CausalConv1d(cfg.d_model, cfg.conv_kernel, cfg.conv_groups)
    return HighwayRNN(cfg)


class CharLM(nn.Module):
    """Char-level LM: ``model(idx, targets=None) -> (logits, loss)``; loss is the mean CE in nats."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks, self.ops = _twins(cfg)
        uses = 2 if cfg.tie_embeddings else 1  # a tied table's gradient sums two uses
        self.tok = blocks.Embedding(cfg.vocab_size, cfg.d_model, uses=uses)
        self.pos = blocks.Embedding(cfg.seq_len, cfg.d_model) if cfg.mixer == "attention" else None
        layers = []
        for layer in range(cfg.n_layers):
            for j, body in enumerate((_mixer(cfg), self._mlp(blocks))):
                norm = blocks.LayerNorm(cfg.d_model) if cfg.norm != "none" else None
                tau = self._tau(2 * layer + j, mixer=j == 0)
                position = "post" if cfg.norm == "post" else "pre"
                layers.append(blocks.Residual(body, tau, norm, norm_position=position))
        self.blocks = nn.ModuleList(layers)
        self.norm = blocks.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        if cfg.tie_embeddings:
            self.lm_head: nn.Module = blocks.TiedReadout(uses)
        else:
            self.lm_head = blocks.Linear(cfg.d_model, cfg.vocab_size, bias=False, readout=True)
        if not cfg.unit:
            self._standard_init()

    def _mlp(self, blocks: Any) -> nn.Module:
        cfg = self.cfg
        return blocks.MLP(cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.activation, bias=False)

    def _tau(self, index: int, *, mixer: bool) -> float:
        if self.cfg.residual == "running_mean":
            return U.residual_tau(index, rule="running_mean")
        return self.cfg.tau_attn if mixer else self.cfg.tau_mlp

    def _standard_init(self) -> None:
        """nanoGPT's init: N(0, init_std) matrices, zero biases."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        b, t = idx.shape
        if t > self.cfg.seq_len and self.pos is not None:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.cfg.seq_len}")
        x = self.tok(idx)
        if self.pos is not None:
            # Look up every (batch, position) so the embedding rule sees all b·t uses of the table.
            pos = self.pos(torch.arange(t, device=idx.device).expand(b, t))
            # Both tables are added once (cut edges): their gradients pass unscaled. A tied token table also
            # feeds the readout, and its two gradient contributions must keep the true gradient's ratio
            # (docs/theory.md, Shared parameters): its input keeps the true-gradient weight.
            cut = ("right",) if self.cfg.tie_embeddings else ("left", "right")
            x = self.ops.weighted_add(x, pos, math.sqrt(0.5), math.sqrt(0.5), cut=cut)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = self.lm_head(x, self.tok.weight) if self.cfg.tie_embeddings else self.lm_head(x)
        if targets is None:
            return logits, None
        return logits, self.ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def default_lr(self, optimizer: str) -> float:
        """Starting LR per optimiser: the median best LRs (unit AdamW 2⁻⁶, regular 2⁻¹⁰; docs/theory.md,
        Learning rates)."""
        table = {
            ("unit", "adam"): 2**-6,
            ("standard", "adam"): 2**-10,
            ("unit", "sgd"): 2**-12,
            ("standard", "sgd"): 2**-4,
        }
        return table[(self.cfg.scaling, "sgd" if optimizer == "sgd" else "adam")]

    def optim_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Parameter groups; unit models divide the LR of vector parameters by √dim (paper §6.1)."""
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        vectors = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": matrices, "lr": lr, "weight_decay": weight_decay}]
        if vectors:
            scale = 1 / math.sqrt(self.cfg.d_model) if self.cfg.unit else 1.0
            groups.append({"params": vectors, "lr": lr * scale, "weight_decay": 0.0})
        return groups

    def config_dict(self) -> dict:
        return asdict(self.cfg)
