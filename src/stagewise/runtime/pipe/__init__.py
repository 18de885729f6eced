"""The mirror of ``deepspeed.runtime.pipe``: ``PipelineModule``, ``LayerSpec``,
``TiedLayerSpec``, ``ProcessTopology``, and the submodules ``module``,
``topology``, ``schedule`` and ``engine`` under DeepSpeed's names."""

from stagewise.runtime.pipe import engine, module, schedule, topology
from stagewise.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from stagewise.runtime.pipe.topology import ProcessTopology

__all__ = [
    "LayerSpec",
    "PipelineModule",
    "ProcessTopology",
    "TiedLayerSpec",
    "engine",
    "module",
    "schedule",
    "topology",
]
