"""The mirror of ``deepspeed.runtime.activation_checkpointing.checkpointing``.

Every name is :mod:`stagewise.checkpointing`'s own object (one configuration,
shared): ``checkpoint``, ``configure``, ``non_reentrant_checkpoint`` and the rest.
"""

from stagewise.checkpointing import *  # noqa: F403
from stagewise.checkpointing import __all__  # noqa: F401
