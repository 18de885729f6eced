"""The mirror of ``deepspeed.runtime.lr_schedules``: DeepSpeed's warm-up schedules."""

from stagewise.lr_schedules import WarmupDecayLR, WarmupLR

__all__ = ["WarmupDecayLR", "WarmupLR"]
