"""Data loaders: DeepSpeed's ``RepeatingLoader`` and the loader ``deepspeed_io`` builds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["RepeatingLoader", "data_parallel_loader"]


class RepeatingLoader:
    """Wraps an iterable and restarts it when it is exhausted (DeepSpeed's RepeatingLoader)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def data_parallel_loader(
    dataset: Any,
    micro_batch_size: int,
    num_replicas: int,
    rank: int,
    collate_fn: Callable[..., Any] | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader of ``micro_batch_size`` samples over this data-parallel rank's share.

    As DeepSpeed's ``deepspeed_io``: a ``DistributedSampler`` without shuffling,
    incomplete last micro-batches dropped.
    """
    sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=False
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
    )
