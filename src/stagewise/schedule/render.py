"""Timelines: the events of a (simulated or recorded) batch, drawn or traced.

A timeline is a list of :class:`TimelineEvent` ``(rank, name, start, end, kind)``:
which pipeline stage ran which instruction (its short text, ``"F3"``, ``"I2c1"``,
and its :class:`~stagewise.schedule.kinds.Kind`) from when to when. :func:`~stagewise.schedule.simulate.simulate` produces them in cost units;
the engine records real ones in seconds. Two ways out:

* :func:`render_timeline` draws a PNG, one row per stage, forward, input-gradient,
  weight-gradient and whole-backward passes in their own colours, the micro-batch
  number in each box (matplotlib, imported only here: ``pip install
  'stagewise[plot]'``);
* :func:`write_chrome_trace` writes Chrome's trace-event JSON, for
  ``chrome://tracing`` or https://ui.perfetto.dev.

Example::

    from stagewise.schedule.simulate import simulate
    from stagewise.schedule.deepspeed import TrainSchedule
    result = simulate(TrainSchedule, micro_batches=8, stages=4)
    render_timeline(result.events, "1f1b.png", title="1F1B, 4 stages, 8 micro-batches")
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from stagewise.schedule.kinds import Kind

__all__ = [
    "TimelineEvent",
    "chrome_trace",
    "format_timeline",
    "render_timeline",
    "write_chrome_trace",
]

_NAME = re.compile(r"^([A-Z]+)(\d+)?(?:c(\d+))?")

#: fill colour per compute kind (the boxes drawn); chunk 1 and later draw darker shades.
_COLOURS: dict[Kind, tuple[str, ...]] = {
    Kind.FORWARD: ("#8ecae6", "#3a86c8", "#1d4e89"),
    Kind.BACKWARD: ("#c8a2e0", "#9b5fc0", "#6a3d9a"),
    Kind.BACKWARD_INPUT: ("#ffb870", "#f08a24", "#b85c00"),
    Kind.BACKWARD_WEIGHT: ("#9ad99a", "#4caf50", "#2e7d32"),
}
if set(_COLOURS) != {kind for kind in Kind if kind.is_compute}:  # pragma: no cover
    raise RuntimeError("every compute kind needs its colours in render._COLOURS")


def _kind_of_name(name: str) -> Kind:
    """The kind an instruction's text names (``CUSTOM`` for a code no built-in kind has)."""
    match = _NAME.match(name)
    if match is None:
        return Kind.CUSTOM
    try:
        return Kind.from_code(match.group(1))
    except ValueError:
        return Kind.CUSTOM


@dataclass(frozen=True)
class TimelineEvent:
    """One instruction on one stage, from ``start`` to ``end``.

    Attributes:
        rank: the pipeline stage (rank along the pipe axis) that ran it.
        name: the instruction's text form, e.g. ``"F3"``, ``"I2c1"``, ``"RA0"``.
        start: when it started (cost units in a simulation, seconds when recorded).
        end: when it ended, ``>= start``.
        kind: the instruction's :class:`~stagewise.schedule.kinds.Kind`; when not
            given (or ``CUSTOM``), read from the name's code, which leaves ``CUSTOM``
            for a code no built-in kind has.
    """

    rank: int
    name: str
    start: float
    end: float
    kind: Kind = field(default=Kind.CUSTOM, compare=False)

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(
                f"TimelineEvent {self.name!r} on rank {self.rank} ends before it starts "
                f"(start: {self.start}, end: {self.end})"
            )
        if self.kind == Kind.CUSTOM:
            object.__setattr__(self, "kind", _kind_of_name(self.name))

    @property
    def duration(self) -> float:
        """``end - start``."""
        return self.end - self.start

    @property
    def code(self) -> str:
        """The instruction's code: ``"F"`` for ``"F3c1"``, ``"RA"`` for ``"RA0"``."""
        if self.kind.code is not None:
            return self.kind.code
        match = _NAME.match(self.name)
        return match.group(1) if match else self.name

    @property
    def micro_batch(self) -> int | None:
        """The micro-batch the instruction acts on, if its name says."""
        match = _NAME.match(self.name)
        return int(match.group(2)) if match and match.group(2) else None

    @property
    def chunk(self) -> int:
        """The model chunk the instruction acts on (0 unless its name says ``c<k>``)."""
        match = _NAME.match(self.name)
        return int(match.group(3)) if match and match.group(3) else 0


# -- text ---------------------------------------------------------------------------
def format_timeline(
    events: Sequence[TimelineEvent],
    *,
    stages: int | None = None,
    unit: float | None = None,
    chunk_mark: str = "a",
) -> str:
    """Draw the compute passes of ``events`` as text, one row per stage.

    Each column is ``unit`` of time (by default the shortest pass); a pass shows its
    kind and micro-batch in its first column (``chunk_mark`` repeated ``k`` times
    marks chunk ``k``: ``F3a``), ``-`` in the columns it goes on for, and ``.``
    marks idle time.

    >>> print(format_timeline([TimelineEvent(0, "F0", 0, 1), TimelineEvent(1, "F0", 1, 2)]))
    time     0  1
    stage 0  F0 .
    stage 1  .  F0
    """
    boxes = [event for event in events if event.kind.is_compute]
    rows = stages if stages is not None else 1 + max((e.rank for e in events), default=-1)
    if unit is None:
        unit = min((e.duration for e in boxes if e.duration > 0), default=1.0)
    if unit <= 0:
        raise ValueError(f"unit must be > 0, got {unit}")
    end = max((e.end for e in boxes), default=0.0)
    columns = round(end / unit)
    grid = [["."] * columns for _ in range(rows)]
    for event in boxes:
        first = round(event.start / unit)
        last = round(event.end / unit)
        label = f"{event.code}{event.micro_batch if event.micro_batch is not None else ''}"
        grid[event.rank][first] = label + chunk_mark * event.chunk
        for column in range(first + 1, last):
            grid[event.rank][column] = "-"
    header = [str(c) for c in range(columns)]
    width = max([len(cell) for row in grid for cell in row] + [len(h) for h in header])
    name = len(f"stage {rows - 1}")
    lines = ["time".ljust(name) + "  " + " ".join(h.ljust(width) for h in header)]
    for rank, row in enumerate(grid):
        lines.append(f"stage {rank}".ljust(name) + "  " + " ".join(c.ljust(width) for c in row))
    return "\n".join(line.rstrip() for line in lines)


