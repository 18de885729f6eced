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
from stagewise.schedule.deepspeed import DataParallelSchedule, InferenceSchedule, TrainSchedule
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
    parse_instruction,
)

__all__ = [
    "BackwardInputPass",
    "BackwardPass",
    "BackwardWeightPass",
    "BufferOpInstruction",
    "DataParallelSchedule",
    "ForwardPass",
    "InferenceSchedule",
    "LoadMicroBatch",
    "OptimizerStep",
    "PipeInstruction",
    "PipeSchedule",
    "Position",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "ReduceTiedGrads",
    "ScheduleError",
    "ScheduleFactory",
    "SendActivation",
    "SendGrad",
    "Step",
    "Table",
    "TableLike",
    "TrainSchedule",
    "check_schedule",
    "check_table",
    "format_grid",
    "parse_instruction",
    "schedule_table",
]
