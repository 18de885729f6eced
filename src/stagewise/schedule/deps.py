"""What waits for what: a program's dependency graph, and an order to run it in.

Sends are buffered and receives block, so a stage runs freely from one receive to
the next. Cut every stage's instructions at each receive (and, when collectives
count, at each pipeline collective, ``RTG`` and ``OPT``): the pieces are *blocks*,
the nodes of the graph. A block waits for

* the previous block of its stage (program order);
* for a block that starts with a receive, the block that holds the matching send
  (:mod:`~stagewise.schedule.transfers`; a receive that no send meets waits forever);
* for a block that starts with a collective, a *join* node that waits for every
  stage to reach the same collective (the k-th ``RTG`` of each stage meet, and so on).

The program runs to its end exactly when this graph has no cycle, and then its
*levels* (Kahn's algorithm, a frontier at a time: every node of a level waits only
for nodes of earlier levels) are an order to compute finishing times in. Both the
checker (deadlock freedom, with collectives) and the simulator (times, without)
read them; the levels of the graph with collectives are valid for the graph
without, so a checked program is simulated without layering it again.

The frontier of a pipeline is about one block per stage, so the levels are found
with numpy a frontier at a time when there are many stages, and one block at a
time in plain Python when there are few.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import cast

import numpy as np

from stagewise.schedule.kinds import kind_mask
from stagewise.schedule.program import Bools, Ints, Program
from stagewise.schedule.transfers import transfers_of

__all__ = ["Dependencies", "dependencies_of"]

#: from this many stages on, the levels are found with numpy a frontier at a time.
WIDE = 24
#: message successors kept in the dense table per block; the rest go to a sparse one.
_INLINE = 2
_NEVER = -2  # the source of a receive that no send meets


@dataclass(eq=False)
class Dependencies:
    """The blocks of a program, what each waits for, and the levels (see the module doc).

    Attributes:
        stages: the program's number of stages.
        block_start: each block's first row in the program's concatenated arrays.
        block_stage: each block's stage.
        block_of_row: each row's block.
        chain: each block's previous block on its stage, or -1.
        source: for a block starting with a receive, the block holding its send
            (-2 when no send meets it); else -1.
        send: the transfer index (into :class:`~stagewise.schedule.transfers.Transfers`)
            of that send, or -1.
        join: for a block starting with a collective, its join node (numbered after
            the blocks), else -1.
        joins: per join, the blocks whose end is a stage's arrival at it, and how many
            stages arrive at once (their collective is their first instruction).
        levels: node ids level by level (joins included), only nodes that can run; or,
            when ``sequential``, one array: a topological order, one node at a time.
        sequential: how to read ``levels``.
        done: per node, whether it can run (False: it waits forever).
    """

    stages: int
    block_start: Ints
    block_stage: Ints
    block_of_row: Ints
    chain: Ints
    source: Ints
    send: Ints
    join: Ints
    joins: list[tuple[Ints, int]]
    levels: list[Ints]
    sequential: bool
    done: Bools

    @property
    def num_blocks(self) -> int:
        return len(self.block_start)

    def stuck(self) -> list[int]:
        """Per stage, its first block that never runs (-1 when the stage finishes)."""
        first = np.full(self.stages, -1, np.int64)
        blocked = np.flatnonzero(~self.done[: self.num_blocks])[::-1]
        first[self.block_stage[blocked]] = blocked  # the earliest block of a stage wins
        return first.tolist()

    def missing(self, join: int) -> list[int]:
        """The stages that never reach join ``join`` (the node numbered ``num_blocks + join``)."""
        blocks, _ = self.joins[join]
        reached = set(self.block_stage[blocks[self.done[blocks]]].tolist())
        at_once = (self.join == self.num_blocks + join) & (self.chain < 0)
        reached |= set(self.block_stage[at_once].tolist())
        return sorted(set(range(self.stages)) - reached)


def dependencies_of(program: Program, *, collectives: bool) -> Dependencies:
    """The dependency graph of ``program`` (cached), with or without collectives."""
    key = f"deps:{collectives}"
    cached = program.cache.get(key)
    if cached is None:
        cached = program.cache[key] = _build(program, collectives)
    return cast(Dependencies, cached)


class _Graph:
    """The edges as the layering needs them: for each block, whom its end wakes.

    ``wakes[b]`` lists (padded with -1) the next block of ``b``'s stage (or, when that
    one starts with a collective, the join it arrives at) and the receiving blocks of
    its first sends; a block with more sends lists the rest in ``more_dst``. A join
    wakes the collective's block on every stage.
    """

    def __init__(self, deps: Dependencies, msg_src: Ints, msg_dst: Ints) -> None:
        n = deps.num_blocks
        self.n = n
        self.indeg = np.zeros(n + len(deps.joins), np.intp)
        at_join = deps.join >= 0
        # a block starting with a collective waits for its join only (which waits for
        # the previous block of every stage, its own included)
        indeg = self.indeg[:n]
        indeg += (deps.chain >= 0) & ~at_join
        indeg += deps.source != -1
        indeg += at_join
        for j, (_, at_once) in enumerate(deps.joins):
            self.indeg[n + j] = deps.stages - at_once  # the others must come
        starts = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(msg_src, minlength=n), out=starts[1:])
        rank = np.arange(len(msg_src), dtype=np.int32)
        rank -= starts[msg_src]
        # node ids as numpy's index type: the layering indexes with them every level
        self.wakes = np.full((n, 1 + _INLINE), -1, np.intp)
        linked = np.flatnonzero((deps.chain >= 0) & ~at_join)
        self.wakes[deps.chain[linked], 0] = linked
        for j, (blocks, _) in enumerate(deps.joins):
            self.wakes[blocks, 0] = n + j
        inline = rank < _INLINE
        flat = self.wakes.reshape(-1)
        slot = msg_src * (1 + _INLINE)
        slot += 1 + rank
        flat[slot[inline]] = msg_dst[inline]
        # the rest (a block sending many messages: a warm-up) in a sparse table,
        # sorted by source block (the sends are in program order)
        self.more_src, self.more_dst = msg_src[~inline], msg_dst[~inline]
        self.has_more = np.zeros(n, bool)
        self.has_more[self.more_src] = True
        self.join_blocks = [np.flatnonzero(deps.join == n + j) for j in range(len(deps.joins))]


def _build(program: Program, collectives: bool) -> Dependencies:
    kinds = program.concat("kind")
    transfers = transfers_of(program)
    is_recv = ~transfers.is_send
    starts_block = np.zeros(len(kinds), bool)
    starts_block[program.offsets[:-1][np.diff(program.offsets) > 0]] = True
    starts_block[transfers.rows[is_recv]] = True
    barrier_rows = np.flatnonzero(kind_mask("is_collective")[kinds] & collectives)
    starts_block[barrier_rows] = True
    block_start = np.flatnonzero(starts_block).astype(np.int32)
    block_of_row = np.cumsum(starts_block, dtype=np.int32)
    block_of_row -= 1
    block_stage = program.stage_of_row[block_start]
    n = len(block_start)
    chain = np.arange(-1, n - 1, dtype=np.int32)
    if n:
        chain[np.concatenate([[True], block_stage[1:] != block_stage[:-1]])] = -1

    source = np.full(n, -1, np.int32)
    send = np.full(n, -1, np.int32)
    receives = np.flatnonzero(is_recv)
    met = transfers.match[receives]
    recv_block = block_of_row[transfers.rows[receives]]
    source[recv_block] = np.where(
        met >= 0, block_of_row[transfers.rows[np.maximum(met, 0)]], _NEVER
    )
    send[recv_block] = met
    # message edges from the sends' side: sends are in program order, so by source block
    sends = np.flatnonzero(transfers.is_send & (transfers.match >= 0))
    msg_src = block_of_row[transfers.rows[sends]]
    msg_dst = block_of_row[transfers.rows[transfers.match[sends]]]

    join = np.full(n, -1, np.int32)
    joins = _joins(program, kinds, barrier_rows, block_of_row, join) if barrier_rows.size else []
    deps = Dependencies(
        program.num_stages, block_start, block_stage, block_of_row, chain, source, send,
        join, joins, [], False, np.zeros(0, bool),
    )  # fmt: skip
    graph = _Graph(deps, msg_src, msg_dst)
    if program.num_stages >= WIDE:
        deps.levels, deps.done = _levels_numpy(graph)
    else:
        deps.levels, deps.done = _levels_python(graph)
        deps.sequential = True
    return deps


def _joins(
    program: Program, kinds: Ints, barrier_rows: Ints, block_of_row: Ints, join: Ints
) -> list[tuple[Ints, int]]:
    """Number the joins: the k-th collective of each kind on every stage meet at one."""
    n = int(block_of_row[-1]) + 1
    ids: dict[tuple[int, int], int] = {}
    seen: dict[tuple[int, int], int] = {}  # (stage, kind) -> collectives of it so far
    members: list[list[int]] = []
    stages = program.stage_of_row[barrier_rows].tolist()
    for row, stage, kind in zip(
        barrier_rows.tolist(), stages, kinds[barrier_rows].tolist(), strict=True
    ):
        nth = seen.get((stage, kind), 0)
        seen[stage, kind] = nth + 1
        j = ids.setdefault((kind, nth), len(ids))
        if j == len(members):
            members.append([])
        members[j].append(row)
        join[block_of_row[row]] = n + j
    starts = set(program.offsets[:-1].tolist())
    joins = []
    for rows in members:
        later = [row for row in rows if row not in starts]
        joins.append((block_of_row[np.array(later, np.int64) - 1], len(rows) - len(later)))
    return joins


def _levels_numpy(graph: _Graph) -> tuple[list[Ints], Bools]:
    """Kahn's algorithm a frontier at a time (many stages: wide frontiers)."""
    n, indeg, wakes = graph.n, graph.indeg, graph.wakes
    place = np.zeros(len(indeg), np.intp)  # scratch for removing repeats
    levels: list[Ints] = []
    frontier = np.flatnonzero(indeg == 0)
    while frontier.size:
        levels.append(frontier)
        blocks, parts = frontier, []
        if frontier.max() >= n:  # a join: only at the batch's collectives
            blocks = frontier[frontier < n]
            parts = [graph.join_blocks[j - n] for j in frontier[frontier >= n].tolist()]
        woken = wakes[blocks].reshape(-1)
        more = blocks[graph.has_more[blocks]]
        if more.size:  # blocks with many sends (warm-ups), from the sparse table
            lo = np.searchsorted(graph.more_src, more)
            counts = np.searchsorted(graph.more_src, more, side="right") - lo
            gather = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            parts.append(graph.more_dst[gather])
        if parts:
            woken = np.concatenate([woken, *parts])
        woken = woken[woken >= 0]
        np.subtract.at(indeg, woken, 1)
        ready = woken[indeg[woken] == 0]
        if len(ready) > 1:  # a block woken by two of this level's nodes appears twice
            index = np.arange(len(ready))
            place[ready] = index
            ready = ready[place[ready] == index]
        frontier = ready
    done = np.zeros(len(indeg), bool)
    if levels:
        done[np.concatenate(levels)] = True
    return levels, done


def _levels_python(graph: _Graph) -> tuple[list[Ints], Bools]:
    """Kahn's algorithm a node at a time (few stages): a topological order."""
    n = graph.n
    indeg = graph.indeg.tolist()
    wakes = graph.wakes.tolist()
    for b, d in zip(graph.more_src.tolist(), graph.more_dst.tolist(), strict=True):
        wakes[b].append(d)
    join_blocks = [b.tolist() for b in graph.join_blocks]
    ready = deque(node for node, d in enumerate(indeg) if d == 0)
    order: list[int] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for other in join_blocks[node - n] if node >= n else wakes[node]:
            if other >= 0:
                indeg[other] -= 1
                if indeg[other] == 0:
                    ready.append(other)
    flat = np.array(order, np.int64)
    done = np.zeros(len(indeg), bool)
    done[flat] = True
    return [flat], done
