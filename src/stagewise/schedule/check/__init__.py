"""Check a schedule over all its stages, without processes.

A schedule is checked as a *table*: ``table[stage][step]`` is the list of
instructions that stage runs in that step (:func:`schedule_table` builds it). The
checker proves, stage by stage (:mod:`.rules`) and then across stages
(:mod:`.matching`), and raises :class:`ScheduleError` at the first problem it finds,
with the stage × step grid of instruction reprs and the offending instructions
marked ``>>SA3<<`` (:mod:`.grid`):

1. *Order on each stage.* Every micro-batch passes through every virtual stage
   (model chunk) forward once and, when training, backward once: a ``B``, or an
   ``I`` then a ``W`` for a split backward, after its ``F``. An activation is
   received (``RA``) before the forward that uses it and sent (``SA``) after the
   forward that makes it; a gradient is received (``RG``) before the backward that
   uses it and sent (``SG``) after the backward that makes it; the first and the
   last virtual stage load (``L``) the micro-batch before its forward, and no other
   stage loads. Micro-batch, chunk and buffer ids are in range.
2. *Reductions.* When training, ``RDG`` and ``OPT`` come exactly once and
   ``RTG`` at most once on every stage, after all compute, ``OPT`` last; inference
   has none of them.
3. *Buffers.* A buffer (per stage and chunk) holds one micro-batch from its first
   use to its last; no other micro-batch touches it in between.
4. *Matching.* Between two stages, the k-th send is met by the k-th receive, for
   the same micro-batch, kind (activation or gradient) and virtual stage:
   activations go from virtual stage ``v`` to ``v + 1``, gradients to ``v - 1``,
   placed by the schedule's :attr:`~stagewise.schedule.base.PipeSchedule.placement`.
5. *No deadlock.* Run every stage's instructions in order, with sends buffered and
   receives blocking until the matching send was issued; ``RTG`` and ``OPT`` are
   collectives over all stages (tied weights, global-norm clipping) and wait until
   every stage reaches them. Every stage must reach its end.

Instructions of kind ``CUSTOM`` (your own) are passed over by every rule.

The checker reads a schedule as arrays (:mod:`~stagewise.schedule.program`):
:func:`check_program` checks a :class:`~stagewise.schedule.program.Program`
(:func:`~stagewise.schedule.build.schedule_program` builds one from a schedule
class), :func:`check_table` a table of instruction objects. Every rule is a few
array operations per stage or over all stages at once, so 256 stages × 2048
micro-batches of 1F1B (three million instructions) are checked in about a second.

>>> from stagewise.schedule import InferenceSchedule
>>> table = check_schedule(InferenceSchedule, micro_batches=2, stages=2)
>>> print(format_grid(table))
step    | 0     | 1         | 2
stage 0 | L0 F0 | L1 SA0 F1 | SA1
stage 1 | .     | L0 RA0 F0 | L1 RA1 F1
"""

from __future__ import annotations

from collections.abc import Sequence

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.build import schedule_program
from stagewise.schedule.check.grid import (
    Position,
    ScheduleError,
    ScheduleFactory,
    Table,
    TableLike,
    format_grid,
    schedule_table,
)
from stagewise.schedule.check.matching import check_deadlock, check_matching
from stagewise.schedule.check.rules import check_stage
from stagewise.schedule.check.state import CheckState
from stagewise.schedule.program import NotAnInstruction, Program

__all__ = [
    "Position",
    "ScheduleError",
    "ScheduleFactory",
    "Table",
    "TableLike",
    "check_program",
    "check_schedule",
    "check_table",
    "format_grid",
    "schedule_table",
]


def check_schedule(
    schedule_cls: ScheduleFactory,
    micro_batches: int,
    stages: int,
    *,
    training: bool | None = None,
    **kwargs: object,
) -> Table:
    """Build every stage of a schedule, check it (:func:`check_program`), return the table.

    Args:
        schedule_cls: the schedule class or factory, called as
            ``schedule_cls(micro_batches, stages, stage_id, **kwargs)``.
        micro_batches: micro-batches per batch.
        stages: pipeline stages.
        training: check the backward rules too; by default the schedule's own
            ``training`` attribute, else whether it has any backward instruction.
        **kwargs: passed on to ``schedule_cls``.

    Raises:
        ScheduleError: the schedule breaks a rule; the message says which and shows
            the grid.
    """
    program = schedule_program(schedule_cls, micro_batches, stages, **kwargs)
    check_program(program, training=training)
    return program.table()


def check_program(program: Program, *, training: bool | None = None) -> None:
    """Check every stage of a program (the rules in the module doc).

    Args:
        program: the schedule as arrays, with its placement and sizes.
        training: overrides the program's ``training``; when neither says, a
            program with any backward instruction is a training one.

    Raises:
        ScheduleError: the first broken rule, with the grid.
    """
    state = CheckState(program, training)
    for stage in range(state.stages):
        check_stage(state, stage)
    check_matching(state)
    check_deadlock(state)


def check_table(
    table: TableLike,
    schedule: PipeSchedule,
    *,
    training: bool | None = None,
    num_buffers: Sequence[int] | None = None,
) -> None:
    """Check the steps of every stage of one schedule (the rules in the module doc).

    Args:
        table: ``table[stage][step]``, the instructions of each stage and step.
        schedule: any stage's schedule object; it gives the sizes
            (``micro_batches``, ``stages``), the placement of chunks
            (``placement``), whether it trains (``training``) and whether every
            stage holds the whole model (``replicated``, as in data parallelism).
        training: overrides the schedule's ``training`` attribute; when neither
            says, a table with any backward instruction is a training one.
        num_buffers: each stage's ``num_pipe_buffers()``; buffer ids must stay
            below it. Not checked when omitted.

    Raises:
        ScheduleError: the first broken rule, with the grid.
        ValueError: the table does not fit the schedule's sizes.
    """
    if len(table) != schedule.stages:
        raise ValueError(
            f"the table has {len(table)} stages but the schedule has "
            f"{schedule.stages}: pass one list of steps per stage"
        )
    try:
        program = Program.from_table(
            table,
            schedule.placement,
            schedule.micro_batches,
            training=getattr(schedule, "training", None),
            replicated=bool(getattr(schedule, "replicated", False)),
            num_buffers=None if num_buffers is None else tuple(num_buffers),
            name=type(schedule).__name__,
        )
    except NotAnInstruction as error:
        stage = getattr(error, "stage", 0)
        raise ScheduleError(
            f"stage {stage}: {error}", table, [Position(stage, error.step, error.offset)]
        ) from None
    check_program(program, training=training)
