"""Timeline schedules laid out by slots: the step of each instruction, the order of kinds in a step.

DeepSpeed's schedules say *when* each pass and transfer runs (the step of every
micro-batch's forward, of its backward, ...) and in which order a step holds them.
:func:`assemble` turns that into a :class:`~stagewise.schedule.program.StageProgram`
without sorting: each (step, slot) cell holds at most one instruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stagewise.schedule.kinds import Kind
from stagewise.schedule.program import StageProgram

__all__ = ["Slot", "assemble"]


@dataclass(frozen=True)
class Slot:
    """One kind of instruction that a step holds at most once, at a fixed place.

    ``steps[i]`` is the step of the ``i``-th such instruction, acting on
    ``micro_batch[i]`` with ``buffer[i]`` and ``chunk`` (a number or one per
    instruction). Instructions without a buffer (``RTG``, ``OPT``) give only steps.
    """

    kind: Kind
    steps: Any
    micro_batch: Any = None
    buffer: Any = None
    chunk: Any = 0


def assemble(num_steps: int, slots: Sequence[Slot]) -> StageProgram:
    """A stage program from slots: in every step, the slots' instructions in slot order.

    A timeline schedule (DeepSpeed's) says *when* each instruction runs and in which
    order a step holds its kinds; this lays them out without sorting: each
    (step, slot) cell holds at most one instruction.

    Raises:
        ValueError: a slot puts two instructions in one step, or a step out of range.
    """
    columns = len(slots)
    occupied = np.zeros((num_steps, columns), bool)
    where = []
    for column, slot in enumerate(slots):
        steps = np.asarray(slot.steps, np.int64).reshape(-1)
        if steps.size and (steps.min() < 0 or steps.max() >= num_steps):
            raise ValueError(f"slot {slot.kind.name}: steps outside 0..{num_steps - 1}")
        occupied[steps, column] = True
        if int(np.count_nonzero(occupied[:, column])) != len(steps):
            raise ValueError(f"slot {slot.kind.name} puts two instructions in one step")
        where.append(steps)
    position = np.cumsum(occupied.reshape(-1)) - 1
    total = int(position[-1]) + 1 if position.size else 0
    kind = np.empty(total, np.int64)
    mb = np.full(total, -1, np.int64)
    chunk = np.full(total, -1, np.int64)
    buffer = np.full(total, -1, np.int64)
    for column, (slot, steps) in enumerate(zip(slots, where, strict=True)):
        rows = position[steps * columns + column]
        kind[rows] = slot.kind
        if slot.kind.is_buffer_op:
            mb[rows] = slot.micro_batch
            buffer[rows] = slot.buffer
            chunk[rows] = slot.chunk
    step = np.repeat(np.arange(num_steps, dtype=np.int64), occupied.sum(axis=1))
    return StageProgram.built(kind, mb, chunk, buffer, step, num_steps)
