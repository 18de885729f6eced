"""The mirror of ``deepspeed.runtime``: the module paths third-party pipeline code imports.

``stagewise.runtime.pipe.module``, ``.topology``, ``.schedule`` and ``.engine``
re-export stagewise's own objects under DeepSpeed's paths, as do
``stagewise.runtime.utils``, ``stagewise.runtime.dataloader``,
``stagewise.runtime.lr_schedules`` and
``stagewise.runtime.activation_checkpointing.checkpointing``. They are the same
objects as ``stagewise``'s: ``stagewise.runtime.pipe.module.PipelineModule is
stagewise.PipelineModule``.
"""

from stagewise.runtime import activation_checkpointing, dataloader, lr_schedules, pipe, utils

__all__ = ["activation_checkpointing", "dataloader", "lr_schedules", "pipe", "utils"]
