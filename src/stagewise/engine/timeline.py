"""Real timelines: every stage's recorded instructions of the last training batch.

With ``"pipeline": {"record_timeline": true}`` each rank records when each of
its instructions started and ended; :func:`gather_timeline` collects every
stage's events on the first stage, :func:`write_timeline` draws them (PNG) or
writes a Chrome trace (JSON, for ``chrome://tracing`` or Perfetto).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from stagewise.errors import PipelineError
from stagewise.grid import PipelineParallelGrid
from stagewise.schedule.render import TimelineEvent, render_timeline, write_chrome_trace

__all__ = ["gather_timeline", "write_timeline"]


def gather_timeline(
    events: list[TimelineEvent] | None, grid: PipelineParallelGrid
) -> list[TimelineEvent] | None:
    """Every stage's events on the first stage of the pipeline (None on the others).

    Every stage of the pipeline must call it. ``events`` is None when nothing was
    recorded (``pipeline.record_timeline`` is off).
    """
    if events is None:
        raise PipelineError(
            'no timeline was recorded: set "pipeline": {"record_timeline": true} in the config'
        )
    stages = grid.get_pipe_parallel_world_size()
    if stages == 1:
        return list(events)
    first = grid.stage_to_global(0)
    gathered: list[Any] | None = [None] * stages if grid.get_stage_id() == 0 else None
    dist.gather_object(events, gathered, dst=first, group=grid.get_pipe_parallel_group())
    if gathered is None:
        return None
    return [event for stage_events in gathered for event in stage_events]


def write_timeline(
    events: list[TimelineEvent] | None,
    grid: PipelineParallelGrid,
    png: str | os.PathLike[str] | None = None,
    trace: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> list[TimelineEvent] | None:
    """Gather the timeline; on the first stage draw it (``png``) and/or trace it (``trace``)."""
    gathered = gather_timeline(events, grid)
    if gathered is None:
        return None
    if png is not None:
        render_timeline(gathered, png, stages=grid.get_pipe_parallel_world_size(), title=title)
    if trace is not None:
        write_chrome_trace(gathered, trace)
    return gathered
