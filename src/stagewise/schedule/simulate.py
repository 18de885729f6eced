"""Simulate a schedule under a cost model: makespan, bubble, peak activations and bytes.

The model, which the engine's real behaviour approximates:

* each stage runs its instructions in order, one at a time;
* a forward, an input-gradient pass and a weight-gradient pass cost what
  :class:`~stagewise.schedule.costs.Costs` says for their *virtual stage* (a whole
  backward both halves): one number for every stage's whole share (each of ``k``
  chunks per stage takes ``1/k`` of it, so makespans compare across schedules), or
  one time per virtual stage when the stages' layers differ;
* a send is asynchronous: the stage goes on at once, and the message arrives the
  ``send`` time of the boundary it crosses later (one number, or one per boundary
  ``v -> v + 1``, used by the activation going down and the gradient coming back;
  :meth:`~stagewise.schedule.costs.Costs.transfer_times` turns bytes, bandwidth and
  latency into them);
* a receive blocks until its message has arrived; between two stages messages are
  taken in the order they were sent (as the checker requires);
* loads, reductions, the optimizer step and ``CUSTOM`` instructions take no time,
  and the simulator does not wait at collectives (:func:`sim_op` decides each kind).

Results (:class:`SimResult`): the *makespan* (when the last stage finishes), the
*bubble fraction* (the stages' idle time over ``stages × makespan``), the *peak
activations* of each stage (the most micro-batches it holds at once: forwarded on a
chunk, whose backward on that chunk, ``B`` or the ``W`` of a split one, has not
finished; counted once per chunk and micro-batch), with ``memory=`` an
:class:`~stagewise.schedule.costs.ActivationMemory` the *peak activation bytes* of
each stage (bytes per micro-batch and virtual stage; with activation checkpointing
only each virtual stage's input is kept, and the backward recomputes the rest: the
accounting is spelled out in :mod:`~stagewise.schedule.costs`), and a
:class:`TimelineEvent` per compute pass for
:func:`~stagewise.schedule.render.render_timeline`.

With integer costs every time is an integer, so the bubble fraction is the exact
ratio rounded once: 1F1B's is ``(S - 1) / (M + S - 1)`` to the last bit.

How: the schedule is held as arrays (:mod:`~stagewise.schedule.program`), cut into
blocks at every receive, and the blocks' start times are computed over the
dependency graph's levels (:mod:`~stagewise.schedule.deps`): a block starts when
its stage's previous block has finished and its message has arrived. 256 stages ×
2048 micro-batches of 1F1B are simulated in a fraction of a second, and a checked
program is not layered again; a planner changing only the costs pays only for the
sweep.

>>> from stagewise.schedule.deepspeed import TrainSchedule
>>> result = simulate(TrainSchedule, micro_batches=8, stages=4)
>>> result.makespan, result.bubble_fraction == 3 / 11, result.peak_activations
(33.0, True, [4, 3, 2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.build import schedule_program
from stagewise.schedule.check import ScheduleFactory
from stagewise.schedule.costs import (
    OP_OF,
    ActivationMemory,
    Costs,
    Floats,
    peak_activation_bytes,
    sim_op,
)
from stagewise.schedule.frame import frame_of, sweep
from stagewise.schedule.instructions import PipeInstruction
from stagewise.schedule.kinds import Kind
from stagewise.schedule.placement import Placement
from stagewise.schedule.program import Ints, NotAnInstruction, Program
from stagewise.schedule.render import TimelineEvent

__all__ = ["ActivationMemory", "Costs", "SimResult", "sim_op", "simulate"]


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` found.

    Attributes:
        makespan: when the last stage finished its last instruction.
        bubble_fraction: idle compute time over ``stages × makespan``.
        peak_activations: per stage, the most (chunk, micro-batch) activations held
            at once (forwarded, backward not finished).
        peak_memory: per stage, the same in units of one micro-batch through all of
            the stage's layers (each of ``num_chunks`` chunks counts
            ``1 / num_chunks``), comparable across schedules with different chunking.
        busy: per stage, the time spent computing.
        costs: the cost model used.
        chunks: model chunks per stage.
        peak_activation_bytes: per stage, the most activation bytes live at once
            (with ``memory=``; None without).
        events: one :class:`TimelineEvent` per compute pass (``F``, ``B``, ``I``,
            ``W``), stage by stage, each stage's in the order it ran them (empty
            when simulated with ``record_events=False``).
    """

    makespan: float
    bubble_fraction: float
    peak_activations: list[int]
    peak_memory: list[float]
    busy: list[float]
    costs: Costs
    chunks: int = 1
    peak_activation_bytes: list[float] | None = None
    _program: Program | None = field(default=None, repr=False, compare=False)
    _timeline: tuple[Ints, Floats, Floats] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def events(self) -> list[TimelineEvent]:
        """The timeline, built on first use from the recorded start times."""
        if self._program is None or self._timeline is None:
            return []
        rows, starts, costs = self._timeline
        program, offsets = self._program, self._program.offsets
        stage_of = program.stage_of_row[rows]
        kinds = program.concat("kind")[rows]
        events = []
        for row, stage, kind, start, cost in zip(
            rows.tolist(), stage_of.tolist(), kinds.tolist(), starts.tolist(), costs.tolist(),
            strict=True,
        ):  # fmt: skip
            name = program.stages[stage].text(row - int(offsets[stage]))
            events.append(TimelineEvent(stage, name, start, start + cost, Kind(kind)))
        return events

    @property
    def stages(self) -> int:
        """The number of pipeline stages simulated."""
        return len(self.busy)

    def to_dict(self, *, events: bool = False) -> dict[str, Any]:
        """The result as plain JSON-ready values (the events only when asked)."""
        out: dict[str, Any] = {
            "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction,
            "peak_activations": list(self.peak_activations),
            "peak_memory": list(self.peak_memory),
            "busy": list(self.busy),
            "costs": self.costs.to_dict(),
        }
        if self.peak_activation_bytes is not None:
            out["peak_activation_bytes"] = list(self.peak_activation_bytes)
        if events:
            out["events"] = [[e.rank, e.name, e.start, e.end] for e in self.events]
        return out


