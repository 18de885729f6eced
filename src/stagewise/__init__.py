"""stagewise: pipeline-parallel training for PyTorch with DeepSpeed's pipe API.

Move a DeepSpeed pipeline script over by changing its imports::

    import stagewise as deepspeed
    from stagewise.pipe import PipelineModule, LayerSpec, TiedLayerSpec

DeepSpeed's module paths have stagewise twins of the same shape, loaded with the
package so that ``deepspeed.pipe.X`` or ``deepspeed.runtime.utils.set_random_seed``
works after ``import stagewise as deepspeed``: ``stagewise.pipe``,
``stagewise.runtime.pipe.{module,topology,schedule,engine}``,
``stagewise.runtime.utils``, ``stagewise.utils``, ``stagewise.comm``,
``stagewise.accelerator``, ``stagewise.checkpointing`` and ``stagewise.ops`` (see
``docs/moving-from-deepspeed.md``). Nothing runs on import.
"""

from stagewise import accelerator, checkpointing, comm, ops, pipe, runtime, utils
from stagewise.accelerator import get_accelerator
from stagewise.config import Config
from stagewise.engine import PipelineEngine
from stagewise.entry import add_config_arguments, init_distributed, initialize
from stagewise.errors import (
    CheckpointError,
    ConfigError,
    InstructionError,
    NonFiniteError,
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
    "NonFiniteError",
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
    "accelerator",
    "add_config_arguments",
    "checkpointing",
    "comm",
    "get_accelerator",
    "init_distributed",
    "initialize",
    "ops",
    "partition_balanced",
    "partition_uniform",
    "pipe",
    "runtime",
    "utils",
]
