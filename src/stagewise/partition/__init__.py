"""Layer boundaries: which consecutive layers each pipeline stage holds.

A partition of ``n`` items into ``p`` parts is a list of ``p + 1`` boundaries
``[0, b1, ..., n]``; part ``k`` holds the items ``boundaries[k]:boundaries[k + 1]``.

- :func:`partition_uniform` splits by count, exactly as DeepSpeed does.
- :func:`partition_balanced` splits weighted items so that the heaviest part
  (the pipeline's bottleneck) is as light as possible: an exact optimum, never
  heavier than DeepSpeed's answer, and fast for thousands of layers.
- :class:`PartitionMethod` parses the ``partition_method`` option once
  (``'uniform'``, ``'parameters'``, ``'type:REGEX'``, ``'profile'`` or an
  explicit list of boundaries), and :func:`compute_boundaries` turns it into
  boundaries for a list of layers.

Nothing here touches a process group. The rooms: :mod:`~stagewise.partition.balanced`
(the partitions themselves) and :mod:`~stagewise.partition.methods` (the option).

>>> partition_uniform(num_items=10, num_parts=3)
[0, 4, 7, 10]
>>> partition_balanced([1, 1, 1, 1, 8], num_parts=2)
[0, 4, 5]
>>> compute_boundaries("type:linear", 2, class_names=["Embedding", "Linear", "Linear", "ReLU"])
[0, 2, 4]
"""

from stagewise.partition.balanced import part_weights, partition_balanced, partition_uniform
from stagewise.partition.methods import PartitionMethod, PartitionMethodLike, compute_boundaries

__all__ = [
    "PartitionMethod",
    "PartitionMethodLike",
    "compute_boundaries",
    "part_weights",
    "partition_balanced",
    "partition_uniform",
]
