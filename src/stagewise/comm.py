"""The mirror of ``deepspeed.comm``: collectives and point-to-point calls by DeepSpeed's names.

``import stagewise.comm as dist`` gives the functions a DeepSpeed script calls
as ``deepspeed.comm.X``, with DeepSpeed's signatures, over ``torch.distributed``
(``ReduceOp`` and ``P2POp`` are torch's own). DeepSpeed's profiling keywords
(``prof``, ``log_name``, ``debug``) are accepted; ``prof=True`` asks for
DeepSpeed's comms logger, which is not mirrored, and is an error that says what
to use instead, as are ``log_summary`` and ``configure``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from stagewise.entry import init_distributed

__all__ = [
    "P2POp",
    "ReduceOp",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "allgather_fn",
    "barrier",
    "batch_isend_irecv",
    "broadcast",
    "broadcast_object_list",
    "configure",
    "destroy_process_group",
    "gather",
    "get_all_ranks_from_group",
    "get_global_rank",
    "get_local_rank",
    "get_rank",
    "get_world_group",
    "get_world_size",
    "has_all_gather_into_tensor",
    "has_reduce_scatter_tensor",
    "inference_all_reduce",
    "init_distributed",
    "irecv",
    "is_available",
    "is_initialized",
    "isend",
    "log_summary",
    "monitored_barrier",
    "new_group",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_fn",
    "reduce_scatter_tensor",
    "scatter",
    "send",
]

ReduceOp = dist.ReduceOp
P2POp = dist.P2POp

_PROFILING_KEYS = ("prof", "log_name", "debug")
_NO_LOGGER = (
    "DeepSpeed's comms logger is not mirrored in stagewise; time collectives with "
    "torch.profiler (or the engine's timeline: pipeline.record_timeline)"
)


def _profiling(name: str, options: dict[str, Any]) -> None:
    """Accept DeepSpeed's profiling keywords; ``prof=True`` is an error."""
    unknown = sorted(set(options) - set(_PROFILING_KEYS))
    if unknown:
        raise TypeError(f"stagewise.comm.{name}() got unexpected keyword arguments {unknown}")
    if options.get("prof"):
        raise NotImplementedError(f"stagewise.comm.{name}(prof=True): {_NO_LOGGER}")


def configure(*args: Any, **kwargs: Any) -> None:
    """DeepSpeed's comms-logger set-up: not mirrored (raises ``NotImplementedError``)."""
    raise NotImplementedError(f"stagewise.comm.configure(): {_NO_LOGGER}")


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> None:
    """DeepSpeed's comms-logger summary: not mirrored (raises ``NotImplementedError``)."""
    raise NotImplementedError(f"stagewise.comm.log_summary(): {_NO_LOGGER}")


# -- the process group --------------------------------------------------------------------------
def is_available() -> bool:
    return bool(dist.is_available())


def is_initialized() -> bool:
    return bool(dist.is_initialized())


def destroy_process_group(group: Any = None) -> None:
    dist.destroy_process_group(group)


def new_group(ranks: list[int]) -> Any:
    """A process group of ``ranks`` (every rank must call it, in the same order)."""
    return dist.new_group(ranks=ranks)


def _world() -> Any:
    return dist.group.WORLD


def get_world_group() -> Any:
    return _world()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the world by default)."""
    return int(dist.get_rank(group))


def get_world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (the world by default)."""
    return int(dist.get_world_size(group))


def get_local_rank() -> int:
    """This process's rank on its machine: ``LOCAL_RANK`` (torchrun sets it), else 0."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    return int(local)


def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` in ``group``."""
    return int(dist.get_global_rank(group if group is not None else _world(), group_rank))


def get_all_ranks_from_group(group: Any = None) -> list[int]:
    """The global ranks of ``group``, in group order."""
    return list(dist.get_process_group_ranks(group if group is not None else _world()))