_Table = Sequence[Sequence[Sequence[PipeInstruction]]]


def simulate(
    schedule: ScheduleFactory | Program | _Table,
    costs: Costs | None = None,
    *,
    micro_batches: int | None = None,
    stages: int | None = None,
    placement: Placement | PipeSchedule | None = None,
    record_events: bool = True,
    memory: ActivationMemory | None = None,
    **kwargs: object,
) -> SimResult:
    """Simulate one batch of a schedule over all its stages.

    Args:
        schedule: a schedule class or factory, called as
            ``schedule(micro_batches, stages, stage_id, **kwargs)`` for every stage;
            a :class:`~stagewise.schedule.program.Program` (fastest: a checked one is
            not layered again); or a table ``table[stage][step]`` of instructions
            (as :func:`~stagewise.schedule.check.schedule_table` returns).
        costs: the cost model; by default every pass costs 1 and sends are free.
        micro_batches: micro-batches per batch (with a factory).
        stages: pipeline stages (with a factory).
        placement: with a table, where the chunks are (a ``Placement``, or a schedule
            object, whose placement is used); by default a loop placement with as
            many chunks as the table names.
        record_events: keep one :class:`TimelineEvent` per compute pass.
        memory: activation bytes, for ``peak_activation_bytes``.
        **kwargs: passed on to a factory (e.g. ``virtual_stages=2``).

    Raises:
        ScheduleError: no stage can go on (a receive whose send never comes), with
            the grid and each stuck stage's instruction marked.
        ValueError: the arguments do not fit together.
    """
    costs = costs if costs is not None else Costs()
    program = _resolve(schedule, micro_batches, stages, placement, kwargs)
    return _run(program, costs, record_events, memory)


