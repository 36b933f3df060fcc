"""Int4Config: every knob of INT4 fully quantised training, validated, with the paper's presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unitscale.precision.int4.gemm import GEMM_BACKENDS
from unitscale.precision.int4.quantise import QRANGES

SPLIT_MODES = {
    # name: (radix R, levels T, digit clamp or None)
    # library default: digits in [−7, 7], exactly unbiased (docs/theory.md, Defaults where sources differ)
    "exact": (14, 98, None),
    "reference": (14, 98, 6),  # INT4-code: both digits clamped to ±6
    "r16": (16, 127, None),  # digits in [−8, 8]: an INT8 SR gradient, exact in E4M3, not 4-bit codes
}
SAMPLING_MODES = ("keep_nonzero", "bernoulli")


def _choice(name: str, value: object, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


@dataclass(frozen=True)
class Int4Config:
    """How an INT4 linear layer quantises (docs/theory.md, INT4 training; defaults: docs/theory.md,
    Defaults where sources differ).

    block_size: Hadamard block g (power of two dividing the fan-in); hadamard=False disables the rotation.
    search_block: pick g ∈ {1, 2, …, 1024} per layer on the first call by minimising
        ‖X̄ − X‖²·‖W̄ − W‖² (App. A.5), then keep it.
    qrange: "asym" = [−8, 7] (INT4-code, default) or "sym" = [−7, 7] (paper text).
    bit_split: gradient as two INT4 digits (split_mode "exact" R=14/T=98 digits [−7, 7]; "reference" ±6
        clamp; "r16" R=16/T=127) or, if False, one digit SR(∇Y·L/M) ∈ [−L, L] with L = grad_levels.
    sampling: "keep_nonzero" (p = 1 for rows with non-zero leverage; what the published results used) or
        "bernoulli" (LSS with Σp = sample_ratio × number of gradient rows; the paper's budget Σp = N over
        the 2N bit-split rows is sample_ratio = 0.5). sample_ratio must be 1.0 with "keep_nonzero".
    gemm: "reference" (exact float64 integer GEMM, any device) or "fp8" (E4M3 torch._scaled_mm, Hopper).
    lsq_cold_start_steps: for this many training calls s is re-initialised every call and not learned.
    seed: seeds the layer's generator for stochastic rounding and sampling (None: global RNG).
    """

    block_size: int = 32
    hadamard: bool = True
    search_block: bool = False
    qrange: str = "asym"
    bit_split: bool = True
    split_mode: str = "exact"
    grad_levels: int = 7
    sampling: str = "keep_nonzero"
    sample_ratio: float = 1.0
    gemm: str = "reference"
    lsq_cold_start_steps: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        g = self.block_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or g & (g - 1) or g > 1024:
            raise ValueError(f"block_size must be a power of two in 1..1024, got {g!r}")
        _choice("qrange", self.qrange, tuple(QRANGES))
        _choice("split_mode", self.split_mode, tuple(SPLIT_MODES))
        _choice("sampling", self.sampling, SAMPLING_MODES)
        _choice("gemm", self.gemm, GEMM_BACKENDS)
        for name in ("hadamard", "search_block", "bit_split"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.grad_levels, bool)
            or not isinstance(self.grad_levels, int)
            or not (1 <= self.grad_levels <= 8)
        ):
            raise ValueError(
                f"grad_levels must be an integer in 1..8 (an INT4 digit), got {self.grad_levels!r}"
            )
        if not isinstance(self.sample_ratio, (int, float)) or not (0.0 < self.sample_ratio <= 1.0):
            raise ValueError(f"sample_ratio must be in (0, 1], got {self.sample_ratio!r}")
        if self.sampling == "keep_nonzero" and self.sample_ratio != 1.0:
            raise ValueError(
                f"sample_ratio={self.sample_ratio!r} needs sampling='bernoulli' ('keep_nonzero' keeps all)"
            )
        if not isinstance(self.lsq_cold_start_steps, int) or self.lsq_cold_start_steps < 0:
            raise ValueError(f"lsq_cold_start_steps must be an int >= 0, got {self.lsq_cold_start_steps!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def qbounds(self) -> tuple[int, int]:
        """(Q_N, Q_P) of the forward codes."""
        return QRANGES[self.qrange]

    @property
    def split(self) -> tuple[int, int, int | None]:
        """(radix R, levels T, digit clamp) of the bit split."""
        return SPLIT_MODES[self.split_mode]

    def replace(self, **changes: object) -> Int4Config:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def hq_lss(cls, **changes: object) -> Int4Config:
        """The paper's method (default): Hadamard g = 32 + LSQ forward, bit-split gradient, LSS backward."""
        return cls(**changes)  # type: ignore[arg-type]

    @classmethod
    def naive(cls, **changes: object) -> Int4Config:
        """LSQ only: no Hadamard, gradient as one INT4 digit (per-tensor max scale, SR), no bit split."""
        base = {"hadamard": False, "bit_split": False, "grad_levels": 7}
        return cls(**{**base, **changes})  # type: ignore[arg-type]
