"""The mirror of ``deepspeed.ops.transformer``: DeepSpeed's fused transformer kernel, an error."""

from __future__ import annotations

from typing import Any

__all__ = ["DeepSpeedTransformerConfig", "DeepSpeedTransformerLayer"]

_INSTEAD = (
    "is DeepSpeed's fused CUDA transformer kernel, which stagewise does not mirror: write the "
    "layer in torch (e.g. torch.nn.TransformerEncoderLayer) and give it to PipelineModule as "
    "a LayerSpec"
)


class DeepSpeedTransformerConfig:
    """The configuration of DeepSpeed's fused transformer kernel: not available."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"deepspeed.ops.transformer.DeepSpeedTransformerConfig {_INSTEAD}"
        )


class DeepSpeedTransformerLayer:
    """DeepSpeed's fused transformer layer: not available (constructing it raises)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"deepspeed.ops.transformer.DeepSpeedTransformerLayer {_INSTEAD}")
