"""Schedules as arrays: programs say what the steps say, and both layerings agree.

The simulator's answers are compared with a plain event-driven reference written
here (each stage runs until a receive finds nothing, a send wakes it), over the
schedules, sizes and random heterogeneous costs.
"""

from __future__ import annotations

import importlib
import random
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from stagewise.schedule import (
    Costs,
    InferenceSchedule,
    Kind,
    Placement,
    Program,
    ScheduleError,
    StageProgram,
    Step,
    TrainSchedule,
    check_program,
    check_schedule,
    parse_instruction,
    schedule_factory,
    schedule_names,
    schedule_program,
    schedule_table,
    simulate,
)
from stagewise.schedule.order import Pass, PassOrderSchedule
from stagewise.schedule.slots import Slot, assemble

deps_module = importlib.import_module("stagewise.schedule.deps")

FACTORIES = [(name, schedule_factory(name)) for name in schedule_names()] + [
    ("interleaved-v3", schedule_factory("interleaved", 3))
]
SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 7), (4, 4), (4, 9), (5, 12)]


def sizes(name: str) -> list[tuple[int, int]]:
    """The (stages, micro-batches) of SIZES the schedule accepts (dualpipev: M >= 2S)."""
    return [(s, m) for s, m in SIZES if name != "dualpipev" or m >= 2 * s]


# -- a plain reference simulator -------------------------------------------------------
def reference(program: Program, costs: Costs) -> tuple[float, list[float], list[tuple]]:
    """Event-driven: each stage runs until a receive finds its link empty."""
    placement, chunks = program.placement, program.chunks
    v_count = placement.num_virtual_stages
    tables = {
        kind: costs.per_virtual_stage(name, v_count, chunks)
        for kind, name in (
            (Kind.FORWARD, "forward"),
            (Kind.BACKWARD_INPUT, "backward_input"),
            (Kind.BACKWARD_WEIGHT, "backward_weight"),
        )
    }
    tables[Kind.BACKWARD] = tables[Kind.BACKWARD_INPUT] + tables[Kind.BACKWARD_WEIGHT]
    boundary = costs.per_boundary(v_count)
    flats = [stage.instructions() for stage in program.stages]
    stages = len(flats)
    pc, clock, busy = [0] * stages, [0.0] * stages, [0.0] * stages
    queues: dict[tuple[int, int], deque[float]] = {}
    events = []
    ready = deque(range(stages))
    while ready:
        s = ready.popleft()
        while pc[s] < len(flats[s]):
            ins = flats[s][pc[s]]
            kind = ins.kind
            if kind.is_compute:
                v = placement.virtual_stage(s, ins.chunk_id)  # type: ignore[attr-defined]
                cost = float(tables[kind][v])
                events.append((s, repr(ins), clock[s], clock[s] + cost))
                clock[s] += cost
                busy[s] += cost
            elif kind.is_send:
                chunk = ins.chunk_id  # type: ignore[attr-defined]
                v = placement.virtual_stage(s, chunk)
                peer = placement.next(s, chunk) if kind.is_activation else placement.prev(s, chunk)
                assert peer is not None
                crossed = v if kind.is_activation else v - 1
                link = (s, peer[0])
                queues.setdefault(link, deque()).append(clock[s] + float(boundary[crossed]))
                if peer[0] != s:
                    ready.append(peer[0])
            elif kind.is_recv:
                chunk = ins.chunk_id  # type: ignore[attr-defined]
                peer = placement.prev(s, chunk) if kind.is_activation else placement.next(s, chunk)
                assert peer is not None
                queue = queues.get((peer[0], s))
                if not queue:
                    break
                clock[s] = max(clock[s], queue.popleft())
            pc[s] += 1
    assert all(pc[s] == len(flats[s]) for s in range(stages)), "the reference deadlocked"
    return max(clock), busy, sorted(events)


def random_costs(rng: random.Random, virtual: int) -> Costs:
    def values(n: int) -> tuple[float, ...]:
        return tuple(rng.choice([0.5, 1, 1.5, 2, 3]) for _ in range(n))

    return Costs(values(virtual), values(virtual), values(virtual), values(max(virtual - 1, 1)))


