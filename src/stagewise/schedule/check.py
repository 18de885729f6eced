"""Check a schedule over all its stages, without processes.

A schedule is checked as a *table*: ``table[stage][step]`` is the list of
instructions that stage runs in that step (:func:`schedule_table` builds it). The
checker proves, stage by stage and then across stages, and raises
:class:`ScheduleError` at the first problem it finds, with the stage × step grid of
instruction reprs and the offending instructions marked ``>>SA3<<``:

1. *Order on each stage.* Every micro-batch passes through every virtual stage
   (model chunk) forward once and, when training, backward once: a ``B``, or an
   ``I`` then a ``W`` for a split backward, after its ``F``. An activation is
   received (``RA``) before the forward that uses it and sent (``SA``) after the
   forward that makes it; a gradient is received (``RG``) before the backward that
   uses it and sent (``SG``) after the backward that makes it; the first and the
   last virtual stage load (``L``) the micro-batch before its forward, and no other
   stage loads. Micro-batch, chunk and buffer ids are in range.
2. *Reductions.* When training, ``RDG`` and ``OPT`` come exactly once and
   ``RTG`` at most once on every stage, after all compute, ``OPT`` last; inference
   has none of them.
3. *Buffers.* A buffer (per stage and chunk) holds one micro-batch from its first
   use to its last; no other micro-batch touches it in between.
4. *Matching.* Between two stages, the k-th send is met by the k-th receive, for
   the same micro-batch, kind (activation or gradient) and virtual stage:
   activations go from virtual stage ``v`` to ``v + 1``, gradients to ``v - 1``,
   placed by the schedule's :meth:`~stagewise.schedule.base.PipeSchedule.locate`.
5. *No deadlock.* Run every stage's instructions in order, with sends buffered and
   receives blocking until the matching send was issued; ``RTG`` and ``OPT`` are
   collectives over all stages (tied weights, global-norm clipping) and wait until
   every stage reaches them. Every stage must reach its end.

Every check is linear in the number of instructions (up to numpy's sorts), so 256
stages × 2048 micro-batches take seconds.

>>> from stagewise.schedule import InferenceSchedule
>>> table = check_schedule(InferenceSchedule, micro_batches=2, stages=2)
>>> print(format_grid(table))
step    | 0     | 1         | 2
stage 0 | L0 F0 | L1 SA0 F1 | SA1
stage 1 | .     | L0 RA0 F0 | L1 RA1 F1
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate, chain, compress
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from stagewise.schedule.base import PipeSchedule, Step, gc_paused
from stagewise.schedule.instructions import BufferOpInstruction, PipeInstruction

__all__ = [
    "Position",
    "ScheduleError",
    "ScheduleFactory",
    "Table",
    "TableLike",
    "check_schedule",
    "check_table",
    "format_grid",
    "schedule_table",
]

#: ``table[stage][step]``: the instructions each stage runs in each step.
Table = list[list[Step]]
#: Any nesting of sequences where ``table[stage][step][offset]`` is an instruction.
TableLike = Sequence[Sequence[Sequence[PipeInstruction]]]
#: A schedule class, or any callable ``(micro_batches, stages, stage_id, **kwargs)``.
ScheduleFactory = Callable[..., PipeSchedule]


class Position(NamedTuple):
    """Where an instruction sits in a table: ``table[stage][step][offset]``."""

    stage: int
    step: int
    offset: int  # within the step


class ScheduleError(ValueError):
    """A schedule breaks a rule; the message shows the grid with the culprits marked.

    Attributes:
        problem: what is wrong, without the grid.
        positions: the marked instructions.
    """

    def __init__(self, problem: str, table: TableLike, marks: Iterable[Position] = ()) -> None:
        self.problem = problem
        self.positions = tuple(marks)
        super().__init__(f"{problem}\n\n{format_grid(table, self.positions)}")

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by value (errors cross process boundaries in distributed tests)."""
        return _restore_error, (str(self), self.problem, self.positions)


def _restore_error(message: str, problem: str, positions: tuple[Position, ...]) -> ScheduleError:
    """Rebuild a pickled :class:`ScheduleError` without its table."""
    error = ScheduleError.__new__(ScheduleError)
    ValueError.__init__(error, message)
    error.problem = problem
    error.positions = positions
    return error


# -- building and drawing tables ------------------------------------------------------
def schedule_table(
    schedule_cls: ScheduleFactory, micro_batches: int, stages: int, **kwargs: object
) -> Table:
    """Every stage's steps: ``schedule_cls(micro_batches, stages, stage_id, **kwargs)``.

    >>> from stagewise.schedule import TrainSchedule
    >>> schedule_table(TrainSchedule, 1, 1)
    [[[L0, F0], [B0, RTG, RDG, OPT]]]
    """
    with gc_paused():
        return [
            [list(step) for step in schedule_cls(micro_batches, stages, stage_id, **kwargs).steps()]
            for stage_id in range(stages)
        ]


