"""The interpreter: one handler per instruction class, run in the schedule's order.

A schedule is data (steps of instructions); :class:`Interpreter` maps each
instruction's class to the one handler that executes it, ``handler(instr,
batch)``, and runs a batch's steps in order, recording each instruction's start
and end when asked. The schedule alone decides the order of work; nothing here
special-cases a schedule.

The table is open: :meth:`Interpreter.register` adds a handler for a new
instruction class (a subclass of :class:`~stagewise.schedule.PipeInstruction`)
or replaces or wraps a built-in one. A subclass of a registered class runs its
parent's handler unless it has its own.

When a handler fails, the error names the rank, the stage, the step and the
instruction, and shows the schedule's grid with that instruction marked
(:func:`~stagewise.schedule.check.format_grid`). stagewise's own errors keep
their class (a :class:`~stagewise.errors.PeerError` stays one); anything else
becomes an :class:`~stagewise.errors.InstructionError` whose ``original`` is
the exception raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stagewise.engine.state import BatchState
from stagewise.errors import InstructionError, PipelineError
from stagewise.schedule import PipeInstruction, Position, Table, format_grid
from stagewise.schedule.render import TimelineEvent

__all__ = ["Handler", "Interpreter"]

#: ``handler(instruction, batch)`` executes one instruction.
Handler = Callable[[Any, BatchState], None]


class Interpreter:
    """The dispatch table of one rank and the loop over a batch's steps.

    Args:
        handlers: instruction class -> handler.
        stage_id: this rank's stage (for timelines and errors).
        rank: this rank's global rank (for errors).
    """

    def __init__(
        self,
        handlers: Mapping[type[PipeInstruction], Handler],
        stage_id: int,
        rank: int,
    ) -> None:
        self._handlers: dict[type[PipeInstruction], Handler] = dict(handlers)
        self._resolved: dict[type[PipeInstruction], Handler] = {}
        self.stage_id = stage_id
        self.rank = rank

    # -- the table ------------------------------------------------------------------------
    @property
    def handlers(self) -> dict[type[PipeInstruction], Handler]:
        """A copy of the table: instruction class -> handler."""
        return dict(self._handlers)

    def register(self, cls: type[PipeInstruction], handler: Handler) -> Handler | None:
        """Run ``handler`` for instructions of ``cls`` (and its subclasses without their own).

        Returns the handler it replaces (None for a new class), so a caller can wrap it.

        Raises:
            TypeError: ``cls`` is not an instruction class or ``handler`` not callable.
        """
        if not (isinstance(cls, type) and issubclass(cls, PipeInstruction)):
            raise TypeError(
                f"register() needs a subclass of stagewise.schedule.PipeInstruction, got {cls!r}"
            )
        if not callable(handler):
            raise TypeError(f"the handler for {cls.__name__} must be callable, got {handler!r}")
        previous = self._handlers.get(cls)
        self._handlers[cls] = handler
        self._resolved.clear()
        return previous

    def handler_for(self, cls: type[PipeInstruction]) -> Handler:
        """The handler of ``cls``: its own, or that of its nearest registered base class.

        Raises:
            PipelineError: no handler for ``cls`` or any of its bases.
        """
        handler = self._resolved.get(cls)
        if handler is not None:
            return handler
        for base in cls.__mro__:
            found = self._handlers.get(base)
            if found is not None:
                self._resolved[cls] = found
                return found
        raise PipelineError(
            f"no handler for instruction class {cls.__name__}; the engine executes "
            f"{sorted(c.__name__ for c in self._handlers)}: register one with "
            "engine.register_instruction(cls, handler)"
        )

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        steps: Sequence[Sequence[PipeInstruction]],
        batch: BatchState,
        *,
        record: bool = False,
        schedule: str = "",
        table: Callable[[], Table] | None = None,
    ) -> list[TimelineEvent]:
        """Execute ``steps`` in order on ``batch``; the timeline when ``record``.

        ``schedule`` names the schedule and ``table`` builds every stage's steps, both
        only for the message of a failure.
        """
        events: list[TimelineEvent] = []
        start = time.perf_counter()
        resolved = self._resolved
        for index, step in enumerate(steps):
            for offset, instr in enumerate(step):
                handler = resolved.get(type(instr)) or self.handler_for(type(instr))
                try:
                    if record:
                        begin = time.perf_counter() - start
                        handler(instr, batch)
                        end = time.perf_counter() - start
                        events.append(
                            TimelineEvent(self.stage_id, repr(instr), begin, end, instr.kind)
                        )
                    else:
                        handler(instr, batch)
                except InstructionError:
                    raise
                except Exception as exc:
                    raise self._failure(exc, index, offset, instr, schedule, table) from exc
        return events

    def _failure(
        self,
        exc: Exception,
        step: int,
        offset: int,
        instr: PipeInstruction,
        schedule: str,
        table: Callable[[], Table] | None,
    ) -> Exception:
        where = f"stage {self.stage_id} (rank {self.rank}), step {step}"
        if schedule:
            where += f" of {schedule}"
        message = f"{where}: {instr!r} failed: {type(exc).__name__}: {exc}"
        if table is not None:
            try:
                grid = format_grid(table(), [Position(self.stage_id, step, offset)])
            except Exception as grid_error:  # the grid is a help, never a second failure
                grid = f"(no grid: {type(grid_error).__name__}: {grid_error})"
            message += f"\n\n{grid}"
        if isinstance(exc, PipelineError):
            try:
                return type(exc)(message)
            except TypeError:
                pass
        return InstructionError(message, original=exc)
