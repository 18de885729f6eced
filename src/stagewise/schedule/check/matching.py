"""The rules between stages: sends meet receives in order, and nothing deadlocks.

4. *Matching.* Between two stages, the k-th send is met by the k-th receive, for
   the same micro-batch, kind (activation or gradient) and virtual stage:
   activations go from virtual stage ``v`` to ``v + 1``, gradients to ``v - 1``,
   placed by the schedule's placement (:mod:`~stagewise.schedule.transfers`).
5. *No deadlock.* Run every stage's instructions in order, with sends buffered and
   receives blocking until the matching send was issued; pipeline collectives
   (``RTG``, ``OPT``: tied weights, global-norm clipping) wait until every stage
   reaches them. Every stage must reach its end: the dependency graph
   (:mod:`~stagewise.schedule.deps`) has no cycle.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedule.check.state import CheckState
from stagewise.schedule.deps import Dependencies, dependencies_of
from stagewise.schedule.program import Program
from stagewise.schedule.transfers import transfers_of

__all__ = ["check_deadlock", "check_matching", "deadlock_report"]


def check_matching(state: CheckState) -> None:
    """Between two stages, the k-th send meets the k-th receive, with the same message."""
    program = state.program
    t = transfers_of(program)
    sends = t.is_send
    met = t.match >= 0
    message = t.message
    wrong = sends & met & (message != message[np.maximum(t.match, 0)])
    if not wrong.any() and met.all():
        return
    offsets = program.offsets

    def local(index: int) -> tuple[int, int]:
        stage = int(t.stage[index])
        return stage, int(t.rows[index] - offsets[stage])

    for link in t.links:
        src, dst = link.src, link.dst
        n = min(len(link.sends), len(link.receives))
        differ = np.flatnonzero(wrong[link.sends[:n]])
        if differ.size:
            k = int(differ[0])
            (_, i), (_, j) = local(link.sends[k]), local(link.receives[k])
            raise state.fail(
                f"stage {src} sends {state.where(src, i)} as its message #{k + 1} to "
                f"stage {dst}, but stage {dst}'s receive #{k + 1} from stage {src} is "
                f"{state.where(dst, j)}: between two stages, sends and receives must "
                f"come in the same order",
                (src, i),
                (dst, j),
            )
        if len(link.sends) > n:
            _, i = local(link.sends[n])
            raise state.fail(
                f"stage {src}: {state.where(src, i)} has no matching receive on stage "
                f"{dst} ({len(link.sends)} sends, {len(link.receives)} receives)",
                (src, i),
            )
        if len(link.receives) > n:
            _, j = local(link.receives[n])
            raise state.fail(
                f"stage {dst}: {state.where(dst, j)} has no matching send on stage "
                f"{src} ({len(link.sends)} sends, {len(link.receives)} receives)",
                (dst, j),
            )


def check_deadlock(state: CheckState) -> None:
    """Run all stages: buffered sends, blocking receives, barrier collectives."""
    deps = dependencies_of(state.program, collectives=True)
    report = deadlock_report(state.program, deps)
    if report is not None:
        problem, marks = report
        raise state.fail(problem, *marks)


def deadlock_report(
    program: Program, deps: Dependencies
) -> tuple[str, list[tuple[int, int]]] | None:
    """What each stage waits for, when some wait forever (None when all finish).

    Returns the problem and, per stuck stage, ``(stage, row)`` of the instruction it
    blocks at.
    """
    stuck = deps.stuck()
    if all(block < 0 for block in stuck):
        return None
    t = transfers_of(program)
    lines, marks = [], []
    for stage, block in enumerate(stuck):
        if block < 0:
            lines.append(f"  stage {stage}: finished")
            continue
        row = int(deps.block_start[block])
        local = row - int(program.offsets[stage])
        step, _ = program.stages[stage].position(local)
        text = f"{program.stages[stage].text(local)} at step {step}"
        if deps.join[block] >= 0:
            missing = deps.missing(int(deps.join[block]) - deps.num_blocks)
            reason = f"waits for stages {missing} to reach it (a collective)"
        else:
            peer = t.peer_at(int(np.searchsorted(t.rows, row)))
            reason = f"waits for stage {peer} to send it"
        lines.append(f"  stage {stage}: {text} {reason}")
        marks.append((stage, local))
    problem = (
        "deadlock: with buffered sends and blocking receives, no stage can go on:\n"
        + "\n".join(lines)
        + "\nreorder the steps so that every receive's send is issued before it"
    )
    return problem, marks
