"""Every stage of a schedule as one :class:`~stagewise.schedule.program.Program`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from stagewise.schedule.placement import Placement
from stagewise.schedule.program import Program, StageProgram

__all__ = ["schedule_program"]


class _Buildable(Protocol):
    """What :func:`schedule_program` needs of a schedule object."""

    micro_batches: int

    @property
    def placement(self) -> Placement: ...

    def program(self) -> StageProgram: ...

    def num_pipe_buffers(self) -> int: ...


def schedule_program(
    schedule_cls: Callable[..., Any], micro_batches: int, stages: int, **kwargs: Any
) -> Program:
    """Every stage of a schedule as a :class:`Program`.

    ``schedule_cls(micro_batches, stages, stage_id, **kwargs)`` is built for each
    stage and asked for its ``program()``; schedules written as an order of passes
    share the work of all their stages (:meth:`~stagewise.schedule.order.PassOrderSchedule.programs_of`).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    schedules: list[_Buildable] = [
        schedule_cls(micro_batches, stages, stage_id, **kwargs) for stage_id in range(stages)
    ]
    first = schedules[0]
    shared = getattr(type(first), "programs_of", None)
    if shared is not None:
        programs = shared(schedules)
    else:
        programs = [schedule.program() for schedule in schedules]
    return Program(
        programs,
        first.placement,
        micro_batches,
        training=getattr(first, "training", None),
        replicated=bool(getattr(first, "replicated", False)),
        num_buffers=tuple(schedule.num_pipe_buffers() for schedule in schedules),
        name=type(first).__name__,
    )
