"""The narrow view of one rank that a checkpoint saves and loads.

The checkpoint code never sees an engine: the engine describes what to save
with a :class:`CheckpointView` (the layer table, this rank's layer modules, the
optimizer, scheduler and loss scaler, the counters, where this rank sits in the
topology and the collectives it may use), and a load hands back what it read
(:class:`LoadResult`) for the engine to apply. So checkpoint I/O can be tested
with plain modules, without processes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from stagewise.checkpoint.layout import LayerTable
from stagewise.collectives import Collectives

__all__ = [
    "CheckpointView",
    "LoadResult",
    "ShardedOptimizer",
    "Stateful",
    "TrainingCounters",
    "rng_state",
    "set_rng_state",
]


class Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict`` (a scheduler, a loss scaler)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ShardedOptimizer(Protocol):
    """An optimizer whose state is spread over a stage's data-parallel replicas (ZeRO-1).

    Checkpoints hold its state as an unsharded optimizer's: both methods return an
    object with ``param_groups`` over the model's parameters (with their
    hyperparameters), as ``torch.optim`` optimizers have.
    """

    def gather_unsharded(self) -> Any:
        """Every replica calls it: on data-parallel rank 0 (the writer) the whole state, with
        ``state`` by parameter; None on the others."""
        ...

    def unsharded_loader(self) -> Any:
        """An object whose ``load_state_dict`` takes an unsharded optimizer's state dict and
        keeps this replica's share of it."""
        ...


@dataclass
class TrainingCounters:
    """The step counters a checkpoint keeps (DeepSpeed's names)."""

    global_steps: int = 0
    global_samples: int = 0
    skipped_steps: int = 0

    def restore(self, saved: TrainingCounters) -> None:
        """Take the values of ``saved`` (a checkpoint's)."""
        self.global_steps = saved.global_steps
        self.global_samples = saved.global_samples
        self.skipped_steps = saved.skipped_steps


@dataclass
class CheckpointView:
    """What one rank saves and loads.

    Attributes:
        table: which layers get files and where tied modules live.
        layers: this rank's layers by global index: the module holding each layer's
            weights (a tied module under every index of its key held here); plain
            callables are absent.
        parts: the layer boundaries of every pipeline part (recorded, for readers).
        optimizer: the optimizer over these layers' parameters, or None.
        lr_scheduler, loss_scaler: their state is saved by rank 0 (identical everywhere).
        counters: the step counters to save.
        topology: ``{"axes": [...], "dims": [...]}``; RNG states are restored only
            on the same topology.
        rank_repr: the suffix of this rank's layer files (``"model_01"``, or ``""``).
        writes_layers: whether this rank writes its layers' files (data-parallel
            rank 0 of its stage: replicas hold the same weights).
        global_rank: this rank.
        device: where collectives' tensors live.
        collectives: the bounded collectives over every rank.
        metadata: JSON-able facts about the model, kept in the manifest.
        data_state: where this rank's data loader is (a stagewise loader's
            ``state_dict()``), saved with its RNG state; None when it has none.
        sharded_optimizer: with ZeRO-1, ``optimizer``'s state spread over the replicas:
            saving gathers it into the layer files of an unsharded run, loading gives
            each replica its share (None: ``optimizer`` holds its whole state).
    """

    table: LayerTable
    layers: Mapping[int, nn.Module]
    parts: list[int]
    optimizer: Any
    lr_scheduler: Stateful | None
    loss_scaler: Stateful | None
    counters: TrainingCounters
    topology: dict[str, Any]
    rank_repr: str = ""
    writes_layers: bool = True
    global_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    collectives: Collectives = field(default_factory=lambda: Collectives(300.0, "rank 0"))
    metadata: Mapping[str, Any] = field(default_factory=dict)
    data_state: Any = None
    sharded_optimizer: ShardedOptimizer | None = None


@dataclass
class LoadResult:
    """What :func:`~stagewise.checkpoint.load_checkpoint` read.

    Attributes:
        path: the tag directory loaded, or None when there was nothing to load.
        client_state: the ``client_state`` saved with it (this rank's when the
            topology is unchanged).
        counters: the saved step counters (None when only weights were loaded).
        data_state: this rank's saved data-loader position (same topology only), or None.
    """

    path: str | None
    client_state: dict[str, Any] | None
    counters: TrainingCounters | None = None
    data_state: Any = None


def rng_state(device: torch.device) -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (and CUDA on a GPU)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
