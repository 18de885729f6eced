"""The mirror of ``deepspeed.runtime.pipe.topology``: topologies and the process grid."""

from stagewise.grid import PipelineParallelGrid
from stagewise.topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

__all__ = [
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineParallelGrid",
    "ProcessTopology",
]


def _prime_factors(number: int) -> list[int]:
    """The prime factors of ``number`` in increasing order (DeepSpeed's private helper,
    mirrored because its own topology tests import it).

    Raises:
        ValueError: ``number`` is below 1.

    >>> _prime_factors(12)
    [2, 2, 3]
    """
    if number < 1:
        raise ValueError(f"prime factors need a positive integer, got {number}")
    factors, rest, divisor = [], number, 2
    while divisor * divisor <= rest:
        while rest % divisor == 0:
            factors.append(divisor)
            rest //= divisor
        divisor += 1
    if rest > 1:
        factors.append(rest)
    return factors
