"""Building the engine's parts from a module and a config.

:func:`build_parts` makes, in order: the schedule and its check against the
module's chunks, the optimizer, scheduler and loss scaler, the transfer links
(one process group per direction of each link, created collectively), the
stage executor, the gradient reducer, the optimizer stepper and the result
sharing; :func:`handler_table` joins them into the interpreter's dispatch table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagewise.backward.linear import WeightGradStore, route_linear_weight_grads
from stagewise.checkpoint import TrainingCounters
from stagewise.collectives import Collectives
from stagewise.config import Config
from stagewise.engine.grad_step import GradientReducer
from stagewise.engine.interpreter import Handler
from stagewise.engine.optim import (
    LossScaler,
    Stepper,
    build_lr_scheduler_for,
    optimizer_from_config,
)
from stagewise.engine.results import Results
from stagewise.engine.stage_exec import StageExecutor
from stagewise.engine.state import BatchState
from stagewise.engine.transfer import Links, Transfers
from stagewise.engine.zero import ZeroOptimizer, build_zero
from stagewise.errors import ConfigError
from stagewise.grid import PipelineParallelGrid
from stagewise.module import PipelineModule
from stagewise.schedule import (
    BackwardInputPass,
    BackwardPass,
    BackwardWeightPass,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)
from stagewise.schedule.check import ScheduleFactory
from stagewise.schedule.placement import Placement
from stagewise.schedule.routes import ChunkRoutes, stage_routes

__all__ = ["EngineParts", "build_parts", "handler_table", "link_groups"]


@dataclass
class EngineParts:
    """The parts a :class:`~stagewise.engine.PipelineEngine` holds."""

    schedule_factory: ScheduleFactory
    layout: PipeSchedule  # this stage's schedule of one batch: its chunk placement
    routes: list[ChunkRoutes]
    optimizer: Any
    lr_scheduler: Any
    loss_scaler: LossScaler | None
    counters: TrainingCounters
    collectives: Collectives
    transfers: Transfers
    executor: StageExecutor
    reducer: GradientReducer
    stepper: Stepper
    results: Results
    weight_store: WeightGradStore
    zero: ZeroOptimizer | None = None  # ZeRO-1's sharding of ``optimizer`` (stage 1)


def _check_layout(wanted: Placement, module: PipelineModule, name: str) -> None:
    """The module's chunks must be placed where the schedule runs them (one value: both
    are a :class:`~stagewise.schedule.placement.Placement`)."""
    if wanted != module.placement:
        raise ConfigError(
            f"pipeline.schedule={name!r} runs {wanted.chunks} model chunk(s) per stage placed "
            f"{wanted.kind.value!r}, but the PipelineModule holds {module.placement.chunks} "
            f"placed {module.placement.kind.value!r}; build it with PipelineModule(..., "
            f"virtual_stages={wanted.chunks}, placement={wanted.kind.value!r})"
        )


def link_groups(grid: PipelineParallelGrid, layout: PipeSchedule) -> dict[tuple[int, int], Any]:
    """One process group per direction of each link between two ranks of a pipeline.

    Every rank creates every group, in the same order (torch.distributed's rule);
    each keeps those it belongs to, keyed ``(source rank, destination rank)``.
    """
    pairs: set[tuple[int, int]] = set()
    for stage in range(layout.stages):
        for routes in stage_routes(layout, stage):
            for channel in (routes.send_activation, routes.send_grad):
                if channel is not None and channel.peer != stage:
                    pairs.add((stage, channel.peer))
    me = dist.get_rank()
    groups: dict[tuple[int, int], Any] = {}
    for pipeline in grid.topology().get_axis_comm_lists("pipe") or [[me]]:
        for src_stage, dst_stage in sorted(pairs):
            src, dst = pipeline[src_stage], pipeline[dst_stage]
            group = dist.new_group(ranks=[src, dst])
            if me in (src, dst):
                groups[src, dst] = group
    return groups


def _autocast(config: Config, device: torch.device) -> Callable[[], Any]:
    if config.bf16_enabled:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if config.fp16.enabled and config.fp16.auto_cast:
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext


def _check_partitioned(config: Config, grid: PipelineParallelGrid) -> None:
    """DeepSpeed's partitioned transfers between tensor-parallel stages are not done here."""
    if grid.get_slice_parallel_world_size() == 1:
        return  # no effect without tensor parallelism, in DeepSpeed too
    for key in ("pipe_partitioned", "grad_partitioned"):
        if getattr(config.pipeline, key):
            raise ConfigError(
                f"pipeline.{key}=true: stagewise sends activations and gradients whole between "
                "stages (each tensor-parallel slice its own copy); it does not split them over "
                f"the {grid.get_slice_parallel_world_size()} slices as DeepSpeed does. The "
                f"results are the same: remove pipeline.{key} or set it to false"
            )


def _splits_backward(probe: PipeSchedule) -> bool:
    return any(isinstance(i, BackwardInputPass) for step in probe.steps() for i in step)


def build_parts(
    module: PipelineModule,
    config: Config,
    grid: PipelineParallelGrid,
    device: torch.device,
    micro_batches: int,
    optimizer: Any,
    model_parameters: Any,
    lr_scheduler: Any,
    describe: Callable[[int], str],
) -> EngineParts:
    """Every part of an engine, checked against each other (see the module doc)."""
    stage_id = grid.get_stage_id()
    stages = grid.get_pipe_parallel_world_size()
    pipe = config.pipeline
    choice = pipe.choice  # checked when the config was read
    factory = choice.factory()
    _check_layout(choice.layout(stages), module, choice.name)
    layout = factory(micro_batches, stages, stage_id)

    if optimizer is None and config.optimizer is not None:
        params = model_parameters if model_parameters is not None else module.parameters()
        optimizer = optimizer_from_config(config.optimizer.type, config.optimizer.params, params)
    lr_scheduler = build_lr_scheduler_for(config, optimizer, lr_scheduler)
    loss_scaler = LossScaler(config.fp16) if config.fp16.enabled else None
    counters = TrainingCounters()
    collectives = Collectives(pipe.timeout_s, describe(grid.get_global_rank()))
    _check_partitioned(config, grid)
    zero = build_zero(config.zero, optimizer, grid, collectives)

    routes = stage_routes(layout)
    links = Links(
        grid.get_global_rank(),
        device,
        pipe.timeout_s,
        link_groups(grid, layout),
        pipe.p2p_match,
        describe,
    )
    transfers = Transfers(links, routes, grid.stage_to_global)

    # Schedules that split the backward defer linear layers' weight gradients to W (fp32:
    # under autocast the routed layers fall back to torch's own backward, whole, in I).
    weight_store = WeightGradStore()
    weight_store.enabled = _splits_backward(layout) and not (
        config.bf16_enabled or config.fp16.enabled
    )
    if weight_store.enabled:
        route_linear_weight_grads(module, weight_store)
    linear_weights = [
        m.weight for m in module.modules() if type(m) is nn.Linear and m.weight.requires_grad
    ]
    executor = StageExecutor(
        module,
        routes,
        device,
        _autocast(config, device),
        (lambda: loss_scaler.scale) if loss_scaler is not None else (lambda: 1.0),
        weight_store,
        splits_backward=_splits_backward(layout),
    )
    bucket = config.zero.reduce_bucket_size if zero is not None else None
    reducer = GradientReducer(module, grid, collectives, device, bucket)
    stepper = Stepper(
        zero if zero is not None else optimizer,
        lr_scheduler,
        loss_scaler,
        reducer,
        config.gradient_clipping,
        counters,
        collectives,
        device,
        weight_store,
        linear_weights,
    )
    last = stages * module.num_chunks - 1
    loss_stage, _ = layout.locate(last)
    results = Results(
        grid, collectives, device, grid.stage_to_global(loss_stage), any(r.last for r in routes)
    )
    return EngineParts(
        schedule_factory=factory,
        layout=layout,
        routes=routes,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        loss_scaler=loss_scaler,
        counters=counters,
        collectives=collectives,
        transfers=transfers,
        executor=executor,
        reducer=reducer,
        stepper=stepper,
        results=results,
        weight_store=weight_store,
        zero=zero,
    )


def handler_table(parts: EngineParts) -> dict[type[PipeInstruction], Handler]:
    """The dispatch table: one handler per built-in instruction class."""
    executor, transfers = parts.executor, parts.transfers

    def send_activation(instr: Any, batch: BatchState) -> None:
        output = batch.outputs[instr.chunk_id, instr.buffer_id]
        transfers.send_activation(instr, output if isinstance(output, tuple) else (output,))

    def recv_activation(instr: Any, batch: BatchState) -> None:
        executor.accept_input(instr, batch, transfers.recv_activation(instr))

    def send_grad(instr: Any, batch: BatchState) -> None:
        transfers.send_grads(instr, batch.input_grads.pop((instr.chunk_id, instr.buffer_id)))

    def recv_grad(instr: Any, batch: BatchState) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        batch.output_grads[key] = transfers.recv_grads(instr, batch.outputs[key])

    return {
        LoadMicroBatch: executor.load,
        ForwardPass: executor.forward,
        BackwardPass: executor.backward,
        BackwardInputPass: executor.backward_input,
        BackwardWeightPass: executor.backward_weight,
        SendActivation: send_activation,
        RecvActivation: recv_activation,
        SendGrad: send_grad,
        RecvGrad: recv_grad,
        ReduceTiedGrads: parts.reducer.reduce_tied,
        ReduceGrads: parts.reducer.reduce_data_parallel,
        OptimizerStep: parts.stepper.step,
    }
