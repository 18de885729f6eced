"""The base of every schedule written as an order of passes (GPipe, interleaved, ZB, DualPipeV).

Most schedules are easiest to read as the *order of the passes* each stage runs:
forwards ``F``, whole backwards ``B``, and for zero-bubble schedules the
input-gradient half ``I`` and the deferred weight-gradient half ``W``. Everything
else follows from that order by one rule, written once in
:class:`PassOrderSchedule`:

* a pass's *output* leaves right after it: ``SA`` after an ``F`` (unless its
  virtual stage is the last), ``SG`` after a ``B`` or ``I`` (unless it is the
  first); the engine sends asynchronously, so a send never waits;
* a pass's *input* is received right before it: ``RA`` before an ``F``, ``RG``
  before a ``B`` or ``I``; the first and the last virtual stage load (``L``) the
  micro-batch before its forward, with the chunk id of that chunk;
* between two stages, messages are received in the order they were sent (the
  checker's rule, and what point-to-point transport gives). When a pass needs a
  message that its sender sent *after* others still waiting on the same link, the
  earlier ones are received first, in the same step. Those were sent before the
  needed one, so receiving them early never waits longer and never deadlocks;
* a buffer (per chunk) is taken by a micro-batch at its first instruction and
  freed after its last (its ``B``, or its ``W``, or the ``SG`` after its ``I``).
  When a chunk's micro-batches leave in the order they came (every schedule here),
  the k-th to come takes buffer ``k mod P``, ``P`` the most it holds at once
  (DeepSpeed's rule, ``buffer = micro-batch % buffers``); otherwise each takes the
  lowest buffer free. Either way ``num_pipe_buffers()`` is the most micro-batches
  a chunk holds at once;
* one step per pass; the last step ends with ``RTG``, ``RDG``, ``OPT``.

A transfer between two chunks of the same stage (the turn of a V placement) is a
send and a receive like any other, on the link from the stage to itself; the engine
moves it locally.

The rule works on arrays (:class:`PassArrays`, a stage's passes as kind,
micro-batch and chunk), so a schedule of millions of instructions is laid out in
a few numpy operations per stage; a subclass gives its order either as
:meth:`~PassOrderSchedule.pass_order` (``Pass`` values) or as
:meth:`~PassOrderSchedule.pass_arrays`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, NamedTuple

import numpy as np

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.kinds import Kind, kind_mask
from stagewise.schedule.program import Ints, StageProgram

__all__ = ["Pass", "PassArrays", "PassOrderSchedule", "pass_kind"]


class Pass(NamedTuple):
    """One compute pass in a stage's order: ``kind`` is ``"F"``, ``"B"``, ``"I"`` or ``"W"``."""

    kind: str
    micro_batch: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro_batch}" + (f"c{self.chunk}" if self.chunk else "")


class PassArrays(NamedTuple):
    """A stage's passes in order as arrays: kind values, micro-batches, chunks."""

    kind: Ints
    micro_batch: Ints
    chunk: Ints

    @classmethod
    def of(cls, passes: Sequence[tuple[str | Kind, int, int]]) -> PassArrays:
        """From ``(kind, micro-batch, chunk)`` tuples (``Pass`` values)."""
        kinds = {text: pass_kind(text) for text in {p[0] for p in passes}}
        return cls(
            np.array([kinds[p[0]] for p in passes], np.int64),
            np.array([p[1] for p in passes], np.int64),
            np.array([p[2] for p in passes], np.int64),
        )


def pass_kind(text: str | Kind) -> Kind:
    """The compute kind a :class:`Pass` names (``"F"``, ``"B"``, ``"I"``, ``"W"`` or the Kind).

    Raises:
        ValueError: any other text or kind.
    """
    if isinstance(text, Kind):
        kind = text
    else:
        try:
            kind = Kind.from_code(text)
        except ValueError:
            kind = Kind.CUSTOM
    if not kind.is_compute:
        codes = ", ".join(repr(k.code) for k in Kind if k.is_compute)
        raise ValueError(f"unknown pass kind {text!r} in pass_order(); use {codes}")
    return kind


