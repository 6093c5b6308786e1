"""``torch.distributed`` helpers: who this process is, and joining the group ``torchrun`` set up."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["comm_device", "dist_info", "init_distributed"]


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1).

    Backend: ``nccl`` for CUDA, ``gloo`` on CPU. Returns ``(rank, local_rank, world_size)``;
    ``(0, 0, 1)`` outside ``torchrun``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def comm_device(device: torch.device | str) -> torch.device:
    """Where a tensor for a collective must live: ``device`` under ``nccl``, the CPU under
    ``gloo``. Needs an initialized process group."""
    device = torch.device(device)
    return device if dist.get_backend() == "nccl" else torch.device("cpu")
