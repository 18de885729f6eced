"""Checkpoints: one file per layer, loadable with any number of stages, written atomically.

The rooms:

* :mod:`~stagewise.checkpoint.layout`: file names, the layer table, the manifest (pure);
* :mod:`~stagewise.checkpoint.files`: durable, atomic writes and named read errors;
* :mod:`~stagewise.checkpoint.state`: the narrow view of a rank that is saved and loaded;
* :mod:`~stagewise.checkpoint.optim_state`: optimizer state by layer and parameter name;
* :mod:`~stagewise.checkpoint.save` / :mod:`~stagewise.checkpoint.load`: over the ranks;
* :mod:`~stagewise.checkpoint.export`: one consolidated state dict, and back.

The engine's ``save_checkpoint`` / ``load_checkpoint`` build a
:class:`CheckpointView` and call the functions here; nothing here imports the
engine.
"""

from stagewise.checkpoint.export import (
    export_checkpoint,
    import_state_dict,
    read_state_dict,
    resolve_tag_dir,
)
from stagewise.checkpoint.layout import (
    ENGINE_STATES,
    LATEST,
    MANIFEST,
    LayerTable,
    layer_file_name,
    rank_file_name,
    read_latest,
    read_manifest,
    verify_manifest,
)
from stagewise.checkpoint.load import load_checkpoint
from stagewise.checkpoint.save import save_checkpoint
from stagewise.checkpoint.state import (
    CheckpointView,
    LoadResult,
    ShardedOptimizer,
    TrainingCounters,
)
from stagewise.errors import CheckpointError

__all__ = [
    "ENGINE_STATES",
    "LATEST",
    "MANIFEST",
    "CheckpointError",
    "CheckpointView",
    "LayerTable",
    "LoadResult",
    "ShardedOptimizer",
    "TrainingCounters",
    "export_checkpoint",
    "import_state_dict",
    "layer_file_name",
    "load_checkpoint",
    "rank_file_name",
    "read_latest",
    "read_manifest",
    "read_state_dict",
    "resolve_tag_dir",
    "save_checkpoint",
    "verify_manifest",
]
