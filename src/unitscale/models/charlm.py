"""Character language models of the unit-scaling paper (§6.1): one trunk, three sequence mixers.

    tokens → embedding (+ positions) → L × [ mixer residual block, FFN residual block ] → norm → readout

mixer = "attention" (decoder-only transformer, causal), "conv" (causal 1-D grouped convolution, kernel 7,
groups 8) or "rnn" (a recurrent highway cell, coupled carry gate, gate bias −1). ``scaling="standard"`` is
ordinary PyTorch (torch.nn modules, N(0, 0.02) init, plain residual adds, mean cross-entropy);
``scaling="unit"`` uses unitscale ops (unit init, scaled ops, weighted residuals with τ). The same code path
serves both: only the ops differ, so the two models are twins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unitscale.functional as U
import unitscale.nn as unn
from unitscale.models import _standard as S
from unitscale.precision.backend import EXACT
from unitscale.rules import linear_rule
from unitscale.scale import shared

MIXERS = ("attention", "conv", "rnn")
SCALINGS = ("unit", "standard")
NORMS = ("pre", "post", "none")
RESIDUALS = ("fixed", "running_mean")
ACTIVATIONS = ("relu", "gelu")


def _check(name: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(str, accepted))}")


@dataclass
class CharLMConfig:
    """Hyper-parameters; the defaults are the paper's char-LM sizes except depth (CPU-friendly)."""

    vocab_size: int = 256
    seq_len: int = 256
    mixer: str = "attention"
    scaling: str = "unit"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2
    ffn_mult: int = 4
    activation: str = "relu"
    norm: str = "pre"
    residual: str = "fixed"  # unit only; standard models use plain adds
    tau_attn: float = 0.01  # fixed τ of sequence-mixing blocks (REFERENCE §2: ≈0.01 for attention)
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
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)!r}")

    @property
    def unit(self) -> bool:
        return self.scaling == "unit"


def _linear(cfg: CharLMConfig, fan_in: int, fan_out: int, *, readout: bool = False) -> nn.Module:
    if cfg.unit:
        return unn.Linear(fan_in, fan_out, bias=False, readout=readout)
    return nn.Linear(fan_in, fan_out, bias=False)


def _norm(cfg: CharLMConfig) -> nn.Module:
    return unn.LayerNorm(cfg.d_model) if cfg.unit else nn.LayerNorm(cfg.d_model)


