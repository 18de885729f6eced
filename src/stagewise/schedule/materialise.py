"""Instruction objects from a program's arrays: all of them, or only those looked at.

The checker and the simulator read arrays; objects are made for the engine (one
stage's ``steps()``), for tests and for error grids, where :class:`LazySteps` makes
only the steps a window of the grid shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from stagewise.schedule.instructions import PipeInstruction, instruction_class
from stagewise.schedule.kinds import Kind, kind_mask

__all__ = ["LazySteps", "materialise"]

Step = list[PipeInstruction]
_Ints = npt.NDArray[np.signedinteger[Any]]


class _HasSteps(Protocol):
    """What :class:`LazySteps` reads of a stage program."""

    num_steps: int

    def step_objects(self, step: int) -> Step: ...


_SINGLETONS: dict[int, PipeInstruction] = {}


def materialise(kind: _Ints, mb: _Ints, chunk: _Ints, buffer: _Ints) -> list[PipeInstruction]:
    """Instruction objects from arrays (no CUSTOM rows)."""
    classes: list[Any] = [None if k == Kind.CUSTOM else instruction_class(k) for k in Kind]
    buffered = kind_mask("is_buffer_op")
    out: list[PipeInstruction] = []
    append = out.append
    for k, m, c, b in zip(kind.tolist(), mb.tolist(), chunk.tolist(), buffer.tolist(), strict=True):
        if buffered[k]:
            append(classes[k](b, m, c))
        else:
            single = _SINGLETONS.get(k)
            if single is None:
                single = _SINGLETONS[k] = classes[k]()
            append(single)
    return out


class LazySteps(Sequence[Step]):
    """One stage's steps, made into objects only where looked at (error grids)."""

    def __init__(self, program: _HasSteps) -> None:
        self._program = program

    def __len__(self) -> int:
        return self._program.num_steps

    def __getitem__(self, step: Any) -> Any:
        if isinstance(step, slice):
            return [self[i] for i in range(*step.indices(len(self)))]
        if step < 0:
            step += len(self)
        return self._program.step_objects(step)
