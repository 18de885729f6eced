"""Tables of instructions, how they are drawn, and the error that shows one.

A schedule is checked as a *table*: ``table[stage][step]`` is the list of
instructions that stage runs in that step (:func:`schedule_table` builds it). A
:class:`ScheduleError` carries the stage × step grid of instruction reprs with the
offending instructions marked ``>>SA3<<`` (:func:`format_grid`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from stagewise.schedule.base import PipeSchedule, Step, gc_paused
from stagewise.schedule.instructions import PipeInstruction

__all__ = [
    "Position",
    "ScheduleError",
    "ScheduleFactory",
    "Table",
    "TableLike",
    "format_grid",
    "schedule_table",
]

#: ``table[stage][step]``: the instructions each stage runs in each step.
Table = list[list[Step]]
#: Any nesting of sequences where ``table[stage][step][offset]`` is an instruction.
TableLike = Sequence[Sequence[Sequence[PipeInstruction]]]
#: A schedule class, or any callable ``(micro_batches, stages, stage_id, **kwargs)``.
ScheduleFactory = Callable[..., PipeSchedule]


class Position(NamedTuple):
    """Where an instruction sits in a table: ``table[stage][step][offset]``."""

    stage: int
    step: int
    offset: int  # within the step


class ScheduleError(ValueError):
    """A schedule breaks a rule; the message shows the grid with the culprits marked.

    Attributes:
        problem: what is wrong, without the grid.
        positions: the marked instructions.
    """

    def __init__(self, problem: str, table: TableLike, marks: Iterable[Position] = ()) -> None:
        self.problem = problem
        self.positions = tuple(marks)
        super().__init__(f"{problem}\n\n{format_grid(table, self.positions)}")

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by value (errors cross process boundaries in distributed tests)."""
        return _restore_error, (str(self), self.problem, self.positions)


def _restore_error(message: str, problem: str, positions: tuple[Position, ...]) -> ScheduleError:
    """Rebuild a pickled :class:`ScheduleError` without its table."""
    error = ScheduleError.__new__(ScheduleError)
    ValueError.__init__(error, message)
    error.problem = problem
    error.positions = positions
    return error


# -- building and drawing tables ------------------------------------------------------
def schedule_table(
    schedule_cls: ScheduleFactory, micro_batches: int, stages: int, **kwargs: object
) -> Table:
    """Every stage's steps: ``schedule_cls(micro_batches, stages, stage_id, **kwargs)``.

    >>> from stagewise.schedule import TrainSchedule
    >>> schedule_table(TrainSchedule, 1, 1)
    [[[L0, F0], [B0, RTG, RDG, OPT]]]
    """
    with gc_paused():
        return [
            [list(step) for step in schedule_cls(micro_batches, stages, stage_id, **kwargs).steps()]
            for stage_id in range(stages)
        ]


def format_grid(
    table: TableLike,
    marks: Iterable[Position] = (),
    *,
    max_steps: int = 32,
    max_stages: int = 16,
) -> str:
    """Draw a table as a stage × step grid, marking instructions as ``>>SA3<<``.

    A cell lists a step's instructions by their reprs (``.`` for an empty step). A
    table wider than ``max_steps`` steps or taller than ``max_stages`` stages is cut
    to a window around the marks, and a last line says what was left out.
    """
    marks = tuple(marks)
    num_stages = len(table)
    num_steps = max((len(row) for row in table), default=0)
    marked = {(m.stage, m.step, m.offset) for m in marks}

    rows = list(range(num_stages))
    if num_stages > max_stages:
        focus = sorted({m.stage for m in marks if 0 <= m.stage < num_stages}) or [0]
        wanted: set[int] = set()
        for stage in focus:
            wanted.update(s for s in (stage - 1, stage, stage + 1) if 0 <= s < num_stages)
        rows = sorted(wanted)[:max_stages]
    first_step, last_step = 0, num_steps
    if num_steps > max_steps:
        steps = sorted(m.step for m in marks) or [0]
        lo, hi = steps[0], steps[-1]
        start = lo - (max_steps - (hi - lo + 1)) // 2 if hi - lo < max_steps else lo - 2
        first_step = max(0, min(start, num_steps - max_steps))
        last_step = first_step + max_steps

    def cell(stage: int, step: int) -> str:
        row = table[stage]
        if step >= len(row) or not row[step]:
            return "."
        return " ".join(
            f">>{ins!r}<<" if (stage, step, i) in marked else repr(ins)
            for i, ins in enumerate(row[step])
        )

    columns = range(first_step, last_step)
    lines: list[list[str]] = [["step", *(str(step) for step in columns)]]
    previous = -1
    for stage in rows:
        if previous >= 0 and stage != previous + 1:
            lines.append(["...", *("" for _ in columns)])
        lines.append([f"stage {stage}", *(cell(stage, step) for step in columns)])
        previous = stage
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    text = [
        " | ".join(field.ljust(width) for field, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    if len(rows) < num_stages or last_step - first_step < num_steps:
        text.append(
            f"(showing steps {first_step}..{last_step - 1} of {num_steps} and "
            f"{len(rows)} of {num_stages} stages)"
        )
    return "\n".join(text)
