"""Simulate a schedule under a cost model: makespan, bubble, peak activations.

The model, which the engine's real behaviour approximates:

* each stage runs its instructions in order, one at a time;
* a forward costs ``forward``, an input-gradient pass ``backward_input``, a
  weight-gradient pass ``backward_weight``, and a whole backward both. The costs
  are for one micro-batch through a stage's whole share of the model: a schedule
  with ``k`` chunks per stage (interleaved, V-shaped) runs each chunk's pass in
  ``1/k`` of them, so makespans compare across schedules;
* a send is asynchronous: the stage goes on at once, and the message arrives
  ``send`` later;
* a receive blocks until its message has arrived; between two stages messages are
  taken in the order they were sent (as the checker requires);
* loads, reductions and the optimizer step take no time.

Results: the *makespan* (when the last stage finishes), the *bubble fraction*
(the stages' idle time over ``stages × makespan``), the *peak activations* of each
stage (the most micro-batches it holds at once: forwarded on a chunk, whose
backward on that chunk, ``B`` or the ``W`` of a split one, has not finished;
counted once per chunk and micro-batch) and a :class:`TimelineEvent` per compute
pass for :func:`~stagewise.schedule.render.render_timeline`.

With integer costs every time is an integer, so the bubble fraction is the exact
ratio rounded once: 1F1B's is ``(S - 1) / (M + S - 1)`` to the last bit.

The simulation is event-driven and linear in the number of instructions: a stage
runs until a receive finds nothing on its link, and is woken by the send that fills
it. 256 stages × 2048 micro-batches of 1F1B (three million instructions) take a few
seconds.

>>> from stagewise.schedule.deepspeed import TrainSchedule
>>> result = simulate(TrainSchedule, micro_batches=8, stages=4)
>>> result.makespan, result.bubble_fraction == 3 / 11, result.peak_activations
(33, True, [4, 3, 2, 1])
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property
from typing import Any

from stagewise.schedule.base import PipeSchedule, gc_paused
from stagewise.schedule.check import Position, ScheduleError, ScheduleFactory
from stagewise.schedule.instructions import PipeInstruction
from stagewise.schedule.kinds import Kind
from stagewise.schedule.render import TimelineEvent

__all__ = ["Costs", "SimResult", "simulate"]


@dataclass(frozen=True)
class Costs:
    """Time per pass and per transfer, in any one unit.

    The costs are for one micro-batch through one stage's whole share of the model;
    with ``k`` chunks per stage each chunk's pass takes ``1/k`` of them.

    Attributes:
        forward: one forward (``F``) of one micro-batch.
        backward_input: the input-gradient half (``I``) of a backward.
        backward_weight: the weight-gradient half (``W``); a whole backward (``B``)
            costs ``backward_input + backward_weight``.
        send: from a send's start to its message's arrival (latency + transfer).
    """

    forward: float = 1
    backward_input: float = 1
    backward_weight: float = 1
    send: float = 0

    def __post_init__(self) -> None:
        for name in ("forward", "backward_input", "backward_weight", "send"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"Costs.{name} must be a finite number >= 0, got {value!r}")

    @property
    def backward(self) -> float:
        """A whole backward: ``backward_input + backward_weight``."""
        return self.backward_input + self.backward_weight


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
        chunks: model chunks per stage; each chunk's pass took ``1 / chunks`` of
            the costs.
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
    _starts: list[list[tuple[PipeInstruction, float]]] = field(
        default_factory=list, repr=False, compare=False
    )

    @cached_property
    def events(self) -> list[TimelineEvent]:
        """The timeline, built on first use from the recorded start times."""
        cost = _pass_costs(self.costs, self.chunks)
        with gc_paused():
            return [
                TimelineEvent(stage, repr(ins), start, start + cost[_OP_OF[ins.kind]], ins.kind)
                for stage, row in enumerate(self._starts)
                for ins, start in row
            ]

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
            "costs": {
                "forward": self.costs.forward,
                "backward_input": self.costs.backward_input,
                "backward_weight": self.costs.backward_weight,
                "send": self.costs.send,
            },
        }
        if events:
            out["events"] = [[e.rank, e.name, e.start, e.end] for e in self.events]
        return out


class _Op(IntEnum):
    """What the simulator does with an instruction (see :func:`sim_op`)."""

    FORWARD = 0
    BACKWARD = 1
    BACKWARD_INPUT = 2
    BACKWARD_WEIGHT = 3
    SEND = 4  # buffered: arrives ``send`` later
    RECV = 5  # blocks until its message has arrived
    FREE = 6  # takes no time


def sim_op(kind: Kind) -> _Op:
    """The simulator's decision for one instruction kind: what it costs, how it waits.

    Every kind is decided here, ``CUSTOM`` included (free); anything else is an
    error, never a silent zero.

    Raises:
        ValueError: ``kind`` is not a :class:`~stagewise.schedule.kinds.Kind`.
    """
    if kind == Kind.FORWARD:
        return _Op.FORWARD
    if kind == Kind.BACKWARD:
        return _Op.BACKWARD
    if kind == Kind.BACKWARD_INPUT:
        return _Op.BACKWARD_INPUT
    if kind == Kind.BACKWARD_WEIGHT:
        return _Op.BACKWARD_WEIGHT
    if kind in (Kind.SEND_ACTIVATION, Kind.SEND_GRAD):
        return _Op.SEND
    if kind in (Kind.RECV_ACTIVATION, Kind.RECV_GRAD):
        return _Op.RECV
    if kind in (
        Kind.LOAD,
        Kind.REDUCE_TIED,
        Kind.REDUCE_GRADS,
        Kind.OPTIMIZER_STEP,
        Kind.CUSTOM,
    ):
        return _Op.FREE
    raise ValueError(f"the simulator has no cost for instruction kind {kind!r}")


_OP_OF = {kind: sim_op(kind) for kind in Kind}


def _pass_costs(costs: Costs, chunks: int) -> list[float]:
    """Cost of ``F``, ``B``, ``I``, ``W`` on one chunk: the stage's share over ``chunks``."""
    whole = [costs.forward, costs.backward, costs.backward_input, costs.backward_weight]
    return whole if chunks == 1 else [cost / chunks for cost in whole]


