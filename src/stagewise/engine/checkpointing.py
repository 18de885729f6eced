"""The checkpoint view of an engine: what :mod:`stagewise.checkpoint` saves and loads."""

from __future__ import annotations

import torch

from stagewise.checkpoint import CheckpointView, LayerTable
from stagewise.engine.parts import EngineParts
from stagewise.module import PipelineModule

__all__ = ["checkpoint_view"]


def checkpoint_view(
    module: PipelineModule, parts: EngineParts, device: torch.device
) -> CheckpointView:
    """This rank's layers, optimizer, scheduler, loss scaler, counters and place."""
    grid = module.mpu()
    topo, rank = grid.topology(), grid.get_global_rank()
    axes = list(topo.get_axis_names())
    layers = {}
    for idx in module.local_layer_ids():
        layer = module.layer_module(idx)
        if layer is not None:
            layers[idx] = layer
    return CheckpointView(
        table=LayerTable.from_specs(module.layer_specs),
        layers=layers,
        parts=list(module.parts),
        optimizer=parts.optimizer,
        lr_scheduler=parts.lr_scheduler,
        loss_scaler=parts.loss_scaler,
        counters=parts.counters,
        topology={"axes": axes, "dims": [topo.get_dim(axis) for axis in axes]},
        rank_repr=topo.get_rank_repr(rank=rank),
        writes_layers=grid.get_data_parallel_rank() == 0,
        global_rank=rank,
        device=device,
        collectives=parts.collectives,
        metadata=module.checkpoint_metadata,
        sharded_optimizer=parts.zero,
    )
