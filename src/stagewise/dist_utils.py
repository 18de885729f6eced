"""Small helpers over torch.distributed shared by the grid, module and engine."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

__all__ = ["default_device", "free_port", "require_dist"]


def require_dist(what: str) -> None:
    """Raise a clear error when the default process group is missing."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs torch.distributed: call stagewise.init_distributed() first "
            "(it reads torchrun's environment, or sets up a single process without it)"
        )


def default_device() -> torch.device:
    """cuda:LOCAL_RANK (or rank modulo the device count) under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None else dist.get_rank() % torch.cuda.device_count()
        return torch.device("cuda", index)
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
