"""Data-parallel set-up: the process group when started by ``torchrun``."""

from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def setup_distributed(device: str | None = None):
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1). Returns
    (rank, world_size, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    if device is None:
        device = (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return rank, world, torch.device(device)
