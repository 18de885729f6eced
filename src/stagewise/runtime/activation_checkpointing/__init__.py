"""The mirror of ``deepspeed.runtime.activation_checkpointing``.

``checkpointing`` here is :mod:`stagewise.checkpointing` (as DeepSpeed's is
``deepspeed.checkpointing``).
"""

from stagewise.runtime.activation_checkpointing import checkpointing

__all__ = ["checkpointing"]
