"""The mirror of ``deepspeed.runtime.pipe.module``: the model as layer specs."""

from stagewise.errors import PipelineError
from stagewise.module import PipelineModule
from stagewise.spec import LayerSpec, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineError", "PipelineModule", "TiedLayerSpec"]
