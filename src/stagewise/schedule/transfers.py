"""Who sends what to whom: every transfer of a program, and which send meets which receive.

Between two stages messages are taken in the order they were sent: on each *link*
(an ordered pair of stages, a stage to itself included), the k-th send meets the
k-th receive. A transfer's peer comes from the placement: an activation goes from
virtual stage ``v`` to ``v + 1``, a gradient from ``v`` to ``v - 1``. Its
*message* is ``(gradient?, receiving virtual stage, micro-batch)`` as one integer,
the same at both ends when the schedule is right.

The pairing is computed for all stages at once: the transfers are grouped by link
with one small-integer sort (a stage only talks to itself and to its two
neighbours in a loop or V placement), then the k-th of each group meet. The checker
compares the messages of every pair; the simulator waits on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from stagewise.schedule.kinds import Kind, kind_mask
from stagewise.schedule.program import Bools, Ints, Program

__all__ = ["Link", "Transfers", "transfers_of"]


@dataclass(frozen=True)
class Link:
    """The transfers on one link, as indices into :class:`Transfers`' arrays, in order."""

    src: int
    dst: int
    sends: Ints
    receives: Ints


@dataclass(frozen=True)
class Transfers:
    """Every send and receive of a program, in program order stage by stage.

    Attributes:
        rows: each transfer's row in the program's concatenated arrays.
        stage: the stage that runs it.
        is_send: a send (else a receive).
        peer: the stage at the other end (-1: none, a transfer past an end of the model).
        message: what it carries (see the module doc).
        match: the index of the transfer it meets (a send's receive, a receive's send),
            -1 when it has none.
        links: the links with any transfer, sorted by (src, dst).
    """

    rows: Ints
    stage: Ints
    is_send: Bools
    peer: Ints
    message: Ints
    match: Ints
    links: list[Link]


#: the four transfer kinds, in the order of the last axis of the tables below.
_SLOTS = (Kind.SEND_ACTIVATION, Kind.RECV_ACTIVATION, Kind.SEND_GRAD, Kind.RECV_GRAD)
_SLOT_OF = np.full(len(Kind), -1, np.int32)
_SLOT_OF[list(_SLOTS)] = np.arange(len(_SLOTS), dtype=np.int32)


def _tables(program: Program) -> tuple[Ints, Ints]:
    """Per (stage, chunk, transfer kind): the peer stage, and the message's high part.

    The message of a transfer is ``high * micro_batches + micro_batch`` with
    ``high = gradient? * virtual stages + receiving virtual stage``.
    """
    placement = program.placement
    stages, chunks = program.num_stages, program.chunks
    peer = np.full((stages, chunks, 4), -1, np.int64)
    high = np.zeros((stages, chunks, 4), np.int64)
    if program.replicated:  # every stage is the whole model: no neighbours
        return peer.reshape(-1), high.reshape(-1)
    count = placement.num_virtual_stages
    for stage in range(stages):
        for chunk in range(chunks):
            virtual = placement.virtual_stage(stage, chunk)
            after, before = placement.next(stage, chunk), placement.prev(stage, chunk)
            nxt = -1 if after is None else after[0]
            prv = -1 if before is None else before[0]
            # an activation goes down (v -> v+1), a gradient up (v -> v-1)
            peer[stage, chunk] = (nxt, prv, prv, nxt)  # SA, RA, SG, RG
            high[stage, chunk] = (virtual + 1, virtual, count + virtual - 1, count + virtual)
    return peer.reshape(-1), high.reshape(-1)


def transfers_of(program: Program) -> Transfers:
    """The transfers of ``program`` and their pairing (computed once, then cached)."""
    cached = program.cache.get("transfers")
    if cached is None:
        cached = program.cache["transfers"] = _compute(program)
    return cast(Transfers, cached)


def _compute(program: Program) -> Transfers:
    kinds = program.concat("kind")
    rows = np.flatnonzero(kind_mask("is_transfer")[kinds])
    slot = _SLOT_OF[kinds[rows]]
    stage = program.stage_of_row[rows]
    chunks = program.chunks
    chunk = np.clip(program.concat("chunk")[rows], 0, chunks - 1)  # out of range: the rules say so
    where = (stage * chunks + chunk) * 4 + slot
    peer_table, high_table = _tables(program)
    peer = peer_table[where]
    message = high_table[where] * program.micro_batches + program.concat("micro_batch")[rows]
    is_send = (slot % 2) == 0
    links, match = _pair(program.num_stages, stage, peer, is_send)
    return Transfers(rows, stage, is_send, peer, message, match, links)


def _pair(stages: int, stage: Ints, peer: Ints, is_send: Bools) -> tuple[list[Link], Ints]:
    """Group the transfers by link (in program order) and meet the k-th send and receive."""
    src = np.where(is_send, stage, peer)
    dst = np.where(is_send, peer, stage)
    distance = (peer - stage) % stages  # 0 (itself), 1 or S - 1 (its neighbours)
    near = (distance == 0) | (distance == 1) | (distance == stages - 1)
    if np.all(near | (peer < 0)):
        # a small code per (direction, neighbour): one radix sort groups by it; within
        # a code the transfers stay in program order, so a group is one stage's run
        code = np.where(distance == 0, 0, np.where(distance == 1, 1, 2))
        code = np.where(peer < 0, 3, code) + 4 * is_send
        order = np.argsort(code.astype(np.int8), kind="stable")
        group = code[order] * stages + stage[order]
    else:  # any placement: sort by the link itself
        group = np.where(peer < 0, -1, src * stages + dst) * 2 + is_send
        order = np.argsort(group, kind="stable")
        group = group[order]
    cut = np.flatnonzero(np.diff(group)) + 1
    starts = np.concatenate([[0], cut]).astype(np.int64) if len(order) else np.zeros(0, np.int64)
    ends = np.concatenate([cut, [len(order)]]).astype(np.int64) if len(order) else starts
    by_link: dict[tuple[int, int], list[Ints]] = {}
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        first = order[start]
        if peer[first] < 0:
            continue
        link = (int(src[first]), int(dst[first]))
        sides = by_link.setdefault(link, [np.zeros(0, np.int64), np.zeros(0, np.int64)])
        sides[0 if is_send[first] else 1] = order[start:end]
    match = np.full(len(stage), -1, np.int64)
    links = []
    for (a, b), (sends, receives) in sorted(by_link.items()):
        n = min(len(sends), len(receives))
        match[sends[:n]] = receives[:n]
        match[receives[:n]] = sends[:n]
        links.append(Link(a, b, sends, receives))
    return links, match
