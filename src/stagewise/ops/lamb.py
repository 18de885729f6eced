"""The mirror of ``deepspeed.ops.lamb``: ``FusedLamb`` is a CUDA kernel, an error here."""

from __future__ import annotations

from typing import Any

__all__ = ["FusedLamb"]


class FusedLamb:
    """DeepSpeed's fused LAMB kernel: not available (constructing it raises)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "deepspeed.ops.lamb.FusedLamb is DeepSpeed's CUDA kernel and torch has no LAMB: "
            "use a LAMB implementation of your own (or torch.optim.AdamW) and pass it as "
            "stagewise.initialize(optimizer=...)"
        )
