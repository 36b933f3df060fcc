"""A trained char-LM back from the checkpoint ``unitscale train`` (or ``demo``) wrote, and text from it.

The checkpoint holds the run's TrainConfig and vocabulary, so the model is rebuilt exactly as trained:
registry preset, scaling, ``--set`` options, sequence length and precision recipe (INT4 layers own state
that must exist before the weights load). Loading goes through ``checkpoint.load_file`` (weights_only).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unitscale.train import checkpoint
from unitscale.train.data import UNKNOWN_ID, Vocab
from unitscale.train.loop import TrainConfig, build_model, check_names, config_from_dict


@dataclass
class TrainedCharLM:
    """A char-LM restored from a training checkpoint, in eval mode, with the recipe it trained in."""

    model: nn.Module
    vocab: Vocab
    config: TrainConfig
    step: int
    path: Path

    @property
    def context(self) -> int:
        """The longest input the model takes (its sequence length)."""
        return int(getattr(getattr(self.model, "cfg", None), "seq_len", self.config.seq_len))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training loop's autocast for the recipe's compute dtype (none for float32)."""
        from unitscale.precision import get_recipe

        dtype = get_recipe(self.config.precision).compute_dtype
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


def load_trained(path: str | Path) -> TrainedCharLM:
    """The char-LM of a ``unitscale train`` checkpoint file, or of a run directory's newest readable one."""
    from unitscale.precision import apply

    path = Path(path)
    if path.is_dir():
        state, used, problem = checkpoint.load_latest(path / checkpoint.CHECKPOINT_NAME)
        if problem is not None:
            print(f"warning: {problem}", file=sys.stderr)
    else:
        state, used = checkpoint.load(path), path
    if (
        not isinstance(state.get("config"), dict)
        or not isinstance(state.get("vocab"), dict)
        or "model" not in state
    ):
        raise checkpoint.CheckpointError(
            f"{used} is not a char-LM checkpoint of unitscale train or demo "
            f"(needs 'config', 'vocab' and 'model'; has {sorted(state)})"
        )
    config = config_from_dict(state["config"])
    check_names(config)
    vocab = Vocab.from_dict(state["vocab"])
    model = apply(build_model(config, len(vocab)), config.precision)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise checkpoint.CheckpointError(
            f"{used}: the weights do not fit the model its config describes "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
    return TrainedCharLM(model.eval(), vocab, config, int(state.get("step", 0)), used)


def check_sampling(prompt: str, length: int, temperature: float) -> None:
    """ValueError naming the bad sampling option and what it accepts."""
    if not prompt:
        raise ValueError("--prompt must not be empty: the model needs at least one character to continue")
    if length < 0 or not temperature >= 0:
        raise ValueError(
            f"need --length >= 0 and --temperature >= 0 (0: greedy), got {length}, {temperature}"
        )


@torch.no_grad()
def generate(run: TrainedCharLM, prompt: str, length: int, *, temperature: float = 1.0, seed: int = 0) -> str:
    """``prompt`` followed by ``length`` generated characters.

    Each step feeds the last ``run.context`` ids and picks the next one from the last position's logits z:
    argmax z when ``temperature`` is 0 (greedy), else a draw from softmax(z / temperature) with a
    generator seeded by ``seed``. The unknown-character id is never generated.
    """
    check_sampling(prompt, length, temperature)
    gen = torch.Generator().manual_seed(seed)
    ids: Tensor = run.vocab.encode(prompt)[None]
    out: list[int] = []
    for _ in range(length):
        with run.autocast():
            logits, _ = run.model(ids[:, -run.context :])
        z = logits[0, -1].float()
        z[UNKNOWN_ID] = -torch.inf
        if temperature == 0:
            nxt = int(z.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=gen))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return prompt + run.vocab.decode(out)
