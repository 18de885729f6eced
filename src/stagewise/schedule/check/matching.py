"""The rules between stages: sends meet receives in order, and nothing deadlocks.

4. *Matching.* Between two stages, the k-th send is met by the k-th receive, for
   the same micro-batch, kind (activation or gradient) and virtual stage:
   activations go from virtual stage ``v`` to ``v + 1``, gradients to ``v - 1``,
   placed by the schedule's placement.
5. *No deadlock.* Run every stage's instructions in order, with sends buffered and
   receives blocking until the matching send was issued; pipeline collectives
   (``RTG``, ``OPT``: tied weights, global-norm clipping) wait until every stage
   reaches them. Every stage must reach its end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from stagewise.schedule.check.rules import StageRows
from stagewise.schedule.check.state import Bools, CheckState, Ints
from stagewise.schedule.kinds import Kind, kind_mask

__all__ = ["Comm", "check_deadlock", "check_matching", "stage_comm"]

#: the pipeline collectives, each with its own sequence of events.
_COLLECTIVES = [kind for kind in Kind if kind.is_collective]


def _barrier_event(kind: int) -> int:
    """The (negative) event of a collective: -1 for the first collective kind, -2, ..."""
    return -1 - _COLLECTIVES.index(Kind(kind))


@dataclass
class Comm:
    """One stage's sends and receives, in program order."""

    rows: Ints  # index in the stage's flat instruction list
    peer: Ints  # the stage at the other end
    message: Ints  # (kind, micro-batch, receiving virtual stage), one integer
    is_send: Bools
    barriers: Ints  # rows of the collectives that wait for every stage
    barrier_events: Ints  # their events (see _barrier_event)


def stage_comm(state: CheckState, stage: int, ops: StageRows) -> Comm:
    """Peers and messages of one stage's sends and receives.

    A message is ``(gradient?, receiving virtual stage, micro-batch)`` as one
    integer, the same at both ends. Sends and receives past either end of the
    model were ruled out by the order rules.
    """
    transfer = kind_mask("is_transfer")[ops.kind]
    kind, chunk, mb = ops.kind[transfer], ops.chunk[transfer], ops.micro_batch[transfer]
    is_send = kind_mask("is_send")[kind]
    is_grad = kind_mask("is_gradient")[kind]
    roles = state.roles[stage]
    nxt = np.array([-1 if role.next is None else role.next[0] for role in roles], np.int64)
    prv = np.array([-1 if role.prev is None else role.prev[0] for role in roles], np.int64)
    virtual = np.array([role.virtual for role in roles], np.int64)
    # an activation goes down (v -> v+1), a gradient up (v -> v-1)
    downstream = is_send != is_grad  # a send of an activation or a receive of a gradient
    peer = np.where(downstream, nxt[chunk], prv[chunk])
    receiver = virtual[chunk] + np.where(is_send, np.where(is_grad, -1, 1), 0)
    message = (is_grad * state.virtual_count + receiver) * state.micro_batches + mb
    kinds = state.kinds[stage]
    barriers = np.flatnonzero(kind_mask("is_collective")[kinds])
    events = np.array([_barrier_event(k) for k in kinds[barriers].tolist()], np.int64)
    return Comm(ops.rows[transfer], peer, message, is_send, barriers, events)


def check_matching(state: CheckState, comms: list[Comm]) -> None:
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
            raise state.fail(
                f"stage {src} sends {state.where(src, i)} as its message #{k + 1} to "
                f"stage {dst}, but stage {dst}'s receive #{k + 1} from stage {src} is "
                f"{state.where(dst, j)}: between two stages, sends and receives must "
                f"come in the same order",
                (src, i),
                (dst, j),
            )
        if len(out) > n:
            i = comms[src].rows[out[n]]
            raise state.fail(
                f"stage {src}: {state.where(src, i)} has no matching receive on stage "
                f"{dst} ({len(out)} sends, {len(into)} receives)",
                (src, i),
            )
        if len(into) > n:
            j = comms[dst].rows[into[n]]
            raise state.fail(
                f"stage {dst}: {state.where(dst, j)} has no matching send on stage "
                f"{src} ({len(out)} sends, {len(into)} receives)",
                (dst, j),
            )


# -- 5: deadlock freedom ----------------------------------------------------------


def _events(state: CheckState, comms: list[Comm]) -> tuple[list[list[int]], list[Ints]]:
    """Each stage's sends, receives and collectives as integers, in program order.

    ``2 * link + 1`` is a send on ``link`` (a dense id of a (from, to) pair of
    stages), ``2 * link`` a receive, and a negative number a collective
    (:func:`_barrier_event`). Also returns the row of each event.
    """
    pairs = [
        np.where(comm.is_send, stage * state.stages + comm.peer, comm.peer * state.stages + stage)
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


def check_deadlock(state: CheckState, comms: list[Comm]) -> None:
    """Run all stages: buffered sends, blocking receives, barrier collectives."""
    stages = state.stages
    events, event_rows = _events(state, comms)
    links = 1 + max((max(e) // 2 for e in events if e), default=0)
    credit = [0] * links  # sends issued on each link and not yet received
    waiting = [-1] * links  # the stage blocked on each link's next receive
    arrived: dict[tuple[int, int], list[int]] = {}  # (event, k) -> stages there
    passed = [[0] * len(_COLLECTIVES) for _ in range(stages)]  # collectives passed, per event
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
            reason = f"waits for stage {comms[stage].peer[comms[stage].rows == row][0]} to send it"
        lines.append(f"  stage {stage}: {state.where(stage, row)} {reason}")
    raise state.fail(
        "deadlock: with buffered sends and blocking receives, no stage can go on:\n"
        + "\n".join(lines)
        + "\nreorder the steps so that every receive's send is issued before it",
        *((stage, event_rows[stage][pc[stage]]) for stage in stuck),
    )
