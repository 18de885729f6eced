"""Schedules by name, as the config's ``pipeline.schedule`` names them.

* ``"1f1b"`` (the default): :class:`~stagewise.schedule.deepspeed.TrainSchedule`,
  DeepSpeed's synchronous 1F1B;
* ``"gpipe"``: :class:`~stagewise.schedule.gpipe.GPipeSchedule`;
* ``"interleaved"``: :class:`~stagewise.schedule.interleaved.InterleavedSchedule`,
  ``virtual_stages`` chunks per stage (default 2, ``pipeline.virtual_stages``);
* ``"zb-h1"``: :class:`~stagewise.schedule.zero_bubble.ZeroBubbleH1Schedule`;
* ``"zbv"``: :class:`~stagewise.schedule.zero_bubble.ZBVSchedule`, 2 chunks per
  stage in a V;
* ``"zb-h2"``: :class:`~stagewise.schedule.zero_bubble.ZeroBubbleH2Schedule`, no
  idle time inside the batch for ``2S - 1`` micro-batches held per stage;
* ``"dualpipev"``: :class:`~stagewise.schedule.dualpipe.DualPipeVSchedule`, 2 chunks
  per stage in a V, at least ``2 × stages`` micro-batches.

Every schedule accepts any number of micro-batches except ``"dualpipev"``, which
needs ``2 × stages`` or more (an error names the count to use).

Names are case-insensitive and ``_`` may stand for ``-``. Each schedule class says
itself how many chunks it runs and how they are placed
(:meth:`~stagewise.schedule.base.PipeSchedule.placement_for`); :func:`schedule_layout` reads
it for a name, so the engine and the module agree on one
:class:`~stagewise.schedule.placement.Placement`.

>>> make_schedule("zbv", micro_batches=8, stages=4, stage_id=0).num_chunks
2
>>> get_schedule_class("1F1B").__name__
'TrainSchedule'
>>> schedule_layout("zbv", None, 4)
Placement(stages=4, chunks=2, kind=<PlacementKind.V: 'v'>)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.check import ScheduleFactory
from stagewise.schedule.deepspeed import TrainSchedule
from stagewise.schedule.dualpipe import DualPipeVSchedule
from stagewise.schedule.gpipe import GPipeSchedule
from stagewise.schedule.interleaved import InterleavedSchedule
from stagewise.schedule.placement import Placement
from stagewise.schedule.zero_bubble import ZBVSchedule, ZeroBubbleH1Schedule, ZeroBubbleH2Schedule

__all__ = [
    "DEFAULT_SCHEDULE",
    "SCHEDULES",
    "ScheduleChoice",
    "get_schedule_class",
    "make_schedule",
    "schedule_factory",
    "schedule_layout",
    "schedule_names",
]

#: the schedule a config without ``pipeline.schedule`` runs.
DEFAULT_SCHEDULE = "1f1b"

#: name -> training schedule class.
SCHEDULES: dict[str, type[PipeSchedule]] = {
    "1f1b": TrainSchedule,
    "gpipe": GPipeSchedule,
    "interleaved": InterleavedSchedule,
    "zb-h1": ZeroBubbleH1Schedule,
    "zbv": ZBVSchedule,
    "zb-h2": ZeroBubbleH2Schedule,
    "dualpipev": DualPipeVSchedule,
}


def schedule_names() -> list[str]:
    """The valid schedule names, in the order of the table above."""
    return list(SCHEDULES)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(
            f"a schedule name must be a string, got {type(name).__name__} {name!r}; "
            f"valid names: {', '.join(SCHEDULES)}"
        )
    key = name.strip().lower().replace("_", "-")
    if key not in SCHEDULES:
        raise ValueError(
            f"unknown pipeline schedule {name!r}: valid names are {', '.join(SCHEDULES)}"
        )
    return key


def get_schedule_class(name: str) -> type[PipeSchedule]:
    """The schedule class for ``name`` (case-insensitive, ``_`` for ``-`` allowed).

    Raises:
        ValueError: ``name`` is not a schedule; the message lists the valid names.
    """
    return SCHEDULES[_canonical(name)]


def schedule_layout(name: str, virtual_stages: int | None, stages: int) -> Placement:
    """The placement schedule ``name`` needs: chunks per stage and their layout.

    ``virtual_stages`` is the config's ``pipeline.virtual_stages`` (None when
    unset). The engine builds the schedule's placement from this, and a
    ``PipelineModule`` for it is ``PipelineModule(..., virtual_stages=p.chunks,
    placement=p.kind.value)``.

    >>> p = schedule_layout("interleaved", 3, 4)
    >>> p.chunks, p.kind.value
    (3, 'loop')

    Raises:
        ValueError: an unknown name, or a ``virtual_stages`` the schedule cannot run.
    """
    key = _canonical(name)
    return SCHEDULES[key].placement_for(stages, virtual_stages, name=key)


def schedule_factory(name: str, virtual_stages: int | None = None) -> ScheduleFactory:
    """A callable ``(micro_batches, stages, stage_id) -> PipeSchedule`` for ``name``.

    ``virtual_stages`` sets the chunks per stage of ``"interleaved"`` (default 2);
    for the other schedules it may only repeat their fixed count (1, or 2 for
    ``"zbv"`` and ``"dualpipev"``). The factory is what :func:`~stagewise.schedule.check.check_schedule`
    and :func:`~stagewise.schedule.simulate.simulate` take.

    Raises:
        ValueError: an unknown name, or a ``virtual_stages`` the schedule cannot run.
    """
    key = _canonical(name)
    cls = SCHEDULES[key]
    chunks = cls.chunks_for(virtual_stages, name=key)
    if cls.configurable_chunks:
        return functools.partial(cast(Any, cls), virtual_stages=chunks)
    return cls


@dataclass(frozen=True)
class ScheduleChoice:
    """A training schedule chosen by name with its chunk count, checked once.

    What the config's ``pipeline.schedule`` and ``pipeline.virtual_stages`` say, as a
    value: build it with :meth:`parse`, which raises for an unknown name or a chunk
    count the schedule cannot run.

    >>> choice = ScheduleChoice.parse("ZB_H1")
    >>> choice.name, choice.layout(4).chunks
    ('zb-h1', 1)
    """

    name: str
    virtual_stages: int | None = None

    @classmethod
    def parse(cls, name: str, virtual_stages: int | None = None) -> ScheduleChoice:
        """Check ``name`` (any case, ``_`` for ``-``) and ``virtual_stages`` against the registry.

        Raises:
            ValueError: an unknown name, or a ``virtual_stages`` the schedule cannot run.
        """
        key = _canonical(name)
        SCHEDULES[key].chunks_for(virtual_stages, name=key)
        return cls(key, virtual_stages)

    def factory(self) -> ScheduleFactory:
        """``(micro_batches, stages, stage_id) -> PipeSchedule`` (:func:`schedule_factory`)."""
        return schedule_factory(self.name, self.virtual_stages)

    def layout(self, stages: int) -> Placement:
        """The placement of the model chunks on ``stages`` stages (:func:`schedule_layout`)."""
        return schedule_layout(self.name, self.virtual_stages, stages)


def make_schedule(
    name: str,
    micro_batches: int,
    stages: int,
    stage_id: int,
    virtual_stages: int | None = None,
) -> PipeSchedule:
    """Build the schedule ``name`` for one stage (see :func:`schedule_factory`).

    Raises:
        ValueError: an unknown name, a ``virtual_stages`` the schedule cannot run,
            or sizes the schedule rejects.
    """
    return schedule_factory(name, virtual_stages)(micro_batches, stages, stage_id)
