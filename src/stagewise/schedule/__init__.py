"""Schedules as data: instructions, the schedules that order them, and their checker.

A schedule yields, for one stage, a list of instructions per step
(:class:`PipeSchedule`), or the same as arrays (:class:`StageProgram`; a
:class:`Program` holds every stage's). :func:`check_schedule` /
:func:`check_program` prove a schedule sound over all its stages without any
processes, and :func:`simulate` times it under a cost model.
"""

from __future__ import annotations

from stagewise.schedule.base import PipeSchedule, Step
from stagewise.schedule.build import schedule_program
from stagewise.schedule.check import (
    Position,
    ScheduleError,
    ScheduleFactory,
    Table,
    TableLike,
    check_program,
    check_schedule,
    check_table,
    format_grid,
    schedule_table,
)
from stagewise.schedule.chunked_inference import ChunkedInferenceSchedule
from stagewise.schedule.deepspeed import DataParallelSchedule, InferenceSchedule, TrainSchedule
from stagewise.schedule.dualpipe import DualPipeVSchedule
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
from stagewise.schedule.program import Program, StageProgram
from stagewise.schedule.registry import (
    get_schedule_class,
    make_schedule,
    schedule_factory,
    schedule_layout,
    schedule_names,
)
from stagewise.schedule.simulate import ActivationMemory, Costs, SimResult, simulate
from stagewise.schedule.zero_bubble import ZBVSchedule, ZeroBubbleH1Schedule, ZeroBubbleH2Schedule

__all__ = [
    "ActivationMemory",
    "BackwardInputPass",
    "BackwardPass",
    "BackwardWeightPass",
    "BufferOpInstruction",
    "ChunkedInferenceSchedule",
    "Costs",
    "DataParallelSchedule",
    "DualPipeVSchedule",
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
    "Program",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "ReduceTiedGrads",
    "ScheduleError",
    "ScheduleFactory",
    "SendActivation",
    "SendGrad",
    "SimResult",
    "StageProgram",
    "Step",
    "Table",
    "TableLike",
    "TrainSchedule",
    "ZBVSchedule",
    "ZeroBubbleH1Schedule",
    "ZeroBubbleH2Schedule",
    "check_program",
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
    "schedule_program",
    "schedule_table",
    "simulate",
]