def _resolve(
    schedule: ScheduleFactory | Program | _Table,
    micro_batches: int | None,
    stages: int | None,
    placement: Placement | PipeSchedule | None,
    kwargs: dict[str, object],
) -> Program:
    """The program to simulate."""
    if isinstance(schedule, Program):
        if kwargs or micro_batches is not None or stages not in (None, schedule.num_stages):
            raise ValueError("simulate(program, ...) takes no schedule arguments: it has them")
        return schedule
    if callable(schedule):
        if micro_batches is None or stages is None:
            raise ValueError(
                "simulate(factory, ...) needs micro_batches= and stages=, got "
                f"micro_batches={micro_batches}, stages={stages}"
            )
        return schedule_program(schedule, micro_batches, stages, **kwargs)
    if kwargs or micro_batches is not None:
        raise ValueError(
            "simulate(table, ...) takes no schedule arguments (micro_batches, "
            f"{', '.join(kwargs) or 'kwargs'}): they belong to a factory"
        )
    if stages is not None and stages != len(schedule):
        raise ValueError(f"stages={stages} but the table has {len(schedule)} stages")
    if len(schedule) == 0:
        raise ValueError("cannot simulate a table without stages")
    layout = placement.placement if isinstance(placement, PipeSchedule) else placement
    if layout is not None and layout.stages != len(schedule):
        raise ValueError(
            f"the placement has {layout.stages} stages but the table has {len(schedule)}"
        )
    try:
        program = Program.from_table(schedule, layout or Placement(len(schedule)), 1)
    except NotAnInstruction as error:
        raise ValueError(f"stage {getattr(error, 'stage', 0)}: {error}") from None
    chunks = 1 + max((int(stage.chunk.max(initial=0)) for stage in program.stages), default=0)
    micro = 1 + max((int(stage.micro_batch.max(initial=0)) for stage in program.stages), default=0)
    training = getattr(placement, "training", None) if isinstance(placement, PipeSchedule) else None
    return Program(
        program.stages,
        layout or Placement(len(schedule), chunks),
        micro,
        training=training,
        replicated=bool(getattr(placement, "replicated", False)),
    )


def _run(
    program: Program, costs: Costs, record_events: bool, memory: ActivationMemory | None
) -> SimResult:
    """The simulation itself (see the module doc)."""
    f = frame_of(program)
    stages, chunks = program.num_stages, program.chunks
    virtual_count = program.placement.num_virtual_stages
    forward = costs.per_virtual_stage("forward", virtual_count, chunks)
    grad_in = costs.per_virtual_stage("backward_input", virtual_count, chunks)
    grad_w = costs.per_virtual_stage("backward_weight", virtual_count, chunks)
    table = np.stack([forward, grad_in + grad_w, grad_in, grad_w])  # by SimOp value
    cost = table[OP_OF[f.kind], f.virtual_of]
    spent = np.empty(len(cost) + 1)  # compute time before each compute row
    spent[0] = 0.0
    np.cumsum(cost, out=spent[1:])

    # per block: how long it runs, and when its message arrives after its source starts
    n = f.deps.num_blocks
    at_start = spent[f.at_start]
    length = np.zeros(n + 1)  # the last entry: "nothing", as in sweep
    np.subtract(at_start[1:], at_start[:-1], out=length[: n - 1])
    length[n - 1 : n] = spent[-1] - at_start[-1:]
    wait = np.zeros(n + 1)
    boundary = costs.per_boundary(virtual_count)  # checked even without messages
    if f.msg.size:
        arrival = spent[f.at_send] - at_start[f.msg_source]
        if boundary.size and boundary.min() == boundary.max():
            arrival += boundary[0]  # every boundary alike: no gather
        elif boundary.size:
            arrival += boundary[f.crossed]
        wait[f.msg] = arrival
    begin = sweep(f, length, wait)

    # results per stage
    finish = np.zeros(stages)
    finish[f.nonempty] = begin[f.last_block] + length[f.last_block]
    busy = spent[f.segment[1:]] - spent[f.segment[:-1]]
    makespan = float(finish.max()) if stages else 0.0
    idle = stages * makespan - float(busy.sum())
    bubble = idle / (stages * makespan) if makespan > 0 else 0.0
    training = f.training
    peaks = f.peaks
    peak_bytes = None
    if memory is not None:
        made, kept = memory.tables(virtual_count, chunks)
        peak_bytes = peak_activation_bytes(
            f.kind, made[f.virtual_of], kept[f.virtual_of], f.segment, training
        )
    timeline = None
    if record_events:
        starts = begin[f.compute_block] + spent[:-1] - at_start[f.compute_block]
        timeline = (f.rows, starts, cost)
    return SimResult(
        makespan=makespan,
        bubble_fraction=bubble,
        peak_activations=peaks,
        peak_memory=[p / chunks for p in peaks],
        busy=busy.tolist(),
        costs=costs,
        chunks=chunks,
        peak_activation_bytes=peak_bytes,
        _program=program,
        _timeline=timeline,
    )
