"""Small helpers over torch.distributed shared by the grid, module and engine."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from stagewise.errors import PeerError

__all__ = ["default_device", "require_dist", "wait_bounded"]


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


def wait_bounded(
    work: Any,
    timeout_s: float,
    who: str,
    what: str,
    hint: str = "the peer may have died or stopped answering",
) -> None:
    """Wait for a ``torch.distributed`` work object at most ``timeout_s`` seconds.

    Raises:
        PeerError: naming ``who`` waited for ``what``, when the peer closed its
            connection (it died) or nothing came in time (it hung).
    """
    try:
        done = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise PeerError(
            f"{who}: {what} failed: {exc}. {hint[:1].upper()}{hint[1:]} "
            f"(pipeline.timeout_s={timeout_s:g})"
        ) from exc
    if done is False:
        raise PeerError(
            f"{who}: {what} did not finish within pipeline.timeout_s={timeout_s:g} s; {hint}"
        )
