"""What a simulation needs that no cost changes, and the sweep that times the blocks.

:func:`frame_of` builds, once per program, everything the simulator reads besides
the costs: the compute rows with their virtual stages, each block's offset into one
running sum of compute costs over all stages, where each block's message comes from
and which boundary it crosses, and the dependency graph's levels flattened in order
(:mod:`~stagewise.schedule.deps`). :func:`sweep` then gives every block its start:
the later of its stage's previous block's end and its message's arrival.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import cast

import numpy as np

from stagewise.schedule.check import Position, ScheduleError
from stagewise.schedule.check.matching import deadlock_report
from stagewise.schedule.costs import Floats, peak_activations
from stagewise.schedule.deps import Dependencies, dependencies_of
from stagewise.schedule.kinds import Kind, kind_mask
from stagewise.schedule.program import Ints, Program
from stagewise.schedule.transfers import transfers_of

__all__ = ["Frame", "frame_of", "sweep"]


def _graph(program: Program) -> Dependencies:
    """The layered graph: the checker's when it ran (and all finished), else its own."""
    checked = program.cache.get("deps:True")
    if checked is not None and checked.done.all():
        return cast(Dependencies, checked)
    return dependencies_of(program, collectives=False)


@dataclass(eq=False)
class Frame:
    """What a simulation needs that no cost changes, built once per program.

    Times are read off one running sum of compute costs over all stages
    (``spent``): ``at_start`` indexes it at each block's start, ``at_send`` at the
    send that each block's message comes from.
    """

    deps: Dependencies
    rows: Ints  # the compute rows
    kind: Ints  # their kinds
    virtual_of: Ints  # their virtual stages
    segment: Ints  # each stage's compute rows: segment[s]:segment[s + 1]
    at_start: Ints  # per block: compute rows before its start
    msg: Ints  # the blocks that start with a (met) receive
    msg_source: Ints  # per such block: the block holding its send
    at_send: Ints  # per such block: compute rows before its send
    crossed: Ints  # per such block: the boundary its message crosses
    last_block: Ints  # per stage with instructions: its last block
    nonempty: Ints  # the stages with instructions
    compute_block: Ints  # per compute row: its block
    training: bool  # whether the program trains
    peaks: list[int]  # per stage, the most (chunk, micro-batch) activations held
    order: Ints  # the blocks in the order of the levels (joins left out)
    chain_o: Ints  # per block of ``order``: the previous block of its stage, or n
    source_o: Ints  # per block of ``order``: the block its message comes from, or n
    bounds: list[int]  # where each level starts in ``order`` (and where the last ends)


def frame_of(program: Program) -> Frame:
    deps = _graph(program)
    key = f"frame:{id(deps)}"
    cached = program.cache.get(key)
    if cached is not None:
        return cast(Frame, cached)
    if not deps.done[: deps.num_blocks].all():
        problem, marks = deadlock_report(program, deps)  # type: ignore[misc]
        raise ScheduleError(
            problem, program.grid(), [_position(program, stage, row) for stage, row in marks]
        )
    placement, stages, chunks = program.placement, program.num_stages, program.chunks
    kinds, offsets = program.concat("kind"), program.offsets
    virtual = np.array([placement.virtual_stages_of(s) for s in range(stages)], np.int64)
    is_compute = kind_mask("is_compute")[kinds]
    rows = np.flatnonzero(is_compute)
    chunk = np.clip(program.concat("chunk")[rows], 0, chunks - 1)
    virtual_of = virtual[program.stage_of_row[rows], chunk]
    computed = np.cumsum(is_compute, dtype=np.int32)  # compute rows up to each row

    def before(at: Ints) -> Ints:
        return computed[at] - is_compute[at]

    n = deps.num_blocks
    msg = np.flatnonzero(deps.source >= 0)
    send_rows = transfers_of(program).rows[deps.send[msg]]
    send_chunk = np.clip(program.concat("chunk")[send_rows], 0, chunks - 1)
    send_virtual = virtual[program.stage_of_row[send_rows], send_chunk]
    activation = kinds[send_rows] == Kind.SEND_ACTIVATION
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    segment = np.searchsorted(rows, offsets)  # each stage's compute rows
    training = program.is_training()
    levels = [level[level < n] for level in deps.levels]
    order = np.concatenate([np.zeros(0, np.int64), *levels])
    bounds = np.concatenate([[0], np.cumsum([len(level) for level in levels])]).tolist()
    frame = Frame(
        deps=deps,
        rows=rows,
        kind=kinds[rows],
        virtual_of=virtual_of,
        segment=segment,
        at_start=before(deps.block_start),
        msg=msg,
        msg_source=deps.source[msg],
        at_send=before(send_rows),
        crossed=np.where(activation, send_virtual, send_virtual - 1),
        last_block=deps.block_of_row[offsets[1:][nonempty] - 1],
        nonempty=nonempty,
        compute_block=deps.block_of_row[rows],
        training=training,
        peaks=peak_activations(kinds[rows], segment, training),
        order=order,
        chain_o=np.where(deps.chain >= 0, deps.chain, n)[order],
        source_o=np.where(deps.source >= 0, deps.source, n)[order],
        bounds=bounds,
    )
    program.cache[key] = frame
    return frame


def _position(program: Program, stage: int, row: int) -> Position:
    return Position(stage, *program.stages[stage].position(row))


def sweep(f: Frame, length: Floats, msg_wait: Floats) -> Floats:
    """Each block's start: the later of its stage's previous block's end and its message.

    ``length[b]`` is how long block ``b`` runs, ``msg_wait[b]`` how long after its
    source block starts its message arrives (0 without one); both have a last entry
    0 for "nothing to wait for".
    """
    n = f.deps.num_blocks
    begin = np.zeros(n + 1)  # the last entry stands for "nothing to wait for"
    order, bounds, chain, source = f.order, f.bounds, f.chain_o, f.source_o
    chain_wait, msg_wait = length[chain], msg_wait[order]
    if f.deps.sequential:  # few stages: one block at a time in plain Python
        times = begin.tolist()
        for b, cp, cw, mp, mw in zip(
            order.tolist(), chain.tolist(), chain_wait.tolist(), source.tolist(),
            msg_wait.tolist(), strict=True,
        ):  # fmt: skip
            a, m = times[cp] + cw, times[mp] + mw
            times[b] = a if a > m else m
        return np.array(times)
    for lo, hi in pairwise(bounds):
        begin[order[lo:hi]] = np.maximum(
            begin[chain[lo:hi]] + chain_wait[lo:hi], begin[source[lo:hi]] + msg_wait[lo:hi]
        )
    return begin
