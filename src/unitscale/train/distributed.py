"""Data-parallel training on PyTorch's own engine: torchrun + DDP or FSDP2 (``fully_shard``).

Launch with ``torchrun --nproc-per-node N unitscale train --parallel ddp|fsdp ...`` (multi-node: the usual
``--nnodes``/``--rdzv-*`` flags). Every rank draws the same global batch and trains on its slice, so a run
matches the single-process run with the same global batch. Checkpoints are consolidated (full state dicts
keyed by parameter name, gathered through ``torch.distributed.checkpoint.state_dict``) and written by rank 0,
so a run resumes on any world size and under any parallel mode.

Unit scaling and data parallelism. A unit-scaled weight gradient over b rows carries the rule's factor of b
(b^-½), not 1/b: a rank holding b/W rows would use (b/W)^-½. ``grad_correction`` sets the global row count
b on the model, so every rank applies the single-process factor, and multiplies the ranks' average by W
(the gradients are sums over rows; standard models, whose loss is a mean, need nothing). Static unit
scales need no amax all-reduce between ranks: the only collective is the gradient
reduction every data-parallel run already has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process sits: parallel mode, rank, world size, local rank."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(parallel: str, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); return (Dist, device)."""
    if parallel not in PARALLEL:
        raise ValueError(f"unknown parallel mode {parallel!r}; accepted: {', '.join(PARALLEL)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ValueError(f"launched with WORLD_SIZE={world} but --parallel none; "
                             "pass --parallel ddp or fsdp")
        return Dist(), device
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ValueError(f"--parallel {parallel} needs a torchrun launch (RANK/WORLD_SIZE unset), e.g. "
                         f"torchrun --nproc-per-node 2 unitscale train --parallel {parallel} ...")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(parallel, dist.get_rank(), dist.get_world_size(), local), device


def teardown(d: Dist) -> None:
    """Leave the process group together: a barrier first, so that no rank closes its gloo/NCCL connections
    while a peer still has collectives in flight (a peer that loses its connection mid-op aborts the
    process with ``terminate called without an active exception``)."""
    if d.parallel != "none" and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP around the model, or FSDP2 ``fully_shard`` on each residual block and then the root."""
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if d.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module (DDP keeps it in ``.module``; FSDP2 shards in place)."""
    return getattr(model, "module", model)


def is_unit_scaled(model: nn.Module) -> bool:
    """True for a model built with ``scaling="unit"`` or holding an instance of any ``unitscale.nn`` class
    (subclasses included: a user's subclass of ``unitscale.nn.Linear`` counts)."""
    cfg = getattr(unwrap(model), "cfg", None)
    if cfg is not None and hasattr(cfg, "scaling"):
        return cfg.scaling == "unit"
    return any(c.__module__ == "unitscale.nn" for m in model.modules() for c in type(m).__mro__)


def grad_correction(model: nn.Module, d: Dist, rows: float | None = None) -> float:
    """Make a data-parallel unit-scaled model compute the single-process gradient; returns the factor for
    the rank-averaged gradients.

    Unit-scaled: sets the global gradient-row count ``rows`` (tokens per global batch) on the model
    (``unitscale.nn.set_grad_rows``), so each rank's weight gradients carry the rule's factor for the whole
    batch; they are then sums over that rank's rows, and the ranks' average becomes their sum with × W.
    Standard models (a mean loss) and single-process runs: 1, nothing set."""
    if d.world_size == 1 or not is_unit_scaled(model):
        return 1.0
    if rows is None:
        raise ValueError("grad_correction: a data-parallel unit-scaled model needs the global row count rows")
    from unitscale.nn import set_grad_rows

    set_grad_rows(unwrap(model), rows)
    return float(d.world_size)


def shard(batch: Tensor, d: Dist) -> Tensor:
    """This rank's rows of a global batch (the batch size must divide evenly)."""
    if d.world_size == 1:
        return batch
    rows = batch.shape[0]
    if rows % d.world_size:
        raise ValueError(f"batch size {rows} is not divisible by the world size {d.world_size}")
    per = rows // d.world_size
    return batch[d.rank * per:(d.rank + 1) * per]


def mean(value: float, d: Dist) -> float:
    """The mean over ranks of a Python float (logging the global loss)."""
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world_size


def all_true(flag: bool, d: Dist) -> bool:
    """True on every rank iff true on all ranks (so a non-finite step stops every rank together)."""
    if d.world_size == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t) == 0


def state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full model and optimiser state dicts keyed by parameter name (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_state_dict(model, optimizer, options=options)


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
               optim_state: dict[str, Any]) -> None:
    """Load full state dicts saved by ``state`` on any world size (every rank passes the full dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
