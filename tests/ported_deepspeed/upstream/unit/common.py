"""DeepSpeed's ``unit.common.DistributedTest``, as stagewise's test helper provides it."""

from ported_deepspeed.common import DistributedTest

__all__ = ["DistributedTest"]