class Attention(nn.Module):
    """Causal multi-head self-attention; its two attention matmuls run through ``self.precision``."""

    matmul_kind = "attention"

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg, self.precision = cfg, None
        self.qkv = _linear(cfg, cfg.d_model, 3 * cfg.d_model)
        self.out = _linear(cfg, cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.cfg.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        sdpa = U.scaled_dot_product_attention if self.cfg.unit else S.scaled_dot_product_attention
        y = sdpa(q, k, v, is_causal=True, precision=self.precision)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CausalConv(nn.Module):
    """Causal grouped 1-D convolution written as a grouped matmul over unfolded windows.

    Each group is a matmul (b × k·C/G) @ (k·C/G × C/G) with b = batch·length, so the unit scale rule is the
    linear rule with fan_in = k·C/G and fan_out = C/G, and the backends see an ordinary matmul.
    """

    matmul_kind = "conv"

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg, self.precision = cfg, None
        g, c, k = cfg.conv_groups, cfg.d_model, cfg.conv_kernel
        self.weight = nn.Parameter(torch.empty(g, k * c // g, c // g))
        std = 1.0 if cfg.unit else cfg.init_std
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        g, k = self.cfg.conv_groups, self.cfg.conv_kernel
        windows = F.pad(x, (0, 0, k - 1, 0)).unfold(1, k, 1)  # (b, t, c, k): window ends at position t
        windows = windows.reshape(b * t, g, c // g, k).permute(1, 0, 3, 2).reshape(g, b * t, k * c // g)
        backend = self.precision or EXACT
        if self.cfg.unit:
            alpha, betas = linear_rule(fan_in=k * c // g, fan_out=c // g, rows=b * t).resolve()
            y = backend.matmul(
                windows,
                self.weight,
                alpha=alpha,
                beta_a=betas["input"],
                beta_b=betas["weight"],
                roles=("activation", "weight"),
            )
        else:
            y = backend.matmul(windows, self.weight, roles=("activation", "weight"))
        return y.permute(1, 0, 2).reshape(b, t, c)

    def plain_forward(self, x: Tensor) -> Tensor:
        """The same map as a causal ``F.conv1d`` (inference, for ``unitscale.export``): window element (tap
        j, group channel i) of group g is row j·C/G + i of W[g], so conv weight[g·C/G + o, i, j] =
        α·W[g, j·C/G + i, o], α the matmul's (1 for the standard model)."""
        g, c, k = self.cfg.conv_groups, self.cfg.d_model, self.cfg.conv_kernel
        alpha = linear_rule(fan_in=k * c // g, fan_out=c // g, rows=1).resolve()[0] if self.cfg.unit else 1.0
        weight = self.weight.detach().reshape(g, k, c // g, c // g).permute(0, 3, 2, 1).reshape(c, c // g, k)
        y = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight * alpha, groups=g)
        return y.transpose(1, 2)


class HighwayRNN(nn.Module):
    """Recurrent highway layer (one micro-step, coupled carry): s_t = (1−g)⊙s_{t−1} + g⊙tanh(a),
    g = σ(z + gate_bias), [a, z] = W x_t ⊕ R s_{t−1}. Unit scaling: W and R are unit-scaled linears and the
    two pre-activations meet in a scaled add; tanh and the gate stay plain (a gate must stay in [0, 1])."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inp = _linear(cfg, cfg.d_model, 2 * cfg.d_model)
        self.rec = _linear(cfg, cfg.d_model, 2 * cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        wx = self.inp(x)
        s = x.new_zeros(b, d)
        outs = []
        for i in range(t):
            pre = U.add(wx[:, i], self.rec(s)) if self.cfg.unit else wx[:, i] + self.rec(s)
            a, z = pre.chunk(2, dim=-1)
            gate = torch.sigmoid(z + self.cfg.rnn_gate_bias)
            s = s + gate * (torch.tanh(a) - s)
            outs.append(s)
        return torch.stack(outs, dim=1)


class FFN(nn.Module):
    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.up = _linear(cfg, cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.down = _linear(cfg, cfg.ffn_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        act = getattr(U if self.cfg.unit else F, self.cfg.activation)
        return self.down(act(self.up(x)))


class TiedReadout(nn.Module):
    """The readout of a model whose token table doubles as the output projection.

    The table reaches it as an argument, so it is stored once; the matmul runs through ``self.precision``.
    Unit scaling: the table's gradient sums two unit-scaled uses, each scaled by 2^-½ (``scale.shared``).
    """

    matmul_kind = "linear"

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.unit, self.precision = cfg.unit, None

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        if self.unit:
            return U.linear_readout(x, shared(table, 2), precision=self.precision)
        return (self.precision or EXACT).linear(x, table)


_MIXER_CLASSES = {"attention": Attention, "conv": CausalConv, "rnn": HighwayRNN}


class Residual(nn.Module):
    """x + f(norm(x)) (standard) or the unit-scaled √(1−τ)·x + √τ·f(norm(x)) with τ split/add."""

    def __init__(self, cfg: CharLMConfig, body: nn.Module, tau: float) -> None:
        super().__init__()
        self.cfg, self.body, self.tau = cfg, body, tau
        self.norm = _norm(cfg) if cfg.norm != "none" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.cfg.norm == "pre"
        if self.cfg.unit:
            skip, branch = U.residual_split(x, self.tau)
            y = U.residual_add(skip, self.body(self.norm(branch) if pre else branch), self.tau)
        else:
            y = x + self.body(self.norm(x) if pre else x)
        return self.norm(y) if self.cfg.norm == "post" else y


class CharLM(nn.Module):
    """Char-level LM: ``model(idx, targets=None) -> (logits, loss)``; loss is the mean CE in nats."""

    def __init__(self, cfg: CharLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        embedding = unn.Embedding if cfg.unit else nn.Embedding
        self.tok = embedding(cfg.vocab_size, cfg.d_model)
        self.pos = embedding(cfg.seq_len, cfg.d_model) if cfg.mixer == "attention" else None
        blocks = []
        for layer in range(cfg.n_layers):
            for j, body in enumerate((_MIXER_CLASSES[cfg.mixer](cfg), FFN(cfg))):
                blocks.append(Residual(cfg, body, self._tau(2 * layer + j, mixer=j == 0)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _norm(cfg) if cfg.norm == "pre" else nn.Identity()
        if cfg.tie_embeddings:
            self.lm_head: nn.Module = TiedReadout(cfg)
        else:
            self.lm_head = _linear(cfg, cfg.d_model, cfg.vocab_size, readout=True)
        if not cfg.unit:
            self._standard_init()

    def _tau(self, index: int, *, mixer: bool) -> float:
        if not self.cfg.unit:
            return 0.5  # unused by plain adds
        if self.cfg.residual == "running_mean":
            return U.residual_tau(index, rule="running_mean")
        return self.cfg.tau_attn if mixer else self.cfg.tau_mlp

    def _standard_init(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        b, t = idx.shape
        if t > self.cfg.seq_len and self.pos is not None:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.cfg.seq_len}")
        x = self._embed(idx)
        if self.pos is not None:
            # Look up every (batch, position) so the embedding rule sees all b·t uses of the table.
            pos = self.pos(torch.arange(t, device=idx.device).expand(b, t))
            cut = ("left", "right")  # both tables are added once (cut edges): gradients pass unscaled
            x = U.weighted_add(x, pos, math.sqrt(0.5), math.sqrt(0.5), cut=cut) if self.cfg.unit else x + pos
        for block in self.blocks:
            x = block(x)
        logits = self._readout(self.norm(x))
        if targets is None:
            return logits, None
        ce = U.cross_entropy if self.cfg.unit else F.cross_entropy
        return logits, ce(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def _embed(self, idx: Tensor) -> Tensor:
        if not self.cfg.tie_embeddings:
            return self.tok(idx)
        table = shared(self.tok.weight, 2) if self.cfg.unit else self.tok.weight
        return U.embedding(idx, table) if self.cfg.unit else F.embedding(idx, table)

    def _readout(self, x: Tensor) -> Tensor:
        return self.lm_head(x, self.tok.weight) if self.cfg.tie_embeddings else self.lm_head(x)

    def default_lr(self, optimizer: str) -> float:
        """Starting LR per optimiser (REFERENCE §4.1 median best LRs: unit AdamW 2⁻⁶, regular 2⁻¹⁰)."""
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