# -- Chrome trace ---------------------------------------------------------------------
def chrome_trace(events: Iterable[TimelineEvent], *, unit_us: float = 1e6) -> dict[str, Any]:
    """The Chrome trace-event object for ``events``: one thread per stage.

    Args:
        events: the timeline.
        unit_us: microseconds per time unit of the events (``1e6`` for seconds, the
            engine's unit; pass ``1000`` to show simulated cost units as milliseconds).
    """
    if unit_us <= 0:
        raise ValueError(f"unit_us must be > 0, got {unit_us}")
    trace: list[dict[str, Any]] = []
    ranks: set[int] = set()
    for event in events:
        ranks.add(event.rank)
        trace.append(
            {
                "name": event.name,
                "cat": event.code,
                "ph": "X",
                "ts": event.start * unit_us,
                "dur": event.duration * unit_us,
                "pid": 0,
                "tid": event.rank,
            }
        )
    for rank in sorted(ranks):
        trace.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "args": {"name": f"stage {rank}"},
            }
        )
        trace.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "args": {"sort_index": rank},
            }
        )
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(
    events: Iterable[TimelineEvent], path: str | PathLike[str], *, unit_us: float = 1e6
) -> None:
    """Write ``events`` as Chrome trace-event JSON to ``path`` (see :func:`chrome_trace`)."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(chrome_trace(events, unit_us=unit_us), file)


# -- PNG ------------------------------------------------------------------------------
def render_timeline(
    events: Sequence[TimelineEvent],
    path: str | PathLike[str],
    *,
    stages: int | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> None:
    """Draw the compute passes of ``events`` as a PNG: one row per stage, stage 0 on top.

    Forward (``F``), whole backward (``B``), input-gradient (``I``) and
    weight-gradient (``W``) passes each have their own colour, darker for later
    model chunks (the legend says which); each box shows its micro-batch when it is
    wide enough to read. Other instructions (transfers, loads) are not
    drawn.

    Args:
        events: the timeline (any order).
        path: the PNG file to write.
        stages: rows to draw; by default one more than the highest rank seen.
        title: a title over the plot.
        dpi: resolution of the PNG.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "render_timeline needs matplotlib: pip install 'stagewise[plot]' "
            "(or pip install matplotlib)"
        ) from error

    boxes = [event for event in events if event.kind.is_compute]
    rows = stages if stages is not None else 1 + max((e.rank for e in events), default=-1)
    rows = max(rows, 1)
    end = max((e.end for e in events), default=1.0) or 1.0

    width = min(max(8.0, 0.22 * len(boxes) / rows + 4.0), 40.0)
    height = min(max(2.4, 0.45 * rows + 1.6), 40.0)
    figure, axes = plt.subplots(figsize=(width, height))
    try:
        # time units one character of a label spans, to skip labels that do not fit
        units_per_char = end / (width * 0.85) * 0.09
        font = 7 if rows <= 16 else 5
        for event in boxes:
            shades = _COLOURS[event.kind]
            colour = shades[min(event.chunk, len(shades) - 1)]
            axes.broken_barh(
                [(event.start, event.duration)],
                (event.rank - 0.4, 0.8),
                facecolors=colour,
                edgecolors="white",
                linewidth=0.5,
            )
            label = "" if event.micro_batch is None else str(event.micro_batch)
            if label and rows <= 32 and event.duration >= units_per_char * len(label):
                axes.text(
                    event.start + event.duration / 2,
                    event.rank,
                    label,
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if event.chunk else "black",
                )
        axes.set_ylim(rows - 0.5, -0.5)
        axes.set_xlim(0, end)
        if rows <= 32:
            axes.set_yticks(range(rows))
            axes.set_yticklabels([f"stage {s}" for s in range(rows)])
        axes.set_xlabel("time")
        if title:
            axes.set_title(title, loc="left", fontsize=10)
        present = sorted(
            {(e.kind, min(e.chunk, 2)) for e in boxes},
            key=lambda kc: (int(kc[0]), kc[1]),
        )
        chunked = any(chunk for _, chunk in present)
        handles = [
            Patch(
                facecolor=_COLOURS[kind][chunk],
                label=kind.description + (f", chunk {chunk}" if chunked else ""),
            )
            for kind, chunk in present
        ]
        axes.legend(
            handles=handles,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            ncol=min(len(handles), 3) or 1,
            fontsize=7,
            frameon=False,
        )
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
    finally:
        plt.close(figure)
