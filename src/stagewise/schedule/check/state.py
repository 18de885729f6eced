"""What one check works on: the table as integer arrays per stage, and the placement.

Each stage's instructions become integer arrays once (kind, micro-batch, chunk,
buffer per row), so that every rule is a few array operations. The state also
says how to report a row: its position in the table and its text.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Any

import numpy as np
import numpy.typing as npt

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.check.grid import Position, ScheduleError, TableLike
from stagewise.schedule.instructions import PipeInstruction
from stagewise.schedule.kinds import Kind

__all__ = ["Bools", "CheckState", "Ints", "Role"]

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Role:
    """What one chunk of one stage is in the model."""

    virtual: int
    first: bool
    last: bool
    next: tuple[int, int] | None  # (stage, chunk) of the next virtual stage
    prev: tuple[int, int] | None  # (stage, chunk) of the previous virtual stage


class CheckState:
    """The table flattened per stage, the placement's roles, and error reporting."""

    def __init__(
        self,
        table: TableLike,
        schedule: PipeSchedule,
        training: bool | None,
        num_buffers: Sequence[int] | None,
    ) -> None:
        self.stages = schedule.stages
        self.micro_batches = schedule.micro_batches
        self.chunks = schedule.num_chunks
        if len(table) != self.stages:
            raise ValueError(
                f"the table has {len(table)} stages but the schedule has "
                f"{self.stages}: pass one list of steps per stage"
            )
        if num_buffers is not None and len(num_buffers) != self.stages:
            raise ValueError(
                f"num_buffers has {len(num_buffers)} entries but the schedule has "
                f"{self.stages} stages: pass one per stage"
            )
        self.grid = table
        self.num_buffers = num_buffers
        self.flat: list[list[Any]] = [list(chain.from_iterable(row)) for row in table]
        self.starts = [list(accumulate(map(len, row), initial=0)) for row in table]
        self.replicated = bool(getattr(schedule, "replicated", False))
        self.roles = self._roles(schedule)
        self.virtual_count = 1 if self.replicated else schedule.num_virtual_stages
        self.kinds = [self._kinds(stage) for stage in range(self.stages)]
        if training is None:
            training = getattr(schedule, "training", None)
        if training is None:
            backward = np.flatnonzero([kind.is_backward for kind in Kind])
            training = any(np.isin(kinds, backward).any() for kinds in self.kinds)
        self.training = bool(training)

    def _roles(self, schedule: PipeSchedule) -> list[list[Role]]:
        """Each (stage, chunk)'s virtual stage and neighbours, from the placement."""
        if self.replicated:
            whole = Role(virtual=0, first=True, last=True, next=None, prev=None)
            return [[whole] * self.chunks for _ in range(self.stages)]
        placement = schedule.placement
        return [
            [
                Role(
                    virtual=placement.virtual_stage(stage, chunk),
                    first=placement.is_first(stage, chunk),
                    last=placement.is_last(stage, chunk),
                    next=placement.next(stage, chunk),
                    prev=placement.prev(stage, chunk),
                )
                for chunk in range(self.chunks)
            ]
            for stage in range(self.stages)
        ]

    def _kinds(self, stage: int) -> Ints:
        """The kind of every instruction of ``stage``; a non-instruction fails."""
        types = list(map(type, self.flat[stage]))
        kind_of: dict[type, int] = {}
        for cls in set(types):
            if not (isinstance(cls, type) and issubclass(cls, PipeInstruction)):
                row = types.index(cls)
                raise self.fail(
                    f"stage {stage}: {self.where(stage, row)} is a {cls.__name__}, not an "
                    f"instruction: a table holds PipeInstruction values",
                    (stage, row),
                )
            kind_of[cls] = int(cls.kind)
        return np.fromiter(map(kind_of.__getitem__, types), np.int64, len(types))

    # -- reporting ------------------------------------------------------------------
    def pos(self, stage: int, row: int) -> Position:
        """The position of instruction ``row`` of ``stage``'s flat list."""
        step = bisect_right(self.starts[stage], row) - 1
        return Position(stage, step, row - self.starts[stage][step])

    def where(self, stage: int, row: int) -> str:
        """``F3 at step 5`` for instruction ``row`` of ``stage``."""
        return f"{self.flat[stage][int(row)]!r} at step {self.pos(stage, int(row)).step}"

    def fail(self, problem: str, *marks: tuple[int, int]) -> ScheduleError:
        """An error marking ``(stage, row)`` pairs in the grid."""
        return ScheduleError(problem, self.grid, [self.pos(s, int(r)) for s, r in marks])
