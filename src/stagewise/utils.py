"""The mirror of ``deepspeed.utils``: the helpers pipeline scripts import from it.

``from stagewise.utils import RepeatingLoader, logger, log_dist`` works as
``from deepspeed.utils import ...`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch.distributed as dist

from stagewise.loader import RepeatingLoader

__all__ = ["RepeatingLoader", "log_dist", "logger"]

#: stagewise's logger (DeepSpeed scripts log through ``deepspeed.utils.logger``).
logger = logging.getLogger("stagewise")


def log_dist(message: str, ranks: Iterable[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``message`` on the given global ranks only (DeepSpeed's ``log_dist``).

    Args:
        message: the text to log.
        ranks: the ranks that log it; None or a list holding ``-1`` means every rank.
            Without a process group the one process counts as rank 0.
        level: a ``logging`` level.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    chosen = None if ranks is None else list(ranks)
    if chosen is None or -1 in chosen or rank in chosen:
        logger.log(level, "[Rank %d] %s", rank, message)
