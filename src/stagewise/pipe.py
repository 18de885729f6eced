"""The mirror of ``deepspeed.pipe``: ``from stagewise.pipe import PipelineModule, LayerSpec``."""

from stagewise.module import PipelineModule
from stagewise.spec import LayerSpec, TiedLayerSpec
from stagewise.topology import ProcessTopology

__all__ = ["LayerSpec", "PipelineModule", "ProcessTopology", "TiedLayerSpec"]