@pytest.mark.parametrize(("name", "factory"), FACTORIES, ids=[n for n, _ in FACTORIES])
def test_simulator_matches_the_reference(name: str, factory: object) -> None:
    rng = random.Random(name)
    for stages, micro_batches in sizes(name):
        program = schedule_program(factory, micro_batches, stages)  # type: ignore[arg-type]
        v_count = program.placement.num_virtual_stages
        for costs in (Costs(), Costs(1, 2, 1, 0.25), random_costs(rng, v_count)):
            if v_count == 1 and isinstance(costs.send, tuple):
                costs = Costs(costs.forward, costs.backward_input, costs.backward_weight, 0.5)
            makespan, busy, events = reference(program, costs)
            result = simulate(program, costs)
            assert result.makespan == pytest.approx(makespan)
            assert result.busy == pytest.approx(busy)
            got = sorted((e.rank, e.name, e.start, e.end) for e in result.events)
            assert [g[:2] for g in got] == [e[:2] for e in events]
            assert np.allclose([g[2:] for g in got], [e[2:] for e in events])


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "zbv", "interleaved"])
def test_numpy_and_python_layerings_agree(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = schedule_factory(name)
    for stages, micro_batches in [(3, 5), (6, 9), (8, 16)]:
        results = []
        for wide in (1, 10**6):  # every graph layered with numpy, then in Python
            monkeypatch.setattr(deps_module, "WIDE", wide)
            program = schedule_program(factory, micro_batches, stages)
            check_program(program)
            results.append(simulate(program, Costs(1, 2, 1.5, 0.5)))
        assert results[0] == results[1]
        assert results[0].events == results[1].events


# -- programs say what the steps say -------------------------------------------------------
@pytest.mark.parametrize(("name", "factory"), FACTORIES, ids=[n for n, _ in FACTORIES])
def test_program_and_steps_agree(name: str, factory: object) -> None:
    for stages, micro_batches in sizes(name):
        program = schedule_program(factory, micro_batches, stages)  # type: ignore[arg-type]
        assert program.table() == schedule_table(factory, micro_batches, stages)  # type: ignore[arg-type]
        for stage, stage_program in enumerate(program.stages):
            again = StageProgram.from_steps(stage_program.steps())
            for field in ("kind", "micro_batch", "chunk", "buffer", "step"):
                assert np.array_equal(getattr(again, field), getattr(stage_program, field))
            assert again.num_steps == stage_program.num_steps
            schedule = factory(micro_batches, stages, stage)  # type: ignore[operator]
            assert program.num_buffers is not None
            assert program.num_buffers[stage] == schedule.num_pipe_buffers()


def test_from_table_keeps_the_objects_and_their_text() -> None:
    table = schedule_table(TrainSchedule, 3, 2)
    program = Program.from_table(table, Placement(2), 3)
    assert program.table() == table
    assert program.stages[1].text(0) == "RA0"  # stage 1's first step is empty
    assert program.stages[1].position(2) == (1, 2)
    assert program.stages[1].position(3) == (2, 0)
    assert program.concat("kind").dtype == np.int8
    assert program.stages[0].kind.base is program.concat("kind")  # packed: one copy
    with pytest.raises(ValueError, match="a program has no field 'x'"):
        program.concat("x")


def test_stage_program_validation() -> None:
    with pytest.raises(ValueError, match=r"StageProgram.chunk has 1 entries but kind has 2"):
        StageProgram([1, 1], [0, 1], [0], [0, 1], [0, 1], 2)
    with pytest.raises(
        ValueError, match=r"StageProgram.kind holds 99, which is no instruction kind"
    ):
        StageProgram([99], [0], [0], [0], [0], 1)
    with pytest.raises(ValueError, match=r"StageProgram.step must be non-decreasing"):
        StageProgram([1, 1], [0, 1], [0, 0], [0, 1], [1, 0], 2)
    with pytest.raises(ValueError, match=r"CUSTOM instructions needs their objects"):
        StageProgram([int(Kind.CUSTOM)], [-1], [-1], [-1], [0], 1)
    assert (
        repr(StageProgram([1], [0], [0], [0], [0], 3)) == "StageProgram(1 instructions in 3 steps)"
    )


def test_assemble_lays_out_slots_in_order() -> None:
    program = assemble(
        3,
        [
            Slot(Kind.LOAD, [0, 2], [0, 1], [0, 1]),
            Slot(Kind.FORWARD, [0, 2], [0, 1], [0, 1]),
            Slot(Kind.OPTIMIZER_STEP, [2]),
        ],
    )
    assert program.steps() == [
        [parse_instruction("L0"), parse_instruction("F0")],
        [],
        [parse_instruction("L1"), parse_instruction("F1"), parse_instruction("OPT")],
    ]
    with pytest.raises(ValueError, match="slot FORWARD puts two instructions in one step"):
        assemble(2, [Slot(Kind.FORWARD, [1, 1], [0, 1], [0, 1])])
    with pytest.raises(ValueError, match=r"slot FORWARD: steps outside 0..1"):
        assemble(2, [Slot(Kind.FORWARD, [2], [0], [0])])


def test_schedule_without_steps_or_program() -> None:
    from stagewise.schedule import PipeSchedule

    class Empty(PipeSchedule):
        pass

    with pytest.raises(TypeError, match="Empty implements neither steps"):
        Empty(1, 1, 0).program()
    with pytest.raises(TypeError, match="Empty implements neither steps"):
        list(Empty(1, 1, 0).steps())


class _OutOfOrder(PassOrderSchedule):
    """Micro-batch 1's backward runs before micro-batch 0's: they leave out of order."""

    def pass_order(self, stage_id: int) -> Iterator[Pass]:
        for mb in range(self.micro_batches):
            yield Pass("F", mb)
        for mb in (1, 0, *range(2, self.micro_batches)):
            yield Pass("B", mb)


def test_buffers_when_micro_batches_leave_out_of_order() -> None:
    table = check_schedule(_OutOfOrder, 4, 3)
    schedule = _OutOfOrder(4, 3, 0)
    assert schedule.num_pipe_buffers() == 4
    buffers = [ins.buffer_id for ins in table[0][0] + table[0][1]]  # type: ignore[attr-defined]
    assert buffers[0] == 0  # the first micro-batch takes buffer 0


def test_round_robin_buffers_when_fifo() -> None:
    """ZB-H1 holds S micro-batches; the k-th takes buffer k mod S (DeepSpeed's rule)."""
    schedule = schedule_factory("zb-h1")(8, 3, 1)
    forwards = [ins for step in schedule.steps() for ins in step if ins.kind == Kind.FORWARD]
    assert [ins.buffer_id for ins in forwards] == [mb % 3 for mb in range(8)]  # type: ignore[attr-defined]


def test_errors_draw_a_window_of_a_large_program_lazily() -> None:
    program = schedule_program(TrainSchedule, 512, 64)
    kinds = program.stages[10].kind
    row = int(np.flatnonzero(kinds == Kind.OPTIMIZER_STEP)[0])
    kinds[row] = Kind.REDUCE_GRADS  # RDG twice, OPT never
    with pytest.raises(ScheduleError, match="stage 10 runs RDG 2 times") as caught:
        check_program(program)
    assert "(showing steps" in str(caught.value)


def test_simulate_takes_a_program_and_refuses_schedule_arguments() -> None:
    program = schedule_program(InferenceSchedule, 3, 2)
    assert simulate(program).makespan == 4
    with pytest.raises(ValueError, match=r"simulate\(program, ...\) takes no schedule arguments"):
        simulate(program, micro_batches=3)


def _table(rows: Sequence[str]) -> list[list[Step]]:
    return [
        [[parse_instruction(t) for t in step.split() if t != "."] for step in row.split("|")]
        for row in rows
    ]


def test_a_receive_nobody_sends_deadlocks_the_simulator() -> None:
    table = _table(["L0 F0 SA0 | .", "RA0 L0 F0 | RA1"])
    with pytest.raises(ScheduleError, match=r"stage 1: RA1 at step 1 waits for stage 0"):
        simulate(table)