def _peers(
    stages: int, chunks: int, placement: PipeSchedule | None
) -> tuple[list[list[int]], list[list[int]]]:
    """Per stage and chunk: the stage of the previous and of the next virtual stage (-1: none)."""
    total = stages * chunks
    prev: list[list[int]] = []
    nxt: list[list[int]] = []
    for stage in range(stages):
        prev_row, next_row = [], []
        for chunk in range(chunks):
            if placement is None:
                virtual = chunk * stages + stage
                prev_row.append((virtual - 1) % stages if virtual > 0 else -1)
                next_row.append((virtual + 1) % stages if virtual < total - 1 else -1)
            else:
                before = placement.placement.prev(stage, chunk)
                after = placement.placement.next(stage, chunk)
                prev_row.append(-1 if before is None else before[0])
                next_row.append(-1 if after is None else after[0])
        prev.append(prev_row)
        nxt.append(next_row)
    return prev, nxt


def simulate(
    schedule: ScheduleFactory | Sequence[Sequence[Sequence[PipeInstruction]]],
    costs: Costs | None = None,
    *,
    micro_batches: int | None = None,
    stages: int | None = None,
    placement: PipeSchedule | None = None,
    record_events: bool = True,
    **kwargs: object,
) -> SimResult:
    """Simulate one batch of a schedule over all its stages.

    Args:
        schedule: a schedule class or factory, called as
            ``schedule(micro_batches, stages, stage_id, **kwargs)`` for every stage;
            or a table ``table[stage][step]`` of instructions already built (as
            :func:`~stagewise.schedule.check.schedule_table` returns).
        costs: the cost model; by default every pass costs 1 and sends are free.
        micro_batches: micro-batches per batch (with a factory).
        stages: pipeline stages (with a factory).
        placement: with a table, a schedule object whose ``num_chunks``,
            ``virtual_stage`` and ``locate`` place the chunks; by default chunk ``c``
            of stage ``s`` is virtual stage ``c * stages + s`` (loop placement), with
            as many chunks as the table names.
        record_events: keep one :class:`TimelineEvent` per compute pass.
        **kwargs: passed on to a factory (e.g. ``virtual_stages=2``).

    Raises:
        ScheduleError: no stage can go on (a receive whose send never comes), with
            the grid and each stuck stage's instruction marked.
        ValueError: the arguments do not fit together.
    """
    costs = costs if costs is not None else Costs()
    with gc_paused():
        table, placement = _resolve(schedule, micro_batches, stages, placement, kwargs)
        return _run(table, placement, costs, record_events)


_Table = Sequence[Sequence[Sequence[PipeInstruction]]]


def _resolve(
    schedule: ScheduleFactory | _Table,
    micro_batches: int | None,
    stages: int | None,
    placement: PipeSchedule | None,
    kwargs: dict[str, object],
) -> tuple[_Table, PipeSchedule | None]:
    """The table to simulate and the schedule object that places its chunks."""
    if callable(schedule):
        if micro_batches is None or stages is None:
            raise ValueError(
                "simulate(factory, ...) needs micro_batches= and stages=, got "
                f"micro_batches={micro_batches}, stages={stages}"
            )
        schedules = [schedule(micro_batches, stages, s, **kwargs) for s in range(stages)]
        table = [[list(step) for step in sched.steps()] for sched in schedules]
        return table, schedules[0]
    if kwargs or micro_batches is not None:
        raise ValueError(
            "simulate(table, ...) takes no schedule arguments (micro_batches, "
            f"{', '.join(kwargs) or 'kwargs'}): they belong to a factory"
        )
    if stages is not None and stages != len(schedule):
        raise ValueError(f"stages={stages} but the table has {len(schedule)} stages")
    if placement is not None and placement.stages != len(schedule):
        raise ValueError(
            f"the placement has {placement.stages} stages but the table has {len(schedule)}"
        )
    return schedule, placement