_CLOSING = (Kind.REDUCE_TIED, Kind.REDUCE_GRADS, Kind.OPTIMIZER_STEP)
_MAKES_INPUT_GRAD = kind_mask("makes_input_grad")


class PassOrderSchedule(PipeSchedule):
    """A training schedule given by the order of passes on each stage.

    Subclasses implement :meth:`pass_order` (or :meth:`pass_arrays`) for *any*
    stage (a stage's receives depend on the order its neighbours send in); the
    communication, loads, buffers and the closing reductions follow by the rules in
    the module doc.
    """

    training: ClassVar[bool] = True

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        super().__init__(micro_batches, stages, stage_id)
        self._program: StageProgram | None = None
        self._num_buffers = 0

    # -- the order, two ways --------------------------------------------------------
    def pass_order(self, stage_id: int) -> Iterator[Pass]:
        """Yield the passes that ``stage_id`` runs, in order (by default from :meth:`pass_arrays`)."""
        if type(self).pass_arrays is PassOrderSchedule.pass_arrays:
            raise TypeError(
                f"{type(self).__name__} implements neither pass_order() nor pass_arrays()"
            )
        kind, mb, chunk = self.pass_arrays(stage_id)
        codes = [k.code for k in Kind]
        for k, m, c in zip(kind.tolist(), mb.tolist(), chunk.tolist(), strict=True):
            yield Pass(str(codes[k]), m, c)

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """The passes of ``stage_id`` as arrays (by default from :meth:`pass_order`)."""
        if type(self).pass_order is PassOrderSchedule.pass_order:
            raise TypeError(
                f"{type(self).__name__} implements neither pass_order() nor pass_arrays()"
            )
        return PassArrays.of(list(self.pass_order(stage_id)))

    # -- the rule ------------------------------------------------------------------
    def build_program(self) -> StageProgram:
        """This stage's steps as arrays, one per pass with its transfers around it (built once)."""
        if self._program is None:
            cache: dict[int, PassArrays] = {}

            def orders(stage: int) -> PassArrays:
                if stage not in cache:
                    cache[stage] = self._checked(self.pass_arrays(stage), stage)
                return cache[stage]

            self._program, self._num_buffers = self._build(orders)
        return self._program

    @classmethod
    def programs_of(cls, schedules: Sequence[PipeSchedule]) -> list[StageProgram]:
        """The programs of every stage of one schedule, each stage's passes made once."""
        if not all(isinstance(s, PassOrderSchedule) for s in schedules):
            return [schedule.program() for schedule in schedules]
        own: list[PassOrderSchedule] = list(schedules)  # type: ignore[arg-type]
        cache: dict[int, PassArrays] = {}

        def orders(stage: int) -> PassArrays:
            if stage not in cache:
                cache[stage] = own[stage]._checked(own[stage].pass_arrays(stage), stage)
            return cache[stage]

        for schedule in own:
            if schedule._program is None:
                schedule._program, schedule._num_buffers = schedule._build(orders)
        return [schedule.program() for schedule in own]

    def num_pipe_buffers(self) -> int:
        """The most micro-batches that one chunk of this stage holds at once."""
        self.build_program()
        return self._num_buffers

    def _build(self, orders: Callable[[int], PassArrays]) -> tuple[StageProgram, int]:
        """This stage's program and buffer count, from the pass orders of the stages."""
        placement = self.placement
        stage, chunks, micro_batches = self.stage_id, placement.chunks, self.micro_batches
        last = placement.num_virtual_stages - 1
        kind, mb, chunk = orders(stage)  # checked
        virtual = np.array(placement.virtual_stages_of(stage), np.int64)[chunk]
        forward = kind == Kind.FORWARD
        makes_grad = _MAKES_INPUT_GRAD[kind]
        needs_act = forward & (virtual > 0)
        needs_grad = makes_grad & (virtual < last)
        loads = forward & ((virtual == 0) | (virtual == last))
        sends = (forward & (virtual < last)) | (makes_grad & (virtual > 0))
        # the stage each chunk receives activations from, and gradients from
        act_src = np.array([_stage(placement.prev(stage, c)) for c in range(chunks)], np.int64)
        grad_src = np.array([_stage(placement.next(stage, c)) for c in range(chunks)], np.int64)
        source = np.where(needs_act, act_src[chunk], np.where(needs_grad, grad_src[chunk], -1))

        passes = len(kind)
        received = np.zeros(passes, np.int64)
        pieces = []  # receives: (pass index, rank in its step, kind, micro-batch, chunk)
        for src in np.unique(source[source >= 0]).tolist():
            users = np.flatnonzero(source == src)
            is_grad, dst_chunk, msg_mb = self._link(src, orders(src))
            order_of = np.full(2 * chunks * micro_batches, -1, np.int64)
            order_of[(is_grad * chunks + dst_chunk) * micro_batches + msg_mb] = np.arange(
                len(msg_mb)
            )
            wanted = needs_grad[users].astype(np.int64)
            need = order_of[(wanted * chunks + chunk[users]) * micro_batches + mb[users]]
            if np.any(need < 0):
                j = users[np.flatnonzero(need < 0)[0]]
                what = "gradient" if needs_grad[j] else "activation"
                raise ValueError(
                    f"{type(self).__name__}: stage {stage} needs the {what} of micro-batch "
                    f"{mb[j]} for chunk {chunk[j]} from stage {src}, which never sends it: "
                    f"pass_order() must run every pass of the batch on every stage"
                )
            taken = np.maximum.accumulate(need + 1)  # messages received once users[j] ran
            before = np.concatenate([np.zeros(1, np.int64), taken[:-1]])
            counts = taken - before
            received[users] += counts
            at = np.repeat(np.arange(len(users)), counts)  # the message q is taken at users[at[q]]
            q = np.arange(int(taken[-1]))
            recv_kind = np.where(is_grad[q] == 1, Kind.RECV_GRAD, Kind.RECV_ACTIVATION)
            pieces.append((users[at], q - before[at], recv_kind, msg_mb[q], dst_chunk[q]))

        per_pass = received + loads + 1 + sends
        start = np.cumsum(per_pass) - per_pass
        total = int(per_pass.sum()) + (len(_CLOSING) if passes else 0)
        out_kind = np.empty(total, np.int8)
        out_mb = np.full(total, -1, np.int32)
        out_chunk = np.full(total, -1, np.int32)
        for pass_index, rank, recv_kind, recv_mb, recv_chunk in pieces:
            rows = start[pass_index] + rank
            out_kind[rows], out_mb[rows], out_chunk[rows] = recv_kind, recv_mb, recv_chunk
        rows = (start + received)[loads]
        out_kind[rows], out_mb[rows], out_chunk[rows] = Kind.LOAD, mb[loads], chunk[loads]
        compute = start + received + loads
        out_kind[compute], out_mb[compute], out_chunk[compute] = kind, mb, chunk
        rows = compute[sends] + 1
        out_kind[rows] = np.where(forward[sends], Kind.SEND_ACTIVATION, Kind.SEND_GRAD)
        out_mb[rows], out_chunk[rows] = mb[sends], chunk[sends]
        out_step = np.repeat(np.arange(passes, dtype=np.int32), per_pass)
        if passes:
            out_kind[-len(_CLOSING) :] = _CLOSING
            out_step = np.concatenate([out_step, np.full(len(_CLOSING), passes - 1, np.int32)])
        body = total - (len(_CLOSING) if passes else 0)
        out_buffer = np.full(total, -1, np.int32)
        out_buffer[:body], num_buffers = _assign_buffers(
            out_chunk[:body], out_mb[:body], chunks, micro_batches
        )
        program = StageProgram.built(out_kind, out_mb, out_chunk, out_buffer, out_step, passes)
        return program, num_buffers

    def _checked(self, order: PassArrays, stage: int) -> PassArrays:
        """The pass arrays, with kinds, chunks and micro-batches in range."""
        kind, mb, chunk = (np.asarray(a, np.int64) for a in order)
        if not kind.size:
            return PassArrays(kind, mb, chunk)
        compute = kind_mask("is_compute")
        if kind.min() < 0 or kind.max() >= len(Kind) or not compute[kind].all():
            wrong = (kind < 0) | (kind >= len(Kind))
            wrong |= ~compute[np.clip(kind, 0, len(Kind) - 1)]
            j = int(np.flatnonzero(wrong)[0])
            codes = ", ".join(repr(k.code) for k in Kind if k.is_compute)
            raise ValueError(
                f"{type(self).__name__}: unknown pass kind {kind[j]!r} in pass_order(); use {codes}"
            )
        for name, values, size in (
            ("chunk", chunk, self.num_chunks),
            ("micro-batch", mb, self.micro_batches),
        ):
            if values.min() < 0 or values.max() >= size:
                j = int(np.flatnonzero((values < 0) | (values >= size))[0])
                raise ValueError(
                    f"{type(self).__name__}: pass {j} of stage {stage} names "
                    f"{name} {values[j]}, outside 0..{size - 1}"
                )
        return PassArrays(kind, mb, chunk)

    def _link(self, src: int, order: PassArrays) -> tuple[Ints, Ints, Ints]:
        """The messages ``src`` sends this stage, in its order: gradient?, receiving chunk, micro-batch."""
        placement, dst = self.placement, self.stage_id
        act_to, grad_to = [], []  # per chunk of src: the chunk of dst it sends to, or -1
        for c in range(placement.chunks):
            peer = placement.next(src, c)
            act_to.append(peer[1] if peer is not None and peer[0] == dst else -1)
            peer = placement.prev(src, c)
            grad_to.append(peer[1] if peer is not None and peer[0] == dst else -1)
        kind, mb, chunk = order  # checked
        to_act = np.array(act_to, np.int64)[chunk]
        to_grad = np.array(grad_to, np.int64)[chunk]
        is_act = (kind == Kind.FORWARD) & (to_act >= 0)
        is_grad = _MAKES_INPUT_GRAD[kind] & (to_grad >= 0)
        sent = is_act | is_grad
        return is_grad[sent].astype(np.int64), np.where(is_act, to_act, to_grad)[sent], mb[sent]


