"""The mirror of ``deepspeed.runtime.dataloader``: ``RepeatingLoader``."""

from stagewise.loader import RepeatingLoader

__all__ = ["RepeatingLoader"]