def format_grid(
    table: TableLike,
    marks: Iterable[Position] = (),
    *,
    max_steps: int = 32,
    max_stages: int = 16,
) -> str:
    """Draw a table as a stage × step grid, marking instructions as ``>>SA3<<``.

    A cell lists a step's instructions by their reprs (``.`` for an empty step). A
    table wider than ``max_steps`` steps or taller than ``max_stages`` stages is cut
    to a window around the marks, and a last line says what was left out.
    """
    marks = tuple(marks)
    num_stages = len(table)
    num_steps = max((len(row) for row in table), default=0)
    marked = {(m.stage, m.step, m.offset) for m in marks}

    rows = list(range(num_stages))
    if num_stages > max_stages:
        focus = sorted({m.stage for m in marks if 0 <= m.stage < num_stages}) or [0]
        wanted: set[int] = set()
        for stage in focus:
            wanted.update(s for s in (stage - 1, stage, stage + 1) if 0 <= s < num_stages)
        rows = sorted(wanted)[:max_stages]
    first_step, last_step = 0, num_steps
    if num_steps > max_steps:
        steps = sorted(m.step for m in marks) or [0]
        lo, hi = steps[0], steps[-1]
        start = lo - (max_steps - (hi - lo + 1)) // 2 if hi - lo < max_steps else lo - 2
        first_step = max(0, min(start, num_steps - max_steps))
        last_step = first_step + max_steps

    def cell(stage: int, step: int) -> str:
        row = table[stage]
        if step >= len(row) or not row[step]:
            return "."
        return " ".join(
            f">>{ins!r}<<" if (stage, step, i) in marked else repr(ins)
            for i, ins in enumerate(row[step])
        )

    columns = range(first_step, last_step)
    lines: list[list[str]] = [["step", *(str(step) for step in columns)]]
    previous = -1
    for stage in rows:
        if previous >= 0 and stage != previous + 1:
            lines.append(["...", *("" for _ in columns)])
        lines.append([f"stage {stage}", *(cell(stage, step) for step in columns)])
        previous = stage
    widths = [max(len(line[col]) for line in lines) for col in range(len(lines[0]))]
    text = [
        " | ".join(field.ljust(width) for field, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    if len(rows) < num_stages or last_step - first_step < num_steps:
        text.append(
            f"(showing steps {first_step}..{last_step - 1} of {num_steps} and "
            f"{len(rows)} of {num_stages} stages)"
        )
    return "\n".join(text)


# -- the checker --------------------------------------------------------------------
def check_schedule(
    schedule_cls: ScheduleFactory,
    micro_batches: int,
    stages: int,
    *,
    training: bool | None = None,
    **kwargs: object,
) -> Table:
    """Build every stage of a schedule, check it (:func:`check_table`), return the table.

    Args:
        schedule_cls: the schedule class or factory, called as
            ``schedule_cls(micro_batches, stages, stage_id, **kwargs)``.
        micro_batches: micro-batches per batch.
        stages: pipeline stages.
        training: check the backward rules too; by default the schedule's own
            ``training`` attribute, else whether it has any backward instruction.
        **kwargs: passed on to ``schedule_cls``.

    Raises:
        ScheduleError: the schedule breaks a rule; the message says which and shows
            the grid.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    schedules = [schedule_cls(micro_batches, stages, s, **kwargs) for s in range(stages)]
    table = [[list(step) for step in schedule.steps()] for schedule in schedules]
    check_table(
        table,
        schedules[0],
        training=training,
        num_buffers=[schedule.num_pipe_buffers() for schedule in schedules],
    )
    return table


def check_table(
    table: TableLike,
    schedule: PipeSchedule,
    *,
    training: bool | None = None,
    num_buffers: Sequence[int] | None = None,
) -> None:
    """Check the steps of every stage of one schedule (the rules in the module doc).

    Args:
        table: ``table[stage][step]``, the instructions of each stage and step.
        schedule: any stage's schedule object; it gives the sizes
            (``micro_batches``, ``stages``, ``num_chunks``), the placement of
            chunks (``virtual_stage``/``locate``), whether it trains
            (``training``) and whether every stage holds the whole model
            (``replicated``, as in data parallelism).
        training: overrides the schedule's ``training`` attribute; when neither
            says, a table with any backward instruction is a training one.
        num_buffers: each stage's ``num_pipe_buffers()``; buffer ids must stay
            below it. Not checked when omitted.

    Raises:
        ScheduleError: the first broken rule, with the grid.
        ValueError: the table does not fit the schedule's sizes.
    """
    _Checker(table, schedule, training, num_buffers).run()


@dataclass(frozen=True)
class _Role:
    """What one chunk of one stage is in the model."""

    virtual: int
    first: bool
    last: bool
    next: tuple[int, int] | None  # (stage, chunk) of the next virtual stage
    prev: tuple[int, int] | None  # (stage, chunk) of the previous virtual stage


class _Kind(IntEnum):
    """Instruction kinds as small integers; the first nine act on a buffer."""

    LOAD = 0
    FORWARD = 1
    BACKWARD = 2
    INPUT_GRAD = 3
    WEIGHT_GRAD = 4
    SEND_ACT = 5
    RECV_ACT = 6
    SEND_GRAD = 7
    RECV_GRAD = 8
    RTG = 9
    RDG = 10
    OPT = 11


_CODE_KIND = {
    code: kind
    for kind, code in zip(
        _Kind, ("L", "F", "B", "I", "W", "SA", "RA", "SG", "RG", "RTG", "RDG", "OPT"), strict=True
    )
}
_CODE_OF = {kind: code for code, kind in _CODE_KIND.items()}
_BUFFER_KINDS = 9
_BARRIER_EVENT = {_Kind.RTG: -1, _Kind.OPT: -2}  # collectives that may span stages
_GET_MB = attrgetter("micro_batch_id")
_GET_CHUNK = attrgetter("chunk_id")
_GET_BUFFER = attrgetter("buffer_id")

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass
class _Comm:
    """One stage's sends and receives, in program order."""

    rows: Ints  # index in the stage's flat instruction list
    peer: Ints  # the stage at the other end
    message: Ints  # (kind, micro-batch, receiving virtual stage), one integer
    is_send: Bools
    barriers: Ints  # rows of the collectives that wait for every stage (RTG, OPT)
    barrier_events: Ints  # their events (see _BARRIER_EVENT)


class _Checker:
    """The state of one check: the table flattened per stage, and the placement.

    Each stage's instructions are turned into integer arrays once (kind, micro-batch,
    chunk, buffer per row), so that every rule is a few array operations; only the
    deadlock simulation walks the sends, receives and collectives one by one.
    """

    def __init__(
        self,
        table: TableLike,
        schedule: PipeSchedule,
        training: bool | None,
        num_buffers: Sequence[int] | None,
    ) -> None:
        self.stages = schedule.stages
        self.micro_batches = schedule.micro_batches
        self.chunks = schedule.num_chunks
        if len(table) != self.stages:
            raise ValueError(
                f"the table has {len(table)} stages but the schedule has "
                f"{self.stages}: pass one list of steps per stage"
            )
        if num_buffers is not None and len(num_buffers) != self.stages:
            raise ValueError(
                f"num_buffers has {len(num_buffers)} entries but the schedule has "
                f"{self.stages} stages: pass one per stage"
            )
        self.grid = table
        self.num_buffers = num_buffers
        self.flat = [list(chain.from_iterable(row)) for row in table]
        self.starts = [list(accumulate(map(len, row), initial=0)) for row in table]
        self.kind_of: dict[type, int] = {}
        self.roles = self._roles(schedule)
        self.virtual_count = (
            1 if getattr(schedule, "replicated", False) else schedule.num_virtual_stages
        )
        if training is None:
            training = getattr(schedule, "training", None)
        if training is None:
            backward_codes = {"B", "I", "W", "RG", "SG", "OPT"}
            training = any(
                getattr(cls, "code", None) in backward_codes
                for row in self.flat
                for cls in set(map(type, row))
            )
        self.training = training

    def _roles(self, schedule: PipeSchedule) -> list[list[_Role]]:
        """Each (stage, chunk)'s virtual stage and neighbours, from the schedule."""
        if getattr(schedule, "replicated", False):
            whole = _Role(virtual=0, first=True, last=True, next=None, prev=None)
            return [[whole] * self.chunks for _ in range(self.stages)]
        count = schedule.num_virtual_stages
        roles: list[list[_Role]] = []
        for stage in range(self.stages):
            row = []
            for chunk in range(self.chunks):
                virtual = schedule.virtual_stage(stage, chunk)
                if not 0 <= virtual < count or tuple(schedule.locate(virtual)) != (stage, chunk):
                    raise ValueError(
                        f"{type(schedule).__name__}: chunk {chunk} of stage {stage} is "
                        f"placed at virtual stage {virtual}, but locate({virtual}) is "
                        f"{schedule.locate(virtual)}: virtual_stage and locate must be "
                        f"inverse bijections onto 0..{count - 1}"
                    )
                row.append(
                    _Role(
                        virtual=virtual,
                        first=virtual == 0,
                        last=virtual == count - 1,
                        next=None if virtual == count - 1 else schedule.locate(virtual + 1),
                        prev=None if virtual == 0 else schedule.locate(virtual - 1),
                    )
                )
            roles.append(row)
        return roles

    # -- reporting ------------------------------------------------------------------
    def pos(self, stage: int, row: int) -> Position:
        """The position of instruction ``row`` of ``stage``'s flat list."""
        step = bisect_right(self.starts[stage], row) - 1
        return Position(stage, step, row - self.starts[stage][step])

    def where(self, stage: int, row: int) -> str:
        """``F3 at step 5`` for instruction ``row`` of ``stage``."""
        return f"{self.flat[stage][int(row)]!r} at step {self.pos(stage, int(row)).step}"

    def fail(self, problem: str, *marks: tuple[int, int]) -> ScheduleError:
        """An error marking ``(stage, row)`` pairs in the grid."""
        return ScheduleError(problem, self.grid, [self.pos(s, int(r)) for s, r in marks])

    def run(self) -> None:
        """Run every check; raise at the first problem."""
        comms = [self._check_stage(stage) for stage in range(self.stages)]
        self._check_matching(comms)
        self._check_deadlock(comms)

    # -- 1, 2, 3: one stage at a time --------------------------------------------------
    def _kinds(self, stage: int) -> Ints:
        """The kind of every instruction of ``stage``; unknown instructions fail."""
        flat = self.flat[stage]
        types = list(map(type, flat))
        for cls in set(types) - self.kind_of.keys():
            kind = _CODE_KIND.get(getattr(cls, "code", ""))
            buffered = issubclass(cls, BufferOpInstruction)
            if kind is None or buffered != (kind < _BUFFER_KINDS):
                row = types.index(cls)
                raise self.fail(
                    f"stage {stage}: the checker does not know {cls.__name__} "
                    f"({self.where(stage, row)}); teach stagewise.schedule.check about it",
                    (stage, row),
                )
            self.kind_of[cls] = kind
        return np.fromiter(map(self.kind_of.__getitem__, types), np.int64, len(types))

    def _check_stage(self, stage: int) -> _Comm:
        """Check the order rules of one stage; return its sends and receives."""
        flat = self.flat[stage]
        kinds = self._kinds(stage)
        buffered = kinds < _BUFFER_KINDS
        rows = np.flatnonzero(buffered)
        ops = list(compress(flat, buffered.tolist()))
        mb = np.fromiter(map(_GET_MB, ops), np.int64, len(ops))
        chunk = np.fromiter(map(_GET_CHUNK, ops), np.int64, len(ops))
        buffer = np.fromiter(map(_GET_BUFFER, ops), np.int64, len(ops))
        kind = kinds[rows]
        micro_batches, chunks = self.micro_batches, self.chunks

        bad = np.flatnonzero((mb < 0) | (mb >= micro_batches))
        if bad.size:
            row = rows[bad[0]]
            raise self.fail(
                f"stage {stage}: {self.where(stage, row)} names micro-batch {mb[bad[0]]}, "
                f"but the batch has micro-batches 0..{micro_batches - 1}",
                (stage, row),
            )
        bad = np.flatnonzero(chunk >= chunks)
        if bad.size:
            row = rows[bad[0]]
            raise self.fail(
                f"stage {stage}: {self.where(stage, row)} names chunk {chunk[bad[0]]}, but "
                f"the schedule places {chunks} chunk(s) per stage",
                (stage, row),
            )
        if self.num_buffers is not None:
            limit = self.num_buffers[stage]
            bad = np.flatnonzero(buffer >= limit)
            if bad.size:
                row = rows[bad[0]]
                raise self.fail(
                    f"stage {stage}: {self.where(stage, row)} uses buffer {buffer[bad[0]]}, "
                    f"but num_pipe_buffers() is {limit}: raise num_pipe_buffers() or "
                    f"reuse a lower buffer",
                    (stage, row),
                )

        # Where each (kind, chunk, micro-batch) runs; all but loads run once.
        is_load = kind == _Kind.LOAD
        once = ~is_load
        key = (kind[once] * chunks + chunk[once]) * micro_batches + mb[once]
        once_rows = rows[once]
        first_at = np.full(_BUFFER_KINDS * chunks * micro_batches, -1, np.int64)
        first_at[key[::-1]] = once_rows[::-1]  # the earliest row wins
        repeats = np.flatnonzero(first_at[key] != once_rows)
        if repeats.size:
            again = once_rows[repeats[0]]
            before = first_at[key[repeats[0]]]
            code = _CODE_OF[_Kind(int(kind[once][repeats[0]]))]
            raise self.fail(
                f"stage {stage}: {self.where(stage, before)} and again "
                f"{self.where(stage, again)}: each micro-batch runs {code} once per chunk",
                (stage, before),
                (stage, again),
            )
        at = first_at.reshape(_BUFFER_KINDS, chunks, micro_batches)
        loads = np.full(micro_batches, -1, np.int64)
        loads[mb[is_load][::-1]] = rows[is_load][::-1]  # each micro-batch's first load
        self._check_order(stage, at, loads)
        load_counts = np.bincount(mb[is_load], minlength=micro_batches)
        self._check_load_counts(stage, load_counts, rows[is_load], mb[is_load])
        compute = (kinds >= _Kind.FORWARD) & (kinds <= _Kind.WEIGHT_GRAD)
        last_compute = int(np.flatnonzero(compute)[-1]) if compute.any() else -1
        self._check_reductions(stage, kinds, last_compute)
        self._check_buffers(stage, rows, mb, chunk, buffer)

        comm = kind >= _Kind.SEND_ACT
        return self._comm(stage, rows[comm], kind[comm], chunk[comm], mb[comm], kinds)

    def _check_order(self, stage: int, at: Ints, loads: Ints) -> None:
        """Forward, backward, exchanges and loads of every micro-batch, in order.

        ``at[kind, chunk, mb]`` is the row of that instruction (-1 when absent) and
        ``loads[mb]`` the row of the micro-batch's first load.
        """
        roles = self.roles[stage]
        first = np.array([[role.first] for role in roles])  # (chunks, 1)
        last = np.array([[role.last] for role in roles])
        forward = at[_Kind.FORWARD]

        def locate(mask: Bools) -> tuple[int, int, str] | None:
            hits = np.flatnonzero(mask)
            if not hits.size:
                return None
            chunk, mb = divmod(int(hits[0]), self.micro_batches)
            tag = f"{mb}c{chunk}" if chunk else f"{mb}"
            return chunk, mb, tag

        def where(chunk: int) -> str:
            return f"stage {stage} (virtual stage {roles[chunk].virtual})"

        def need(kind: _Kind, expected: Bools, missing: str, extra: str) -> Ints:
            rows = at[kind]
            code = _CODE_OF[kind]
            hit = locate(expected & (rows < 0))
            if hit is not None:
                chunk, mb, tag = hit
                raise self.fail(
                    f"{where(chunk)} has no {code}{tag}: {missing}", (stage, forward[chunk, mb])
                )
            hit = locate(~expected & (rows >= 0))
            if hit is not None:
                chunk, mb, _ = hit
                raise self.fail(
                    f"{where(chunk)}: {self.where(stage, rows[chunk, mb])} is out of place: "
                    f"{extra}",
                    (stage, rows[chunk, mb]),
                )
            return rows

        def before(earlier: Ints, later: Ints, rule: str) -> None:
            hit = locate((earlier >= 0) & (later >= 0) & (earlier > later))
            if hit is not None:
                chunk, mb, _ = hit
                a, b = earlier[chunk, mb], later[chunk, mb]
                raise self.fail(
                    f"{where(chunk)}: {self.where(stage, a)} comes after "
                    f"{self.where(stage, b)}: {rule}",
                    (stage, a),
                    (stage, b),
                )

        everywhere = np.ones_like(forward, dtype=bool)
        hit = locate(forward < 0)
        if hit is not None:
            chunk, _, tag = hit
            raise self.fail(
                f"{where(chunk)} never runs F{tag}: every micro-batch must pass forward "
                f"through every virtual stage once"
            )
        recv = need(
            _Kind.RECV_ACT,
            ~first & everywhere,
            "every virtual stage but the first receives its input",
            "the first virtual stage receives no activation",
        )
        before(recv, forward, "an activation is received before the forward that uses it")
        loaded = (first | last) & everywhere
        hit = locate(loaded & (loads[None, :] < 0))
        if hit is not None:
            chunk, mb, _ = hit
            raise self.fail(
                f"{where(chunk)} never loads micro-batch {mb}: the first and the last "
                f"virtual stage load each micro-batch (inputs, labels) before its forward",
                (stage, forward[chunk, mb]),
            )
        before(
            np.where(loaded, loads[None, :], -1),
            forward,
            "a micro-batch is loaded before its forward",
        )
        send = need(
            _Kind.SEND_ACT,
            ~last & everywhere,
            "every virtual stage but the last sends its output on",
            "the last virtual stage sends no activation",
        )
        before(forward, send, "an activation is sent after the forward that makes it")

        if not self.training:
            for kind in (
                _Kind.BACKWARD,
                _Kind.INPUT_GRAD,
                _Kind.WEIGHT_GRAD,
                _Kind.RECV_GRAD,
                _Kind.SEND_GRAD,
            ):
                need(kind, ~everywhere, "", "an inference schedule has no backward")
            return
        whole, split_input, split_weight = (
            at[_Kind.BACKWARD],
            at[_Kind.INPUT_GRAD],
            at[_Kind.WEIGHT_GRAD],
        )
        hit = locate((whole >= 0) & ((split_input >= 0) | (split_weight >= 0)))
        if hit is not None:
            chunk, mb, _ = hit
            other = max(split_input[chunk, mb], split_weight[chunk, mb])
            raise self.fail(
                f"{where(chunk)} runs both {self.where(stage, whole[chunk, mb])} and "
                f"{self.where(stage, other)}: a micro-batch's backward is one B, or an I "
                f"and a W",
                (stage, whole[chunk, mb]),
                (stage, other),
            )
        hit = locate((whole < 0) & ((split_input < 0) | (split_weight < 0)))
        if hit is not None:
            chunk, mb, tag = hit
            has_input, has_weight = split_input[chunk, mb] >= 0, split_weight[chunk, mb] >= 0
            missing = "W" if has_input else "I" if has_weight else "B"
            raise self.fail(
                f"{where(chunk)} never runs {missing}{tag}: every micro-batch must pass "
                f"backward through every virtual stage once (a B, or an I then a W)",
                (stage, forward[chunk, mb]),
            )
        backward = np.where(whole >= 0, whole, split_input)
        before(forward, backward, "a micro-batch's forward runs before its backward")
        before(
            split_input,
            split_weight,
            "the input gradient (I) runs before the weight gradient (W)",
        )
        recv_grad = need(
            _Kind.RECV_GRAD,
            ~last & everywhere,
            "every virtual stage but the last receives its output's gradient",
            "the last virtual stage receives no gradient",
        )
        before(recv_grad, backward, "a gradient is received before the backward that uses it")
        send_grad = need(
            _Kind.SEND_GRAD,
            ~first & everywhere,
            "every virtual stage but the first sends its input's gradient back",
            "the first virtual stage sends no gradient",
        )
        before(backward, send_grad, "a gradient is sent after the backward that makes it")

    def _check_load_counts(self, stage: int, counts: Ints, rows: Ints, mbs: Ints) -> None:
        """Loads only on the first and last virtual stages, once per such stage held."""
        allowed = sum(1 for role in self.roles[stage] if role.first or role.last)
        over = np.flatnonzero(counts > allowed)
        if not over.size:
            return
        mb = int(over[0])
        indices = rows[mbs == mb]
        holds = (
            "neither the first nor the last virtual stage"
            if allowed == 0
            else f"{allowed} of the first and last virtual stages"
        )
        raise self.fail(
            f"stage {stage} loads micro-batch {mb} {len(indices)} time(s) but holds "
            f"{holds}: load once per first or last virtual stage held",
            *((stage, i) for i in indices),
        )

    def _check_reductions(self, stage: int, kinds: Ints, last_compute: int) -> None:
        """RTG at most once, RDG and OPT exactly once, after all compute, OPT last."""
        found: dict[_Kind, list[int]] = {}
        for row in np.flatnonzero(kinds >= _Kind.RTG).tolist():
            found.setdefault(_Kind(int(kinds[row])), []).append(row)
        if not self.training:
            for rows in found.values():
                raise self.fail(
                    f"stage {stage}: {self.where(stage, rows[0])} in an inference "
                    f"schedule: only training reduces gradients and steps the optimizer",
                    (stage, rows[0]),
                )
            return
        for kind in (_Kind.RTG, _Kind.RDG, _Kind.OPT):
            rows = found.get(kind, [])
            code = _CODE_OF[kind]
            if len(rows) > 1:
                raise self.fail(
                    f"stage {stage} runs {code} {len(rows)} times (steps "
                    f"{', '.join(str(self.pos(stage, row).step) for row in rows)}): it "
                    f"belongs once, at the end of the batch",
                    *((stage, row) for row in rows),
                )
            if not rows and kind != _Kind.RTG:
                what = "RDG (reduce gradients)" if kind == _Kind.RDG else "OPT (optimizer step)"
                raise self.fail(
                    f"stage {stage} never runs {code}: a training schedule ends with {what} "
                    f"on every stage"
                )
            if rows and rows[0] < last_compute:
                raise self.fail(
                    f"stage {stage}: {self.where(stage, rows[0])} comes before "
                    f"{self.where(stage, last_compute)}: reductions and the optimizer step "
                    f"come after all compute",
                    (stage, rows[0]),
                    (stage, last_compute),
                )
        step = found[_Kind.OPT][0]
        for kind in (_Kind.RTG, _Kind.RDG):
            for row in found.get(kind, []):
                if row > step:
                    raise self.fail(
                        f"stage {stage}: {self.where(stage, row)} comes after "
                        f"{self.where(stage, step)}: gradients are reduced before the "
                        f"optimizer step",
                        (stage, row),
                        (stage, step),
                    )

    def _check_buffers(self, stage: int, rows: Ints, mb: Ints, chunk: Ints, buffer: Ints) -> None:
        """No micro-batch touches a buffer (per chunk) that another one still needs."""
        if not rows.size:
            return
        micro_batches = self.micro_batches
        last_use = np.full(self.chunks * micro_batches, -1, np.int64)
        last_use[chunk * micro_batches + mb] = rows  # the latest row wins
        order = np.lexsort((rows, buffer, chunk))  # each buffer's users in program order
        r, m, c, b = rows[order], mb[order], chunk[order], buffer[order]
        handover = (c[1:] == c[:-1]) & (b[1:] == b[:-1]) & (m[1:] != m[:-1])
        early = handover & (last_use[c[:-1] * micro_batches + m[:-1]] > r[1:])
        bad = np.flatnonzero(early)
        if not bad.size:
            return
        first_bad = bad[np.argmin(r[1:][bad])]
        row, holder = r[1:][first_bad], int(m[:-1][first_bad])
        pending = last_use[c[:-1][first_bad] * micro_batches + holder]
        raise self.fail(
            f"stage {stage}: {self.where(stage, row)} uses buffer {b[1:][first_bad]} while "
            f"micro-batch {holder} still needs it (until {self.where(stage, pending)}): give "
            f"it another buffer or move it after that",
            (stage, row),
            (stage, pending),
        )

    # -- 4: matching sends and receives ----------------------------------------------
    def _comm(
        self, stage: int, rows: Ints, kind: Ints, chunk: Ints, mb: Ints, kinds: Ints
    ) -> _Comm:
        """Peers and messages of one stage's sends and receives.

        A message is ``(gradient?, receiving virtual stage, micro-batch)`` as one
        integer, the same at both ends. Sends and receives past either end of the
        model were ruled out by :meth:`_check_order`.
        """
        peer_of = np.full((4, self.chunks), -1, np.int64)
        receiver_of = np.full((4, self.chunks), -1, np.int64)
        for c, role in enumerate(self.roles[stage]):
            nxt = -1 if role.next is None else role.next[0]
            prv = -1 if role.prev is None else role.prev[0]
            peer_of[:, c] = (nxt, prv, prv, nxt)  # SA, RA, SG, RG
            receiver_of[:, c] = (role.virtual + 1, role.virtual, role.virtual - 1, role.virtual)
        slot = kind - _Kind.SEND_ACT
        is_grad = slot >= 2
        message = (
            is_grad * self.virtual_count + receiver_of[slot, chunk]
        ) * self.micro_batches + mb
        barriers = np.flatnonzero((kinds == _Kind.RTG) | (kinds == _Kind.OPT))
        events = np.where(
            kinds[barriers] == _Kind.RTG, _BARRIER_EVENT[_Kind.RTG], _BARRIER_EVENT[_Kind.OPT]
        )
        return _Comm(rows, peer_of[slot, chunk], message, slot % 2 == 0, barriers, events)

    def _check_matching(self, comms: list[_Comm]) -> None:
        """Between two stages, the k-th send meets the k-th receive."""
        sends: dict[tuple[int, int], Ints] = {}
        recvs: dict[tuple[int, int], Ints] = {}
        for stage, comm in enumerate(comms):
            for peer in np.unique(comm.peer).tolist():
                to_peer = comm.peer == peer
                sends[stage, peer] = np.flatnonzero(to_peer & comm.is_send)
                recvs[peer, stage] = np.flatnonzero(to_peer & ~comm.is_send)
        for link in sorted(sends.keys() | recvs.keys()):
            src, dst = link
            out = sends.get(link, np.zeros(0, np.int64))
            into = recvs.get(link, np.zeros(0, np.int64))
            n = min(len(out), len(into))
            sent = comms[src].message[out[:n]]
            wanted = comms[dst].message[into[:n]]
            differ = np.flatnonzero(sent != wanted)
            if differ.size:
                k = int(differ[0])
                i, j = comms[src].rows[out[k]], comms[dst].rows[into[k]]
                raise self.fail(
                    f"stage {src} sends {self.where(src, i)} as its message #{k + 1} to "
                    f"stage {dst}, but stage {dst}'s receive #{k + 1} from stage {src} is "
                    f"{self.where(dst, j)}: between two stages, sends and receives must "
                    f"come in the same order",
                    (src, i),
                    (dst, j),
                )
            if len(out) > n:
                i = comms[src].rows[out[n]]
                raise self.fail(
                    f"stage {src}: {self.where(src, i)} has no matching receive on stage "
                    f"{dst} ({len(out)} sends, {len(into)} receives)",
                    (src, i),
                )
            if len(into) > n:
                j = comms[dst].rows[into[n]]
                raise self.fail(
                    f"stage {dst}: {self.where(dst, j)} has no matching send on stage "
                    f"{src} ({len(out)} sends, {len(into)} receives)",
                    (dst, j),
                )

    # -- 5: deadlock freedom ----------------------------------------------------------
    def _events(self, comms: list[_Comm]) -> tuple[list[list[int]], list[Ints]]:
        """Each stage's sends, receives and collectives as integers, in program order.

        ``2 * link + 1`` is a send on ``link`` (a dense id of a (from, to) pair of
        stages), ``2 * link`` a receive, and a negative number a collective
        (:data:`_BARRIER_EVENT`). Also returns the row of each event.
        """
        pairs = [
            np.where(comm.is_send, stage * self.stages + comm.peer, comm.peer * self.stages + stage)
            for stage, comm in enumerate(comms)
        ]
        every = np.concatenate([np.zeros(0, np.int64), *pairs])
        dense = np.unique(every, return_inverse=True)[1].reshape(-1)
        offsets = list(accumulate(map(len, pairs), initial=0))
        events: list[list[int]] = []
        event_rows: list[Ints] = []
        for stage, comm in enumerate(comms):
            link = dense[offsets[stage] : offsets[stage + 1]]
            rows = np.concatenate([comm.rows, comm.barriers])
            codes = np.concatenate([2 * link + comm.is_send, comm.barrier_events])
            order = np.argsort(rows, kind="stable")
            events.append(codes[order].tolist())
            event_rows.append(rows[order])
        return events, event_rows

    def _check_deadlock(self, comms: list[_Comm]) -> None:
        """Run all stages: buffered sends, blocking receives, barrier collectives."""
        stages = self.stages
        events, event_rows = self._events(comms)
        links = 1 + max((max(e) // 2 for e in events if e), default=0)
        credit = [0] * links  # sends issued on each link and not yet received
        waiting = [-1] * links  # the stage blocked on each link's next receive
        arrived: dict[tuple[int, int], list[int]] = {}  # (event, k) -> stages there
        passed = [[0, 0] for _ in range(stages)]  # collectives passed, per event
        blocked_at: dict[int, tuple[int, int]] = {}
        pc = [0] * stages
        ready = deque(range(stages))
        while ready:
            stage = ready.popleft()
            todo = events[stage]
            i, end = pc[stage], len(todo)
            while i < end:
                event = todo[i]
                if event >= 0:
                    link = event >> 1
                    if event & 1:
                        credit[link] += 1
                        woken = waiting[link]
                        if woken >= 0:
                            waiting[link] = -1
                            ready.append(woken)
                    elif credit[link]:
                        credit[link] -= 1
                    else:
                        waiting[link] = stage
                        break
                else:
                    key = (event, passed[stage][-1 - event])
                    there = arrived.setdefault(key, [])
                    there.append(stage)
                    if len(there) < stages:
                        blocked_at[stage] = key
                        break
                    for other in there:
                        passed[other][-1 - event] += 1
                        if other != stage:
                            del blocked_at[other]
                            pc[other] += 1
                            ready.append(other)
                i += 1
            pc[stage] = i
        stuck = [stage for stage in range(stages) if pc[stage] < len(events[stage])]
        if not stuck:
            return
        lines = []
        for stage in range(stages):
            if stage not in stuck:
                lines.append(f"  stage {stage}: finished")
                continue
            row = int(event_rows[stage][pc[stage]])
            if stage in blocked_at:
                missing = [s for s in range(stages) if s not in arrived[blocked_at[stage]]]
                reason = f"waits for stages {missing} to reach it (a collective)"
            else:
                reason = (
                    f"waits for stage {comms[stage].peer[comms[stage].rows == row][0]} to send it"
                )
            lines.append(f"  stage {stage}: {self.where(stage, row)} {reason}")
        raise self.fail(
            "deadlock: with buffered sends and blocking receives, no stage can go on:\n"
            + "\n".join(lines)
            + "\nreorder the steps so that every receive's send is issued before it",
            *((stage, event_rows[stage][pc[stage]]) for stage in stuck),
        )
