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
from functools import cached_property
from typing import cast

import numpy as np

from stagewise.schedule.kinds import Kind, kind_mask
from stagewise.schedule.program import Ints, Program

__all__ = ["Link", "Transfers", "transfers_of"]


@dataclass(frozen=True)
class Link:
    """The transfers on one link, as indices into :class:`Transfers`' arrays, in order."""

    src: int
    dst: int
    sends: Ints
    receives: Ints


class Transfers:
    """Every send and receive of a program, in program order stage by stage.

    Attributes:
        rows: each transfer's row in the program's concatenated arrays.
        is_send: a send (else a receive).
        match: the index of the transfer it meets (a send's receive, a receive's send),
            -1 when it has none.
        links: the links with any transfer, sorted by (src, dst).

    ``stage``, ``peer`` (the stage at the other end, -1 past an end of the model) and
    ``message`` (see the module doc) are computed when asked.
    """

    def __init__(
        self,
        program: Program,
        rows: Ints,
        where: Ints,
        tables: tuple[Ints, Ints],
        match: Ints,
        links: list[Link],
    ) -> None:
        self._program, self._where, self._tables = program, where, tables
        self.rows = rows
        self.is_send = (where % 4) % 2 == 0  # SA, RA, SG, RG: sends are even
        self.match = match
        self.links = links

    @cached_property
    def stage(self) -> Ints:
        """The stage that runs each transfer."""
        return self._program.stage_of_row[self.rows]

    @property
    def peer(self) -> Ints:
        """The stage at the other end of each transfer (-1: none)."""
        return self._tables[0][self._where]

    def peer_at(self, index: int) -> int:
        """The stage at the other end of transfer ``index`` (-1: none)."""
        return int(self._tables[0][self._where[index]])

    @property
    def message(self) -> Ints:
        """What each transfer carries, one integer (the same at both ends when right)."""
        program = self._program
        return (
            self._tables[1][self._where] * program.micro_batches
            + program.concat("micro_batch")[self.rows]
        )


#: the four transfer kinds, in the order of the last axis of the tables below.
_SLOTS = (Kind.SEND_ACTIVATION, Kind.RECV_ACTIVATION, Kind.SEND_GRAD, Kind.RECV_GRAD)
_SLOT_OF = np.full(len(Kind), -1, np.int32)
_SLOT_OF[list(_SLOTS)] = np.arange(len(_SLOTS), dtype=np.int32)


def _tables(program: Program) -> tuple[Ints, Ints, Ints, dict[int, tuple[bool, int, int]]]:
    """Per (stage, chunk, transfer kind): the peer, the message's high part, the link group.

    The message of a transfer is ``high * micro_batches + micro_batch`` with
    ``high = gradient? * virtual stages + receiving virtual stage``. The group says
    which link and side a transfer is on, as a small integer where it can (a stage
    talks to itself and its two neighbours); ``groups`` maps each group to
    ``(is send, src, dst)``.
    """
    placement = program.placement
    stages, chunks = program.num_stages, program.chunks
    peer = np.full((stages, chunks, 4), -1, np.int64)
    high = np.zeros((stages, chunks, 4), np.int64)
    if not program.replicated:  # a replicated program is the whole model: no neighbours
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
    send = np.array([True, False, True, False])[None, None, :]
    stage_of = np.arange(stages)[:, None, None]
    distance = (peer - stage_of) % stages
    near = (distance == 0) | (distance == 1) | (distance == stages - 1) | (peer < 0)
    if near.all():  # (side, neighbour) per stage: 8 groups a stage
        side = np.where(distance == 0, 0, np.where(distance == 1, 1, 2))
        group = (np.where(peer < 0, 3, side) + 4 * send) * stages + stage_of
    else:  # any placement: one group per link and side
        group = np.where(peer < 0, 0, 1 + (stage_of * stages + peer) * 2 + send)
    groups: dict[int, tuple[bool, int, int]] = {}
    for g, s, p, is_send in zip(
        group.reshape(-1).tolist(),
        np.broadcast_to(stage_of, peer.shape).reshape(-1).tolist(),
        peer.reshape(-1).tolist(),
        np.broadcast_to(send, peer.shape).reshape(-1).tolist(),
        strict=True,
    ):
        if p >= 0:
            groups[g] = (is_send, s, p) if is_send else (is_send, p, s)
    return peer.reshape(-1), high.reshape(-1), group.reshape(-1), groups


def transfers_of(program: Program) -> Transfers:
    """The transfers of ``program`` and their pairing (computed once, then cached)."""
    cached = program.cache.get("transfers")
    if cached is None:
        cached = program.cache["transfers"] = _compute(program)
    return cast(Transfers, cached)


def _compute(program: Program) -> Transfers:
    kinds = program.concat("kind")
    rows = np.flatnonzero(kind_mask("is_transfer")[kinds]).astype(np.int32)
    chunks = program.chunks
    chunk = np.clip(program.concat("chunk")[rows], 0, chunks - 1)  # out of range: the rules say so
    where = program.stage_of_row[rows] * (chunks * 4)
    where += chunk * 4
    where += _SLOT_OF[kinds[rows]]
    peer_table, high_table, group_table, groups = _tables(program)
    links, match = _pair(group_table[where], groups)
    return Transfers(program, rows, where, (peer_table, high_table), match, links)


def _pair(group: Ints, groups: dict[int, tuple[bool, int, int]]) -> tuple[list[Link], Ints]:
    """Sort the transfers by group (one stable radix sort keeps program order within a
    group), give each link its sends and receives, and meet the k-th of each."""
    small = int(group.max(initial=0)) < 2**15
    order = np.argsort(group.astype(np.int16) if small else group, kind="stable").astype(np.int32)
    counts = np.bincount(group) if small else np.unique(group, return_counts=True)[1]
    present = np.flatnonzero(counts) if small else np.unique(group)
    sizes = counts[np.flatnonzero(counts)] if small else counts
    ends = np.cumsum(sizes).tolist()
    by_link: dict[tuple[int, int], list[Ints]] = {}
    start = 0
    for g, end in zip(present.tolist(), ends, strict=True):
        if g in groups:  # else: transfers past an end of the model (the rules say so)
            is_send, src, dst = groups[g]
            sides = by_link.setdefault((src, dst), [np.zeros(0, np.int32), np.zeros(0, np.int32)])
            sides[0 if is_send else 1] = order[start:end]
        start = end
    match = np.full(len(group), -1, np.int32)
    links = []
    for (a, b), (sends, receives) in sorted(by_link.items()):
        n = min(len(sends), len(receives))
        match[sends[:n]] = receives[:n]
        match[receives[:n]] = sends[:n]
        links.append(Link(a, b, sends, receives))
    return links, match
