"""DeepSpeed's ``unit.util`` helpers that its pipeline tests use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["no_child_process_in_deepspeed_io", "skip_on_arch"]


def skip_on_arch(min_arch: int = 7) -> None:
    """DeepSpeed skips on CUDA devices older than ``min_arch``; every device runs here."""


@contextlib.contextmanager
def no_child_process_in_deepspeed_io() -> Iterator[None]:
    """DeepSpeed's data loader starts worker processes unless told not to; stagewise's never does."""
    yield
