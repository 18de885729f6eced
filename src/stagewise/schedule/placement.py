"""Placement: which model chunk of which stage holds which cut of the layers.

The layers are cut into ``stages × chunks`` *virtual stages*, numbered in the
order a micro-batch runs through them; each stage holds ``chunks`` of them.

* ``loop`` (interleaved schedules, and every schedule with one chunk): chunk ``c``
  of stage ``s`` is virtual stage ``c·S + s``, so a micro-batch goes down the
  stages ``chunks`` times::

      S = 3, 2 chunks:   stage 0: v0 v3    stage 1: v1 v4    stage 2: v2 v5

* ``v`` (ZB-V, DualPipeV; exactly 2 chunks): chunk 0 of stage ``s`` is virtual
  stage ``s`` and chunk 1 is ``2S - 1 - s``: a micro-batch goes down on chunk 0,
  turns on the last stage and comes back up on chunk 1, so stage 0 holds both the
  input and the loss::

      S = 3:             stage 0: v0 v5    stage 1: v1 v4    stage 2: v2 v3

A :class:`Placement` is a frozen value: schedules expose theirs as
``schedule.placement``, and a ``PipelineModule`` built for a schedule must hold the
same one.

>>> v = Placement(3, 2, PlacementKind.V)
>>> [v.virtual_stage(s, 1) for s in range(3)], v.locate(3), v.stage_holds_loss(0)
([5, 4, 3], (2, 1), True)
>>> Placement(3, 2, "loop").locate(4)
(1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Placement", "PlacementKind"]


class PlacementKind(Enum):
    """How chunks are laid out over the stages (see the module doc)."""

    LOOP = "loop"
    V = "v"

    @classmethod
    def parse(cls, value: PlacementKind | str) -> PlacementKind:
        """``"loop"`` or ``"v"`` (any case), or a :class:`PlacementKind` itself.

        Raises:
            ValueError: anything else; the message lists the valid forms.
        """
        if isinstance(value, PlacementKind):
            return value
        if isinstance(value, str):
            for kind in cls:
                if value.strip().lower() == kind.value:
                    return kind
        raise ValueError(
            f"unknown placement {value!r}: use 'loop' (chunk c of stage s is virtual "
            f"stage c*S + s) or 'v' (2 chunks, down the stages and back up)"
        )

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Placement:
    """Where each virtual stage lives: ``stages`` stages, ``chunks`` chunks each.

    Args:
        stages: pipeline stages, >= 1.
        chunks: model chunks per stage, >= 1 (exactly 2 for ``v``).
        kind: :class:`PlacementKind`, or its text form ``"loop"`` / ``"v"``.

    Raises:
        ValueError: sizes below 1, an unknown kind, or a ``v`` without 2 chunks.
    """

    stages: int
    chunks: int = 1
    kind: PlacementKind = PlacementKind.LOOP

    def __post_init__(self) -> None:
        for name in ("stages", "chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Placement.{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "kind", PlacementKind.parse(self.kind))
        if self.kind is PlacementKind.V and self.chunks != 2:
            raise ValueError(
                f"a 'v' placement has exactly 2 chunks per stage, got chunks={self.chunks}: "
                f"use chunks=2, or the 'loop' placement for another count"
            )

    @property
    def num_virtual_stages(self) -> int:
        """``stages × chunks``."""
        return self.stages * self.chunks

    def _check_stage(self, stage: int, chunk: int) -> None:
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage must be in [0, {self.stages}), got {stage}")
        if not 0 <= chunk < self.chunks:
            raise ValueError(f"the placement has chunks 0..{self.chunks - 1}, got chunk_id={chunk}")

    def virtual_stage(self, stage: int, chunk: int) -> int:
        """The virtual stage that ``chunk`` of ``stage`` holds."""
        self._check_stage(stage, chunk)
        if self.kind is PlacementKind.V and chunk == 1:
            return 2 * self.stages - 1 - stage
        return chunk * self.stages + stage

    def locate(self, virtual: int) -> tuple[int, int]:
        """``(stage, chunk)`` holding ``virtual``; the inverse of :meth:`virtual_stage`."""
        if not 0 <= virtual < self.num_virtual_stages:
            raise ValueError(
                f"virtual_stage must be in [0, {self.num_virtual_stages}) for "
                f"{self.stages} stages × {self.chunks} chunks, got {virtual}"
            )
        chunk, stage = divmod(virtual, self.stages)
        if self.kind is PlacementKind.V and chunk == 1:
            stage = self.stages - 1 - stage
        return stage, chunk

    def is_first(self, stage: int, chunk: int) -> bool:
        """Whether ``chunk`` of ``stage`` is the first virtual stage (takes the inputs)."""
        return self.virtual_stage(stage, chunk) == 0

    def is_last(self, stage: int, chunk: int) -> bool:
        """Whether ``chunk`` of ``stage`` is the last virtual stage (computes the loss)."""
        return self.virtual_stage(stage, chunk) == self.num_virtual_stages - 1

    def stage_holds_loss(self, stage: int) -> bool:
        """Whether ``stage`` holds the last virtual stage (reads labels, computes the loss)."""
        return self.locate(self.num_virtual_stages - 1)[0] == stage

    def stage_holds_input(self, stage: int) -> bool:
        """Whether ``stage`` holds the first virtual stage (reads the inputs)."""
        return self.locate(0)[0] == stage

    def next(self, stage: int, chunk: int) -> tuple[int, int] | None:
        """``(stage, chunk)`` of the next virtual stage, or None after the last."""
        virtual = self.virtual_stage(stage, chunk)
        return None if virtual == self.num_virtual_stages - 1 else self.locate(virtual + 1)

    def prev(self, stage: int, chunk: int) -> tuple[int, int] | None:
        """``(stage, chunk)`` of the previous virtual stage, or None before the first."""
        virtual = self.virtual_stage(stage, chunk)
        return None if virtual == 0 else self.locate(virtual - 1)

    def virtual_stages_of(self, stage: int) -> tuple[int, ...]:
        """The virtual stages ``stage`` holds, chunk by chunk."""
        return tuple(self.virtual_stage(stage, chunk) for chunk in range(self.chunks))

    def __str__(self) -> str:
        return f"{self.kind.value} placement of {self.stages} stage(s) × {self.chunks} chunk(s)"
