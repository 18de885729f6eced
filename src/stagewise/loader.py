"""Data loaders: DeepSpeed's ``RepeatingLoader`` and the loader ``deepspeed_io`` builds.

Both remember where they are, so a checkpoint can bring the data position back:
:meth:`RepeatingLoader.state_dict` holds the epoch, the offset into it (items
handed out), the sampler's epoch and the torch RNG state from which the epoch's
iterator was made (a shuffling sampler draws its order from it). Loading the
state rebuilds that epoch's iterator from the same RNG state and skips the
offset: for the loader of :func:`data_parallel_loader` by starting its sampler
there (nothing is read twice); for any other loader by drawing the items again.
The engine saves the state of the loader it trains from with each checkpoint
and restores it on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from stagewise.errors import CheckpointError

__all__ = ["RepeatingLoader", "ResumableDistributedSampler", "data_parallel_loader"]


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` whose next epoch can start part way (for a resume)."""

    start: int = 0

    def set_start(self, samples: int) -> None:
        """Skip the first ``samples`` indices of this replica's next pass."""
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}")
        self.start = samples

    def __iter__(self) -> Iterator[Any]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


class RepeatingLoader:
    """Wraps an iterable and restarts it when it is exhausted (DeepSpeed's RepeatingLoader).

    Like DeepSpeed's it does not call ``sampler.set_epoch`` itself; unlike it, it can
    save and restore its position (:meth:`state_dict`, :meth:`load_state_dict`).
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.epoch = 0
        self.offset = 0
        self._epoch_rng = torch.get_rng_state()
        self._sampler_epoch = self._read_sampler_epoch()
        self.data_iter = iter(self.loader)

    def _read_sampler_epoch(self) -> int | None:
        epoch = getattr(getattr(self.loader, "sampler", None), "epoch", None)
        return epoch if isinstance(epoch, int) else None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self.data_iter)
        except StopIteration:
            self.epoch += 1
            self.offset = 0
            self._epoch_rng = torch.get_rng_state()
            self._sampler_epoch = self._read_sampler_epoch()
            self.data_iter = iter(self.loader)
            item = next(self.data_iter)
        self.offset += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: epoch, offset, sampler epoch, the epoch's RNG, its length."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "sampler_epoch": self._sampler_epoch,
            "rng": self._epoch_rng.clone(),
            "length": _length(self.loader),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position (the loader must be built over the same data).

        Raises:
            CheckpointError: the loader's length differs from the saved one's.
        """
        length = _length(self.loader)
        if state.get("length") is not None and length is not None and length != state["length"]:
            raise CheckpointError(
                f"the checkpoint's data position is for a loader of {state['length']} items per "
                f"epoch but this one has {length}; resuming it would skip the wrong data: "
                "build the loader over the same data (or start it afresh)"
            )
        sampler = getattr(self.loader, "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        if state.get("sampler_epoch") is not None and set_epoch is not None:
            set_epoch(int(state["sampler_epoch"]))
        offset = int(state["offset"])
        batch_size = getattr(self.loader, "batch_size", None)
        current = torch.get_rng_state()
        torch.set_rng_state(state["rng"])
        try:
            if isinstance(sampler, ResumableDistributedSampler) and isinstance(batch_size, int):
                sampler.set_start(offset * batch_size)  # drop_last batches: whole ones only
                self.data_iter = iter(self.loader)
            else:
                self.data_iter = iter(self.loader)
                for _ in range(offset):
                    next(self.data_iter)
        finally:
            torch.set_rng_state(current)
        self.epoch, self.offset = int(state["epoch"]), offset
        self._epoch_rng = state["rng"].clone()
        self._sampler_epoch = state.get("sampler_epoch")


def data_parallel_loader(
    dataset: Any,
    micro_batch_size: int,
    num_replicas: int,
    rank: int,
    collate_fn: Callable[..., Any] | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader of ``micro_batch_size`` samples over this data-parallel rank's share.

    As DeepSpeed's ``deepspeed_io``: a ``DistributedSampler`` without shuffling,
    incomplete last micro-batches dropped. Its sampler can start part way into an
    epoch, so a resume skips the data already trained on without reading it.
    """
    sampler = ResumableDistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=False
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
    )
