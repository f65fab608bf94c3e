"""Multi-process training when started by torchrun: one process per GPU (or CPU process
with gloo), DistributedDataParallel over them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Distributed", "setup_distributed"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process per GPU (or CPU process with gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    import torch.distributed as dist

    dist_info = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info, device