def _stage(where: tuple[int, int] | None) -> int:
    return -1 if where is None else where[0]


def _assign_buffers(chunk: Ints, mb: Ints, chunks: int, micro_batches: int) -> tuple[Ints, int]:
    """Each row's buffer (see the module doc), and the most any chunk needs."""
    rows = np.arange(len(chunk))
    key = chunk * micro_batches + mb
    first = np.full(chunks * micro_batches, -1, np.int64)
    first[key[::-1]] = rows[::-1]
    last = np.full(chunks * micro_batches, -1, np.int64)
    last[key] = rows
    buffer_of = np.full(chunks * micro_batches, -1, np.int64)
    most = 0
    for c in range(chunks):
        held = np.flatnonzero(first[c * micro_batches : (c + 1) * micro_batches] >= 0)
        if not held.size:
            continue
        keys = c * micro_batches + held
        arrival = keys[np.argsort(first[keys], kind="stable")]
        leave = last[arrival]
        if np.all(np.diff(leave) > 0):  # they leave in the order they came
            # when the i-th comes, the i before it are held but for those already gone
            held_then = np.arange(1, len(arrival) + 1) - np.searchsorted(leave, first[arrival])
            size = int(held_then.max())
            buffer_of[arrival] = np.arange(len(arrival)) % size
        else:
            size = _lowest_free(arrival, first, last, buffer_of)
        most = max(most, size)
    return buffer_of[key], most


def _lowest_free(arrival: Ints, first: Ints, last: Ints, buffer_of: Ints) -> int:
    """Give each key (in arrival order) the lowest buffer free at its first row."""
    leaving: list[tuple[int, int]] = []  # (last row, buffer) of the keys holding one
    free: list[int] = []
    size = 0
    for key in arrival.tolist():
        begin = int(first[key])
        while leaving and leaving[0][0] < begin:
            heapq.heappush(free, heapq.heappop(leaving)[1])
        buffer = heapq.heappop(free) if free else size
        size = max(size, buffer + 1)
        buffer_of[key] = buffer
        heapq.heappush(leaving, (int(last[key]), buffer))
    return size
