"""Schedules as arrays: the compact form that the checker and the simulator read.

A :class:`StageProgram` is one stage's instructions in program order as parallel
integer arrays: ``kind`` (a :class:`~stagewise.schedule.kinds.Kind` value),
``micro_batch``, ``chunk`` and ``buffer`` (``-1`` where an instruction has none)
and ``step`` (the step each instruction belongs to, non-decreasing). A
:class:`Program` holds every stage's, with the placement and sizes of the
schedule. 256 stages × 2048 micro-batches of 1F1B are three million instructions:
as arrays they are built, checked and simulated in about a second, where three
million instruction objects take seconds just to create.

The built-in schedules produce their arrays directly
(:meth:`~stagewise.schedule.base.PipeSchedule.program`) and make instruction
objects from them only when asked (``steps()``, which the engine runs); a schedule
that only yields steps is compiled from them, and a table of instructions converts
with :meth:`Program.from_table`. Instructions of kind ``CUSTOM`` have no array form
beyond their kind, so a program built from objects keeps the objects.

>>> from stagewise.schedule import TrainSchedule, schedule_program
>>> program = schedule_program(TrainSchedule, micro_batches=2, stages=2)
>>> program.stages[1].steps()
[[], [RA0, L0, F0], [B0], [SG0, RA1, L1, F1], [B1], [SG1, RTG, RDG, OPT]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from stagewise.schedule.instructions import BufferOpInstruction, PipeInstruction
from stagewise.schedule.kinds import Kind, kind_mask
from stagewise.schedule.materialise import LazySteps, materialise
from stagewise.schedule.placement import Placement

__all__ = ["NotAnInstruction", "Program", "StageProgram"]

#: integer arrays (a program stores kinds as int8 and the rest as int32).
Ints = npt.NDArray[np.signedinteger[Any]]
Bools = npt.NDArray[np.bool_]
_FIELDS = ("kind", "micro_batch", "chunk", "buffer", "step")
Step = list[PipeInstruction]

_NUM_KINDS = len(Kind)
_KIND_NAMES = [kind.name for kind in Kind]


class NotAnInstruction(TypeError):
    """A step holds something that is not a :class:`PipeInstruction`.

    Attributes:
        step, offset: where it is in the stage's steps.
        value: what it is.
    """

    def __init__(self, step: int, offset: int, value: object) -> None:
        self.step, self.offset, self.value = step, offset, value
        super().__init__(
            f"{value!r} at step {step} is a {type(value).__name__}, not an instruction: a "
            f"schedule's steps hold PipeInstruction values"
        )


def _int_array(values: Any, name: str) -> Ints:
    array: Ints = np.ascontiguousarray(values, dtype=np.int8 if name == "kind" else np.int32)
    if array.ndim != 1:
        raise ValueError(f"StageProgram.{name} must be one-dimensional, got shape {array.shape}")
    return array


class StageProgram:
    """One stage's instructions as arrays, in program order (see the module doc).

    Args:
        kind, micro_batch, chunk, buffer, step: one entry per instruction.
        num_steps: the stage's number of steps (empty steps included), more than
            the last ``step``.
        objects: the instruction objects, when the program was made from them (kept
            for their text and for ``CUSTOM`` instructions).

    Raises:
        ValueError: arrays of different lengths, kinds that are not
            :class:`~stagewise.schedule.kinds.Kind` values, or steps out of order.
    """

    __slots__ = (
        "_objects",
        "_step_starts",
        "buffer",
        "chunk",
        "kind",
        "micro_batch",
        "num_steps",
        "step",
    )

    def __init__(
        self,
        kind: Any,
        micro_batch: Any,
        chunk: Any,
        buffer: Any,
        step: Any,
        num_steps: int,
        objects: Sequence[PipeInstruction] | None = None,
    ) -> None:
        self.kind = _int_array(kind, "kind")
        self.micro_batch = _int_array(micro_batch, "micro_batch")
        self.chunk = _int_array(chunk, "chunk")
        self.buffer = _int_array(buffer, "buffer")
        self.step = _int_array(step, "step")
        self.num_steps = int(num_steps)
        n = len(self.kind)
        for name in ("micro_batch", "chunk", "buffer", "step"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"StageProgram.{name} has {len(getattr(self, name))} entries but kind "
                    f"has {n}: give one per instruction"
                )
        if n and (self.kind.min() < 0 or self.kind.max() >= _NUM_KINDS):
            bad = int(self.kind[(self.kind < 0) | (self.kind >= _NUM_KINDS)][0])
            raise ValueError(
                f"StageProgram.kind holds {bad}, which is no instruction kind: the kinds "
                f"are 0..{_NUM_KINDS - 1} ({', '.join(_KIND_NAMES)})"
            )
        if n and (
            self.step[0] < 0 or self.step[-1] >= self.num_steps or np.any(np.diff(self.step) < 0)
        ):
            raise ValueError(
                f"StageProgram.step must be non-decreasing within 0..{self.num_steps - 1} "
                f"(num_steps={self.num_steps})"
            )
        if objects is not None and len(objects) != n:
            raise ValueError(f"{len(objects)} objects for {n} instructions")
        self._objects = list(objects) if objects is not None else None
        self._step_starts: Ints | None = None
        if self._objects is None and np.any(self.kind == Kind.CUSTOM):
            raise ValueError(
                "a StageProgram with CUSTOM instructions needs their objects: build it "
                "with StageProgram.from_steps"
            )

    @classmethod
    def built(
        cls, kind: Ints, micro_batch: Ints, chunk: Ints, buffer: Ints, step: Ints, num_steps: int
    ) -> StageProgram:
        """A program from arrays a schedule builder made right (no checks, one cast each).

        For the built-in layouts (:func:`~stagewise.schedule.slots.assemble`, the
        pass-order rule), whose arrays are sound by construction; anything else goes
        through the checking constructor.
        """
        self = cls.__new__(cls)
        self.kind = kind.astype(np.int8, copy=False)
        self.micro_batch = micro_batch.astype(np.int32, copy=False)
        self.chunk = chunk.astype(np.int32, copy=False)
        self.buffer = buffer.astype(np.int32, copy=False)
        self.step = step.astype(np.int32, copy=False)
        self.num_steps = int(num_steps)
        self._objects = None
        self._step_starts = None
        return self

    @classmethod
    def from_steps(cls, steps: Iterable[Sequence[PipeInstruction]]) -> StageProgram:
        """Compile steps of instruction objects (one stage's) into arrays.

        Raises:
            NotAnInstruction: a step holds something that is not an instruction.
        """
        objects: list[PipeInstruction] = []
        lengths: list[int] = []
        for step in steps:
            objects.extend(step)
            lengths.append(len(step))
        kind_of: dict[type, int] = {}
        kinds = np.empty(len(objects), np.int64)
        mb = np.full(len(objects), -1, np.int64)
        chunk = np.full(len(objects), -1, np.int64)
        buffer = np.full(len(objects), -1, np.int64)
        buffered: list[int] = []
        for i, ins in enumerate(objects):
            cls_ = type(ins)
            kind = kind_of.get(cls_)
            if kind is None:
                if not isinstance(ins, PipeInstruction):
                    at = int(np.searchsorted(np.cumsum(lengths), i, side="right"))
                    raise NotAnInstruction(at, i - sum(lengths[:at]), ins)
                kind = kind_of[cls_] = int(ins.kind)
            kinds[i] = kind
            if kind != Kind.CUSTOM and isinstance(ins, BufferOpInstruction):
                buffered.append(i)
        if buffered:
            ops = cast(list[BufferOpInstruction], [objects[i] for i in buffered])
            rows = np.array(buffered, np.int64)
            mb[rows] = [ins.micro_batch_id for ins in ops]
            chunk[rows] = [ins.chunk_id for ins in ops]
            buffer[rows] = [ins.buffer_id for ins in ops]
        step_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        return cls(kinds, mb, chunk, buffer, step_of, len(lengths), objects)

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def step_starts(self) -> Ints:
        """Index of each step's first instruction (``num_steps + 1`` entries)."""
        if self._step_starts is None:
            counts = np.bincount(self.step, minlength=self.num_steps)
            self._step_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
        return self._step_starts

    def position(self, row: int) -> tuple[int, int]:
        """``(step, offset within the step)`` of instruction ``row``."""
        step = int(self.step[row])
        return step, int(row) - int(self.step_starts[step])

    def instructions(self) -> list[PipeInstruction]:
        """The instructions as objects, in program order."""
        if self._objects is not None:
            return list(self._objects)
        return materialise(self.kind, self.micro_batch, self.chunk, self.buffer)

    def instruction(self, row: int) -> PipeInstruction:
        """Instruction ``row`` as an object."""
        if self._objects is not None:
            return self._objects[int(row)]
        r = slice(int(row), int(row) + 1)
        return materialise(self.kind[r], self.micro_batch[r], self.chunk[r], self.buffer[r])[0]

    def text(self, row: int) -> str:
        """The text form of instruction ``row`` (``"F3c1"``)."""
        return repr(self.instruction(row))

    def steps(self) -> list[Step]:
        """The instructions as objects, one list per step."""
        flat = self.instructions()
        starts = self.step_starts.tolist()
        return [flat[a:b] for a, b in pairwise(starts)]

    def step_objects(self, step: int) -> Step:
        """The instructions of one step as objects."""
        a, b = int(self.step_starts[step]), int(self.step_starts[step + 1])
        if self._objects is not None:
            return self._objects[a:b]
        return materialise(self.kind[a:b], self.micro_batch[a:b], self.chunk[a:b], self.buffer[a:b])

    def __repr__(self) -> str:
        return f"StageProgram({len(self)} instructions in {self.num_steps} steps)"


@dataclass(eq=False)
class Program:
    """Every stage's :class:`StageProgram`, with the schedule's placement and sizes.

    Attributes:
        stages: one program per pipeline stage.
        placement: where each virtual stage lives.
        micro_batches: micro-batches per batch.
        training: whether the schedule trains (None: decided from its kinds).
        replicated: every stage holds the whole model (data parallelism).
        num_buffers: each stage's ``num_pipe_buffers()``, when known.
        name: the schedule's name, for messages.
    """

    stages: list[StageProgram]
    placement: Placement
    micro_batches: int
    training: bool | None = None
    replicated: bool = False
    num_buffers: tuple[int, ...] | None = None
    name: str = "schedule"
    #: derived structures (transfers, dependency graph), built once on first use.
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.stages) != self.placement.stages:
            raise ValueError(
                f"the program has {len(self.stages)} stages but its placement has "
                f"{self.placement.stages}: give one StageProgram per stage"
            )
        if self.num_buffers is not None:
            self.num_buffers = tuple(int(n) for n in self.num_buffers)
            if len(self.num_buffers) != len(self.stages):
                raise ValueError(
                    f"num_buffers has {len(self.num_buffers)} entries but the schedule has "
                    f"{len(self.stages)} stages: pass one per stage"
                )

    @classmethod
    def from_table(
        cls,
        table: Sequence[Sequence[Sequence[PipeInstruction]]],
        placement: Placement,
        micro_batches: int,
        **kwargs: Any,
    ) -> Program:
        """A program from a table ``table[stage][step]`` of instruction objects.

        Raises:
            NotAnInstruction: a step holds something else (with ``.stage`` set).
        """
        stages = []
        for stage, row in enumerate(table):
            try:
                stages.append(StageProgram.from_steps(row))
            except NotAnInstruction as error:
                error.stage = stage  # type: ignore[attr-defined]
                raise
        return cls(stages, placement, micro_batches, **kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def chunks(self) -> int:
        return self.placement.chunks

    def is_training(self) -> bool:
        """``training``, or whether any instruction belongs to training only."""
        if self.training is not None:
            return self.training
        backward = kind_mask("is_backward")
        return any(bool(backward[stage.kind].any()) for stage in self.stages)

    def table(self) -> list[list[Step]]:
        """Every stage's steps as instruction objects: ``table[stage][step]``."""
        return [stage.steps() for stage in self.stages]

    def grid(self) -> Sequence[Sequence[Step]]:
        """The table as a lazy view: steps become objects only where read (error grids)."""
        return [LazySteps(stage) for stage in self.stages]

    @cached_property
    def offsets(self) -> Ints:
        """Where each stage's instructions start in the concatenated arrays."""
        lengths = [len(stage) for stage in self.stages]
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])

    def concat(self, name: str) -> Ints:
        """One array of every stage's ``name`` (``kind``, ``chunk``, ...), stage by stage.

        The first call packs every field into one array each and makes the stages'
        arrays views of them, so the program is held once.
        """
        if name not in _FIELDS:
            raise ValueError(f"a program has no field {name!r}; it has {', '.join(_FIELDS)}")
        if "packed" not in self.cache:
            offsets = self.offsets.tolist()
            for field_name in _FIELDS:
                parts = [getattr(stage, field_name) for stage in self.stages]
                whole = np.concatenate(parts) if parts else np.zeros(0, np.int32)
                self.cache[f"concat:{field_name}"] = whole
                for stage, a, b in zip(self.stages, offsets[:-1], offsets[1:], strict=True):
                    setattr(stage, field_name, whole[a:b])
            self.cache["packed"] = True
        return cast(Ints, self.cache[f"concat:{name}"])

    @cached_property
    def stage_of_row(self) -> Ints:
        """The stage of each row of the concatenated arrays."""
        return np.repeat(np.arange(self.num_stages, dtype=np.int32), np.diff(self.offsets))
