"""PipelineParallelGrid: the process groups of a topology.

The grid is the one object that turns a :class:`~stagewise.topology.ProcessTopology`
into ``torch.distributed`` process groups. It answers the Megatron-style
``mpu`` questions (which stage am I, which data-parallel group, ...).

Groups, for a rank at coordinate ``(pipe=p, data=d, model=m)``:

* data-parallel group: ranks that differ only in ``data`` (same stage, same slice);
* pipe-parallel group: ranks that differ only in ``pipe`` (one pipeline);
* slice group: ranks that differ only in ``model`` (tensor slicing inside a stage);
* model-parallel group: all ranks with the same ``data`` coordinate (every stage and
  slice of one model replica; DeepSpeed uses it for global norms and overflow checks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from stagewise.topology import PipeDataParallelTopology, ProcessTopology

__all__ = ["PipelineParallelGrid"]

logger = logging.getLogger(__name__)


def _new_groups(comm_lists: list[list[int]], rank: int) -> tuple[list[int], Any]:
    """Create one group per list (collectively, in order); return this rank's."""
    mine: tuple[list[int], Any] = ([rank], None)
    for ranks in comm_lists:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = (list(ranks), group)
    return mine


class PipelineParallelGrid:
    """The process groups of ``topology`` over the default process group.

    Args:
        topology: the layout of ranks. Defaults to all ranks in one pipeline.
        process_group: None or the default group (DeepSpeed's argument): the grid is
            always built over the default group.

    Raises:
        ValueError: when the topology's size differs from the world size, or a
            process group other than the default one is given.
    """

    def __init__(self, topology: ProcessTopology | None = None, process_group: Any = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "PipelineParallelGrid needs torch.distributed; call "
                "stagewise.init_distributed() first (or launch with torchrun)"
            )
        if process_group is not None and process_group is not dist.group.WORLD:
            raise ValueError(
                "PipelineParallelGrid(process_group=...) must be None or the default group: "
                "the grid's groups are built over every rank of the default group; launch only "
                "the ranks of the pipeline (or describe them in the topology) instead"
            )
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if topology is None:
            topology = PipeDataParallelTopology(num_pp=self.world_size, num_dp=1)
        if topology.world_size() != self.world_size:
            raise ValueError(
                f"the topology has {topology.world_size()} ranks "
                f"({dict(zip(topology.get_axis_names(), topology.dims, strict=True))}) but the "
                f"world size is {self.world_size}; make the product of the topology's "
                "dimensions equal the number of processes"
            )
        self._topo = topology
        self.data_parallel_size = max(topology.get_dim("data"), 1)
        self.pipe_parallel_size = max(topology.get_dim("pipe"), 1)
        self.model_parallel_size = max(topology.get_dim("model"), 1)
        self.slice_parallel_size = self.model_parallel_size

        coord = topology.get_coord(self.global_rank)
        self.stage_id: int = getattr(coord, "pipe", 0)
        self.data_parallel_id: int = getattr(coord, "data", 0)
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1

        # Every rank creates every group, in the same order (torch.distributed's rule).
        replica_lists = (
            [
                sorted(topology.get_axis_list(axis="data", idx=dp))
                for dp in range(self.data_parallel_size)
            ]
            if "data" in topology.get_axis_names()
            else [list(range(self.world_size))]
        )
        self.ds_model_group_ranks, self.ds_model_proc_group = _new_groups(
            replica_lists, self.global_rank
        )
        self.ds_model_world_size = len(self.ds_model_group_ranks)
        self.ds_model_rank = self.ds_model_group_ranks.index(self.global_rank)

        self.dp_groups = topology.get_axis_comm_lists("data") or [
            [r] for r in range(self.world_size)
        ]
        self.dp_group, self.dp_proc_group = _new_groups(self.dp_groups, self.global_rank)

        self.pipe_groups = topology.get_axis_comm_lists("pipe") or [
            [r] for r in range(self.world_size)
        ]
        self.pp_group, self.pp_proc_group = _new_groups(self.pipe_groups, self.global_rank)

        self.model_groups = topology.get_axis_comm_lists("model") or [
            [r] for r in range(self.world_size)
        ]
        self.slice_group, self.slice_proc_group = _new_groups(self.model_groups, self.global_rank)
        if self.global_rank == 0:
            logger.info("stagewise grid: %s", topology)

    # -- coordinates ----------------------------------------------------------------
    def get_stage_id(self) -> int:
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        return self.data_parallel_id

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        """The global rank of ``stage_id`` at this rank's other coordinates (or ``kwargs``)."""
        me = self._topo.get_coord(self.global_rank)
        return self._topo.get_rank(**me._replace(pipe=stage_id, **kwargs)._asdict())

    def topology(self) -> ProcessTopology:
        return self._topo

    def get_global_rank(self) -> int:
        return self.global_rank

    # -- pipe ------------------------------------------------------------------------
    def get_pipe_parallel_rank(self) -> int:
        """The stage of the pipeline this rank belongs to."""
        return self.stage_id

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        """The number of stages."""
        return self.pipe_parallel_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self) -> Any:
        """The ranks of this rank's pipeline."""
        return self.pp_proc_group

    # -- data ------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        """Which pipeline (model replica) this rank belongs to."""
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        """The number of pipelines."""
        return self.data_parallel_size

    def get_data_parallel_group(self) -> Any:
        """The same stage of every pipeline."""
        return self.dp_proc_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_group)

    # -- model (all stages and slices of one replica) --------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.ds_model_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ds_model_world_size

    def get_model_parallel_group(self) -> Any:
        return self.ds_model_proc_group

    # -- slice (tensor parallelism inside a stage) -----------------------------------
    def get_slice_parallel_rank(self) -> int:
        if "model" in self._topo.get_axis_names():
            return int(self._topo.get_coord(self.global_rank).model)
        return 0

    def get_tensor_model_parallel_rank(self) -> int:
        return self.get_slice_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return self.slice_parallel_size

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.slice_parallel_size

    def get_slice_parallel_group(self) -> Any:
        return self.slice_proc_group

    def get_tensor_model_parallel_group(self) -> Any:
        """The slice group under Megatron's name (tensor-parallel layers take the grid as mpu)."""
        return self.slice_proc_group