def _run(
    table: _Table, placement: PipeSchedule | None, costs: Costs, record_events: bool
) -> SimResult:
    """The event-driven simulation itself (see the module doc)."""
    num_stages = len(table)
    if num_stages == 0:
        raise ValueError("cannot simulate a table without stages")
    flats = [[ins for step in row for ins in step] for row in table]
    if placement is not None:
        chunks = placement.num_chunks
    else:
        chunks = 1 + max((getattr(ins, "chunk_id", 0) for flat in flats for ins in flat), default=0)
    training = getattr(placement, "training", None)
    if training is None:
        training = any(ins.kind.is_backward for flat in flats for ins in flat)
    prev_stage, next_stage = _peers(num_stages, chunks, placement)

    # each instruction class maps to its simulator decision once
    opcodes: dict[type, tuple[_Op, bool]] = {}
    cost_of = _pass_costs(costs, chunks)
    send_cost = costs.send
    pc = [0] * num_stages
    clock: list[float] = [0] * num_stages
    busy: list[float] = [0] * num_stages
    held = [0] * num_stages
    peak = [0] * num_stages
    # (instruction, start) per compute pass; events are made from them on demand
    starts: list[list[tuple[PipeInstruction, float]]] = [[] for _ in range(num_stages)]
    queues: dict[tuple[int, int], deque[float]] = {}  # (src, dst) -> arrival times
    waiting: dict[tuple[int, int], int] = {}  # (src, dst) -> the stage blocked on it
    ready = deque(range(num_stages))

    while ready:
        stage = ready.popleft()
        flat = flats[stage]
        prevs, nexts = prev_stage[stage], next_stage[stage]
        record = starts[stage].append if record_events else None
        now, work = clock[stage], busy[stage]
        live, top = held[stage], peak[stage]
        done = len(flat)
        for i in range(pc[stage], done):
            ins = flat[i]
            decision = opcodes.get(type(ins))
            if decision is None:
                decision = opcodes[type(ins)] = (_OP_OF[ins.kind], ins.kind.is_activation)
            op, activation = decision
            if op == _Op.FREE:
                continue
            if op <= _Op.BACKWARD_WEIGHT:  # compute
                if op == _Op.FORWARD:
                    live += 1
                    if live > top:
                        top = live
                elif op != _Op.BACKWARD_INPUT:  # a B or a W ends the micro-batch's hold
                    live -= 1
                if record is not None:
                    record((ins, now))
                cost = cost_of[op]
                now += cost
                work += cost
            elif op == _Op.SEND:  # buffered, arrives send_cost later
                chunk = ins.chunk_id  # type: ignore[attr-defined]
                link = (stage, nexts[chunk] if activation else prevs[chunk])
                queue = queues.get(link)
                if queue is None:
                    queue = queues[link] = deque()
                queue.append(now + send_cost)
                if link in waiting:
                    ready.append(waiting.pop(link))
            else:  # receive: blocks until the link's next message has arrived
                chunk = ins.chunk_id  # type: ignore[attr-defined]
                link = (prevs[chunk] if activation else nexts[chunk], stage)
                queue = queues.get(link)
                if not queue:
                    waiting[link] = stage
                    done = i
                    break
                arrival = queue.popleft()
                if arrival > now:
                    now = arrival
        pc[stage], clock[stage], busy[stage] = done, now, work
        held[stage], peak[stage] = live, top

    stuck = [stage for stage in range(num_stages) if pc[stage] < len(flats[stage])]
    if stuck:
        raise _deadlock(table, flats, pc, stuck, prev_stage, next_stage)
    if not training:  # inference frees each micro-batch's activations after its forward
        peak = [min(p, 1) for p in peak]

    makespan = max(clock)
    idle = num_stages * makespan - sum(busy)
    bubble = idle / (num_stages * makespan) if makespan > 0 else 0.0
    return SimResult(
        makespan=makespan,
        bubble_fraction=bubble,
        peak_activations=peak,
        peak_memory=[p / chunks for p in peak],
        busy=busy,
        costs=costs,
        chunks=chunks,
        _starts=starts,
    )


def _deadlock(
    table: _Table,
    flats: list[list[PipeInstruction]],
    pc: list[int],
    stuck: list[int],
    prev_stage: list[list[int]],
    next_stage: list[list[int]],
) -> ScheduleError:
    """The error for a simulation where ``stuck`` stages wait forever."""
    lines, marks = [], []
    for stage in stuck:
        ins = flats[stage][pc[stage]]
        chunk = getattr(ins, "chunk_id", 0)
        peer = prev_stage[stage][chunk] if ins.kind.is_activation else next_stage[stage][chunk]
        # the position of the stuck instruction in the table
        index = pc[stage]
        for step, row in enumerate(table[stage]):
            if index < len(row):
                marks.append(Position(stage, step, index))
                lines.append(f"  stage {stage}: {ins!r} at step {step} waits for stage {peer}")
                break
            index -= len(row)
    return ScheduleError(
        "deadlock: with buffered sends and blocking receives, no stage can go on:\n"
        + "\n".join(lines)
        + "\nreorder the steps so that every receive's send is issued before it",
        [[list(step) for step in row] for row in table],
        marks,
    )
