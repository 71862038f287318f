"""Multi-process training through PyTorch's own engine: ``torchrun`` sets the environment, DDP syncs gradients.

``torchrun --nproc-per-node N -m mmer_ext train ...`` runs N copies of the same command; each rank sees a
``DistributedSampler`` shard of every epoch's permutation and a per-rank batch of ``batch_size / N``, so the union of
the ranks' batches is exactly the batch a single process would draw, and the averaged gradient is the same.
Rank 0 alone evaluates, selects and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    from mmer_ext.train.config import ConfigError, check_field

    check_field("device", name)
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but this torch sees no CUDA GPU; use --device cpu or "
                              "auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                              "from 0; use --device cuda or auto")
    return device


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))
