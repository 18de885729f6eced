"""What one check works on: a program's arrays per stage, the placement, and reporting.

The checker reads a :class:`~stagewise.schedule.program.Program`: each stage's
instructions as integer arrays (kind, micro-batch, chunk, buffer per row), so that
every rule is a few array operations. The state also says how to report a row:
its position in the table and its text.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.schedule.check.grid import Position, ScheduleError
from stagewise.schedule.program import Bools, Ints, Program

__all__ = ["Bools", "CheckState", "Ints", "Role"]


@dataclass(frozen=True)
class Role:
    """What one chunk of one stage is in the model."""

    virtual: int
    first: bool
    last: bool
    next: tuple[int, int] | None  # (stage, chunk) of the next virtual stage
    prev: tuple[int, int] | None  # (stage, chunk) of the previous virtual stage


class CheckState:
    """A program under check: its sizes, the placement's roles, and error reporting."""

    def __init__(self, program: Program, training: bool | None = None) -> None:
        self.program = program
        self.stages = program.num_stages
        self.micro_batches = program.micro_batches
        self.chunks = program.chunks
        self.num_buffers = program.num_buffers
        self.replicated = program.replicated
        self.roles = self._roles()
        self.virtual_count = 1 if self.replicated else program.placement.num_virtual_stages
        self.kinds = [stage.kind for stage in program.stages]
        self.training = program.is_training() if training is None else bool(training)
        self._grid = program.grid()

    def _roles(self) -> list[list[Role]]:
        """Each (stage, chunk)'s virtual stage and neighbours, from the placement."""
        if self.replicated:
            whole = Role(virtual=0, first=True, last=True, next=None, prev=None)
            return [[whole] * self.chunks for _ in range(self.stages)]
        placement = self.program.placement
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

    # -- reporting ------------------------------------------------------------------
    def pos(self, stage: int, row: int) -> Position:
        """The position of instruction ``row`` of ``stage``."""
        return Position(stage, *self.program.stages[stage].position(int(row)))

    def where(self, stage: int, row: int) -> str:
        """``F3 at step 5`` for instruction ``row`` of ``stage``."""
        return f"{self.program.stages[stage].text(int(row))} at step {self.pos(stage, row).step}"

    def fail(self, problem: str, *marks: tuple[int, int]) -> ScheduleError:
        """An error marking ``(stage, row)`` pairs in the grid."""
        return ScheduleError(problem, self._grid, [self.pos(s, int(r)) for s, r in marks])
