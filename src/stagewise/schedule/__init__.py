"""Schedules as data: instructions, the schedules that order them, and their checker.

A schedule yields, for one stage, a list of instructions per step
(:class:`PipeSchedule`). :func:`check_schedule` proves a schedule sound over all
its stages without any processes.
"""

from __future__ import annotations

from stagewise.schedule.base import PipeSchedule, Step
from stagewise.schedule.check import (
    Position,
    ScheduleError,
    ScheduleFactory,
    Table,
    TableLike,
    check_schedule,
    check_table,
    format_grid,
    schedule_table,
)
from stagewise.schedule.chunked_inference import ChunkedInferenceSchedule
from stagewise.schedule.deepspeed import DataParallelSchedule, InferenceSchedule, TrainSchedule
from stagewise.schedule.gpipe import GPipeSchedule
from stagewise.schedule.instructions import (
    BackwardInputPass,
    BackwardPass,
    BackwardWeightPass,
    BufferOpInstruction,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    instruction_class,
    parse_instruction,
)
from stagewise.schedule.interleaved import InterleavedSchedule
from stagewise.schedule.kinds import Kind
from stagewise.schedule.order import Pass, PassOrderSchedule
from stagewise.schedule.placement import Placement, PlacementKind
from stagewise.schedule.registry import (
    get_schedule_class,
    make_schedule,
    schedule_factory,
    schedule_layout,
    schedule_names,
)
from stagewise.schedule.simulate import Costs, SimResult, simulate
from stagewise.schedule.zero_bubble import ZBVSchedule, ZeroBubbleH1Schedule

__all__ = [
    "BackwardInputPass",
    "BackwardPass",
    "BackwardWeightPass",
    "BufferOpInstruction",
    "ChunkedInferenceSchedule",
    "Costs",
    "DataParallelSchedule",
    "ForwardPass",
    "GPipeSchedule",
    "InferenceSchedule",
    "InterleavedSchedule",
    "Kind",
    "LoadMicroBatch",
    "OptimizerStep",
    "Pass",
    "PassOrderSchedule",
    "PipeInstruction",
    "PipeSchedule",
    "Placement",
    "PlacementKind",
    "Position",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "ReduceTiedGrads",
    "ScheduleError",
    "ScheduleFactory",
    "SendActivation",
    "SendGrad",
    "SimResult",
    "Step",
    "Table",
    "TableLike",
    "TrainSchedule",
    "ZBVSchedule",
    "ZeroBubbleH1Schedule",
    "check_schedule",
    "check_table",
    "format_grid",
    "get_schedule_class",
    "instruction_class",
    "make_schedule",
    "parse_instruction",
    "schedule_factory",
    "schedule_layout",
    "schedule_names",
    "schedule_table",
    "simulate",
]
