"""stagewise: pipeline-parallel training for PyTorch with DeepSpeed's pipe API.

Move a DeepSpeed pipeline script over by changing its imports::

    import stagewise as deepspeed
    from stagewise.pipe import PipelineModule, LayerSpec, TiedLayerSpec

Nothing runs on import.
"""

from stagewise.config import Config
from stagewise.engine import PipelineEngine
from stagewise.entry import init_distributed, initialize
from stagewise.errors import (
    CheckpointError,
    ConfigError,
    InstructionError,
    PeerError,
    PipelineError,
)
from stagewise.grid import PipelineParallelGrid
from stagewise.loader import RepeatingLoader
from stagewise.module import PipelineModule
from stagewise.partition import partition_balanced, partition_uniform
from stagewise.spec import LayerSpec, TiedLayerSpec
from stagewise.topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "InstructionError",
    "LayerSpec",
    "PeerError",
    "PipeDataParallelTopology",
    "PipeModelDataParallelTopology",
    "PipelineEngine",
    "PipelineError",
    "PipelineModule",
    "PipelineParallelGrid",
    "ProcessTopology",
    "RepeatingLoader",
    "TiedLayerSpec",
    "__version__",
    "init_distributed",
    "initialize",
    "partition_balanced",
    "partition_uniform",
]
