"""The mirror of ``deepspeed.runtime.utils``: seeding and partitioning helpers.

``set_random_seed`` seeds Python, NumPy and torch exactly as DeepSpeed's does;
``partition_uniform`` equals DeepSpeed's; ``partition_balanced`` is stagewise's
optimal split, which breaks ties as DeepSpeed does wherever DeepSpeed's split is
also optimal (see :func:`stagewise.partition.partition_balanced`).
"""

from stagewise.partition import partition_balanced, partition_uniform
from stagewise.spec import seed_everything as set_random_seed

__all__ = ["partition_balanced", "partition_uniform", "set_random_seed"]