# -- collectives ------------------------------------------------------------------------------
def barrier(
    group: Any = None, async_op: bool = False, device_ids: Any = None, **profiling: Any
) -> Any:
    _profiling("barrier", profiling)
    return dist.barrier(group=group, async_op=async_op, device_ids=device_ids)


def monitored_barrier(
    group: Any = None,
    timeout: datetime.timedelta | None = None,
    wait_all_ranks: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("monitored_barrier", profiling)
    return dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


def broadcast(
    tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False, **profiling: Any
) -> Any:
    _profiling("broadcast", profiling)
    return dist.broadcast(tensor, src, group=group, async_op=async_op)


def broadcast_object_list(
    object_list: list[Any], src: int, group: Any = None, device: Any = None, **profiling: Any
) -> Any:
    _profiling("broadcast_object_list", profiling)
    return dist.broadcast_object_list(object_list, src, group=group, device=device)


def all_reduce(
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("all_reduce", profiling)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def inference_all_reduce(
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    """DeepSpeed's inference all-reduce: here the plain ``all_reduce``."""
    _profiling("inference_all_reduce", profiling)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def reduce(
    tensor: torch.Tensor,
    dst: int,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("reduce", profiling)
    return dist.reduce(tensor, dst, op=op, group=group, async_op=async_op)


def all_gather(
    tensor_list: list[torch.Tensor],
    tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("all_gather", profiling)
    return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("all_gather_into_tensor", profiling)
    return dist.all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op)


def allgather_fn(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    """DeepSpeed's name for :func:`all_gather_into_tensor`."""
    _profiling("allgather_fn", profiling)
    return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def all_gather_object(object_list: list[Any], obj: Any, group: Any = None, **profiling: Any) -> Any:
    _profiling("all_gather_object", profiling)
    return dist.all_gather_object(object_list, obj, group=group)


def reduce_scatter_tensor(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("reduce_scatter_tensor", profiling)
    return dist.reduce_scatter_tensor(output_tensor, tensor, op=op, group=group, async_op=async_op)


def reduce_scatter_fn(
    output_tensor: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    """DeepSpeed's name for :func:`reduce_scatter_tensor`."""
    _profiling("reduce_scatter_fn", profiling)
    return dist.reduce_scatter_tensor(output_tensor, tensor, op=op, group=group, async_op=async_op)


def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("reduce_scatter", profiling)
    return dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)


def all_to_all_single(
    output: torch.Tensor,
    tensor: torch.Tensor,
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("all_to_all_single", profiling)
    return dist.all_to_all_single(
        output, tensor, output_split_sizes, input_split_sizes, group=group, async_op=async_op
    )


def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("all_to_all", profiling)
    return dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int = 0,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("gather", profiling)
    return dist.gather(tensor, gather_list, dst, group=group, async_op=async_op)


def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int = 0,
    group: Any = None,
    async_op: bool = False,
    **profiling: Any,
) -> Any:
    _profiling("scatter", profiling)
    return dist.scatter(tensor, scatter_list, src, group=group, async_op=async_op)


def has_all_gather_into_tensor() -> bool:
    return True


def has_reduce_scatter_tensor() -> bool:
    return True


# -- point to point -----------------------------------------------------------------------------
def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0, **profiling: Any) -> None:
    _profiling("send", profiling)
    dist.send(tensor, dst, group=group, tag=tag)


def recv(
    tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0, **profiling: Any
) -> int:
    _profiling("recv", profiling)
    return int(dist.recv(tensor, src, group=group, tag=tag))


def isend(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0, **profiling: Any) -> Any:
    _profiling("isend", profiling)
    return dist.isend(tensor, dst, group=group, tag=tag)


def irecv(
    tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0, **profiling: Any
) -> Any:
    _profiling("irecv", profiling)
    return dist.irecv(tensor, src, group=group, tag=tag)


def batch_isend_irecv(p2p_op_list: list[Any], **profiling: Any) -> list[Any]:
    _profiling("batch_isend_irecv", profiling)
    return list(dist.batch_isend_irecv(p2p_op_list))
