"""The schedule base class: how a schedule names stages, chunks and buffers.

A schedule is pure data: ``steps()`` yields, for one stage, a list of
instructions per step, and ``program()`` gives the same as arrays (a
:class:`~stagewise.schedule.program.StageProgram`, what the checker and the
simulator read). A schedule implements either; the other follows. Iterating the
schedule object itself yields the steps (as DeepSpeed's ``PipeSchedule`` does).

Model chunks. A schedule may place several chunks of the model on each stage
(interleaved and V-shaped schedules). The layers are cut into
``stages * num_chunks`` *virtual stages*, laid out by the schedule's
:attr:`PipeSchedule.placement` (a :class:`~stagewise.schedule.placement.Placement`
built from the class attributes ``num_chunks`` and ``placement_kind``): the
default loops (stage ``s`` holds virtual stages ``s, s + S, s + 2S, ...``), a V
schedule sets ``placement_kind = PlacementKind.V``. ``virtual_stage`` and
``locate`` delegate to it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import ClassVar

from stagewise.schedule.instructions import PipeInstruction
from stagewise.schedule.placement import Placement, PlacementKind
from stagewise.schedule.program import StageProgram

__all__ = ["PipeSchedule", "Step", "gc_paused"]

Step = list[PipeInstruction]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that builds many small objects.

    Building a schedule or simulating one allocates millions of tuples and
    instructions, none of them in a reference cycle; every few thousand of them
    the collector would walk the whole heap (torch's included) for nothing, which
    more than doubles the time. Reference counting still frees everything.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class PipeSchedule:
    """The steps one stage runs for one batch of ``micro_batches``.

    Args:
        micro_batches: micro-batches per batch (``gradient_accumulation_steps``).
        stages: the number of pipeline stages (ranks along the pipe axis).
        stage_id: the stage these steps are for, ``0 <= stage_id < stages``.
    """

    #: model chunks held by each stage (virtual stages per stage).
    num_chunks: int = 1
    #: how the chunks are laid out over the stages.
    placement_kind: ClassVar[PlacementKind] = PlacementKind.LOOP
    #: whether ``pipeline.virtual_stages`` chooses ``num_chunks`` (passed to the
    #: constructor as ``virtual_stages=``); otherwise the count is fixed.
    configurable_chunks: ClassVar[bool] = False

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if not 0 <= stage_id < stages:
            raise ValueError(f"stage_id must be in [0, {stages}), got {stage_id}")
        self.micro_batches = micro_batches
        self.stages = stages
        self.stage_id = stage_id
        self.prev_stage = stage_id - 1
        self.next_stage = stage_id + 1
        self._it: Iterator[Step] | None = None

    def steps(self) -> Iterator[Step]:
        """This stage's instructions, one list per step (by default from :meth:`build_program`)."""
        return iter(self.build_program().steps())

    def build_program(self) -> StageProgram:
        """Override to give this stage's instructions as arrays directly."""
        raise TypeError(
            f"{type(self).__name__} implements neither steps() nor build_program(): a "
            f"schedule gives its instructions one way or the other"
        )

    def program(self) -> StageProgram:
        """This stage's instructions as arrays, what the checker and the simulator read.

        From :meth:`build_program`, or compiled from :meth:`steps` when the class
        that defines the schedule (the most derived of the two) overrides ``steps``.
        """
        for cls in type(self).__mro__:
            if cls is PipeSchedule:
                break
            if "steps" in cls.__dict__:
                return StageProgram.from_steps(self.steps())
            if "build_program" in cls.__dict__:
                return self.build_program()
        return self.build_program()  # raises: neither is implemented

    def num_pipe_buffers(self) -> int:
        """How many activation buffers this stage needs at once."""
        return self.micro_batches

    # -- placement of model chunks ------------------------------------------------
    @classmethod
    def chunks_for(cls, virtual_stages: int | None, *, name: str | None = None) -> int:
        """The chunks per stage this schedule runs for ``pipeline.virtual_stages``.

        ``None`` means the config leaves it unset. A schedule with a fixed count
        accepts only that count. ``name`` (the registry's) is used in the message.

        Raises:
            ValueError: a count the schedule cannot run, with the fix.
        """
        if virtual_stages is not None and virtual_stages != cls.num_chunks:
            who = f"schedule {name!r}" if name else cls.__name__
            raise ValueError(
                f"{who} runs {cls.num_chunks} chunk(s) per stage, got "
                f"virtual_stages={virtual_stages}: leave virtual_stages unset, or use "
                f"'interleaved' to choose the number of chunks"
            )
        return cls.num_chunks

    @classmethod
    def placement_for(
        cls, stages: int, virtual_stages: int | None = None, *, name: str | None = None
    ) -> Placement:
        """The placement this schedule needs on ``stages`` stages (see :meth:`chunks_for`)."""
        return Placement(stages, cls.chunks_for(virtual_stages, name=name), cls.placement_kind)

    @cached_property
    def placement(self) -> Placement:
        """Where each virtual stage lives (``stages``, ``num_chunks``, ``placement_kind``)."""
        return Placement(self.stages, self.num_chunks, self.placement_kind)

    @property
    def num_virtual_stages(self) -> int:
        return self.stages * self.num_chunks

    def virtual_stage(self, stage_id: int, chunk_id: int) -> int:
        """The virtual stage (a cut of the layers) that ``chunk_id`` of ``stage_id`` holds."""
        return self.placement.virtual_stage(stage_id, chunk_id)

    def locate(self, virtual_stage: int) -> tuple[int, int]:
        """``(stage_id, chunk_id)`` that holds ``virtual_stage``."""
        return self.placement.locate(virtual_stage)

    # -- DeepSpeed's helpers -----------------------------------------------------
    def _valid_micro_batch(self, micro_batch_id: int) -> bool:
        return 0 <= micro_batch_id < self.micro_batches

    def _valid_stage(self, stage_id: int) -> bool:
        return 0 <= stage_id < self.stages

    def _buffer_idx(self, micro_batch_id: int) -> int:
        return micro_batch_id % self.num_pipe_buffers()

    @property
    def stage(self) -> int:
        return self.stage_id

    @property
    def num_stages(self) -> int:
        return self.stages

    @property
    def num_micro_batches(self) -> int:
        return self.micro_batches

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.stages - 1

    def __iter__(self) -> PipeSchedule:
        self._it = None
        return self

    def __next__(self) -> Step:
        if self._it is None:
            self._it = self.steps()
        return next(self._it)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(micro_batches={self.micro_batches}, "
            f"stages={self.stages}, stage_id={self.stage_id})"
        )
