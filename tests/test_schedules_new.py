"""GPipe, interleaved 1F1B, ZB-H1 and ZB-V: sound on every size, exact where it matters."""

from __future__ import annotations

import doctest
import functools
import inspect
from collections.abc import Callable

import pytest

from stagewise.schedule import (
    BackwardInputPass,
    BackwardPass,
    BackwardWeightPass,
    ForwardPass,
    LoadMicroBatch,
    PipeSchedule,
    SendActivation,
    SendGrad,
    TrainSchedule,
    check_schedule,
)
from stagewise.schedule import gpipe as gpipe_module
from stagewise.schedule import interleaved as interleaved_module
from stagewise.schedule import registry as registry_module
from stagewise.schedule import zero_bubble as zero_bubble_module
from stagewise.schedule.gpipe import GPipeSchedule
from stagewise.schedule.interleaved import InterleavedSchedule
from stagewise.schedule.order import Pass, PassOrderSchedule
from stagewise.schedule.registry import (
    get_schedule_class,
    make_schedule,
    schedule_factory,
    schedule_names,
)
from stagewise.schedule.render import format_timeline
from stagewise.schedule.simulate import simulate
from stagewise.schedule.zero_bubble import ZBVSchedule, ZeroBubbleH1Schedule, ZeroBubbleH2Schedule

Factory = Callable[..., PipeSchedule]

#: every new schedule, as the registry builds it, with an id for the test name.
NEW_SCHEDULES: list[tuple[str, Factory]] = [
    ("gpipe", schedule_factory("gpipe")),
    ("interleaved-v1", schedule_factory("interleaved", 1)),
    ("interleaved-v2", schedule_factory("interleaved", 2)),
    ("interleaved-v3", schedule_factory("interleaved", 3)),
    ("zb-h1", schedule_factory("zb-h1")),
    ("zbv", schedule_factory("zbv")),
    ("zb-h2", schedule_factory("zb-h2")),
]


def steps_of(factory: Factory, micro_batches: int, stages: int) -> list[list[list[str]]]:
    """Every stage's steps as instruction texts."""
    return [
        [[repr(ins) for ins in step] for step in factory(micro_batches, stages, s).steps()]
        for s in range(stages)
    ]


# -- soundness: the checker over every size --------------------------------------------
@pytest.mark.parametrize("stages", range(1, 9))
@pytest.mark.parametrize(("name", "factory"), NEW_SCHEDULES, ids=[n for n, _ in NEW_SCHEDULES])
def test_checker_passes_every_size(name: str, factory: Factory, stages: int) -> None:
    """Sends meet receives in order, no deadlock, every pass once, buffers sound."""
    for micro_batches in range(1, 33):
        check_schedule(factory, micro_batches, stages)


@pytest.mark.parametrize(("name", "factory"), NEW_SCHEDULES, ids=[n for n, _ in NEW_SCHEDULES])
def test_activation_leaves_right_after_its_forward(name: str, factory: Factory) -> None:
    """The engine sends asynchronously: SA is issued in the step of its forward, next to it."""
    for stage_id in range(4):
        for step in factory(7, 4, stage_id).steps():
            for i, ins in enumerate(step):
                if isinstance(ins, SendActivation):
                    forward = step[i - 1]
                    assert isinstance(forward, ForwardPass)
                    assert (forward.micro_batch_id, forward.chunk_id) == (
                        ins.micro_batch_id,
                        ins.chunk_id,
                    )


@pytest.mark.parametrize(("name", "factory"), NEW_SCHEDULES, ids=[n for n, _ in NEW_SCHEDULES])
def test_input_gradient_leaves_right_after_its_backward(name: str, factory: Factory) -> None:
    for stage_id in range(4):
        for step in factory(7, 4, stage_id).steps():
            for i, ins in enumerate(step):
                if isinstance(ins, SendGrad):
                    backward = step[i - 1]
                    assert isinstance(backward, BackwardPass | BackwardInputPass)
                    assert backward.micro_batch_id == ins.micro_batch_id


@pytest.mark.parametrize(("name", "factory"), NEW_SCHEDULES, ids=[n for n, _ in NEW_SCHEDULES])
def test_reductions_close_the_last_step(name: str, factory: Factory) -> None:
    for stage_id in range(3):
        steps = list(factory(5, 3, stage_id).steps())
        assert [repr(ins) for ins in steps[-1][-3:]] == ["RTG", "RDG", "OPT"]
        assert all(ins.code not in ("RTG", "RDG", "OPT") for step in steps[:-1] for ins in step)


def test_split_backward_only_in_zero_bubble_schedules() -> None:
    kinds = {
        name: {type(ins) for s in range(4) for step in f(8, 4, s).steps() for ins in step}
        for name, f in NEW_SCHEDULES
    }
    for name in ("zb-h1", "zbv", "zb-h2"):
        assert {BackwardInputPass, BackwardWeightPass} <= kinds[name]
        assert BackwardPass not in kinds[name]
    for name in ("gpipe", "interleaved-v1", "interleaved-v2", "interleaved-v3"):
        assert BackwardPass in kinds[name]
        assert not {BackwardInputPass, BackwardWeightPass} & kinds[name]


def test_iterating_a_schedule_yields_its_steps_again() -> None:
    schedule = ZBVSchedule(4, 2, 1)
    assert [list(step) for step in schedule] == [list(step) for step in schedule.steps()]
    assert [list(step) for step in schedule] == [list(step) for step in schedule.steps()]


# -- GPipe -------------------------------------------------------------------------------
def test_gpipe_golden_steps() -> None:
    assert steps_of(GPipeSchedule, 2, 2) == [
        [
            ["L0", "F0", "SA0"],
            ["L1", "F1", "SA1"],
            ["RG0", "B0"],
            ["RG1", "B1", "RTG", "RDG", "OPT"],
        ],
        [
            ["RA0", "L0", "F0"],
            ["RA1", "L1", "F1"],
            ["B0", "SG0"],
            ["B1", "SG1", "RTG", "RDG", "OPT"],
        ],
    ]


@pytest.mark.parametrize(("micro_batches", "stages"), [(1, 1), (4, 3), (9, 2)])
def test_gpipe_holds_every_micro_batch(micro_batches: int, stages: int) -> None:
    for stage_id in range(stages):
        assert GPipeSchedule(micro_batches, stages, stage_id).num_pipe_buffers() == micro_batches


# -- interleaved -----------------------------------------------------------------------
def test_interleaved_places_chunks_in_a_loop() -> None:
    schedule = InterleavedSchedule(8, 4, 1, virtual_stages=3)
    assert schedule.num_chunks == 3
    assert [schedule.virtual_stage(1, c) for c in range(3)] == [1, 5, 9]
    assert schedule.locate(9) == (1, 2)


def test_interleaved_follows_megatrons_chunk_order() -> None:
    """Forwards go group by group (S micro-batches), chunk by chunk; backwards reverse chunks."""
    order = [repr(p) for p in InterleavedSchedule(4, 2, 0, virtual_stages=2).pass_order(0)]
    forwards = [text for text in order if text.startswith("F")]
    backwards = [text for text in order if text.startswith("B")]
    assert forwards == ["F0", "F1", "F0c1", "F1c1", "F2", "F3", "F2c1", "F3c1"]
    assert backwards == ["B0c1", "B1c1", "B0", "B1", "B2c1", "B3c1", "B2", "B3"]
    # stage 0 warms up with 2 (S - 1) + (V - 1) S = 4 forwards, then alternates
    assert order[:6] == ["F0", "F1", "F0c1", "F1c1", "F2", "B0c1"]


def test_interleaved_with_one_chunk_orders_passes_like_1f1b() -> None:
    for stage_id in range(4):
        ours = [
            repr(p)
            for p in InterleavedSchedule(6, 4, stage_id, virtual_stages=1).pass_order(stage_id)
        ]
        deepspeed = [
            repr(ins)
            for step in TrainSchedule(6, 4, stage_id).steps()
            for ins in step
            if ins.code in ("F", "B")
        ]
        assert ours == [text.split("b")[0] for text in deepspeed]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_interleaved_rejects_bad_virtual_stages(bad: object) -> None:
    with pytest.raises(ValueError, match=r"virtual_stages must be an integer >= 1"):
        InterleavedSchedule(4, 2, 0, virtual_stages=bad)  # type: ignore[arg-type]


# -- ZB-H1 -------------------------------------------------------------------------------
def test_zb_h1_defers_weight_gradients_by_stage() -> None:
    """Stage s runs I(k - (S-1-s)) and W(k - (S-1)) in iteration k."""
    order = [repr(p) for p in ZeroBubbleH1Schedule(6, 4, 1).pass_order(1)]
    assert order[:10] == ["F0", "F1", "F2", "I0", "F3", "I1", "W0", "F4", "I2", "W1"]
    assert order[-3:] == ["I5", "W4", "W5"]


@pytest.mark.parametrize(("micro_batches", "stages"), [(1, 1), (2, 4), (8, 4), (32, 8)])
def test_zb_h1_buffers(micro_batches: int, stages: int) -> None:
    for stage_id in range(stages):
        schedule = ZeroBubbleH1Schedule(micro_batches, stages, stage_id)
        assert schedule.num_pipe_buffers() == min(stages, micro_batches)


# -- ZB-V --------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", [1, 2, 5])
def test_zbv_places_chunks_in_a_v(stages: int) -> None:
    schedule = ZBVSchedule(4, stages, 0)
    seen = []
    for stage in range(stages):
        assert schedule.virtual_stage(stage, 0) == stage
        assert schedule.virtual_stage(stage, 1) == 2 * stages - 1 - stage
        for chunk in (0, 1):
            virtual = schedule.virtual_stage(stage, chunk)
            assert schedule.locate(virtual) == (stage, chunk)
            seen.append(virtual)
    assert sorted(seen) == list(range(2 * stages))


def test_zbv_rejects_bad_placement_queries() -> None:
    schedule = ZBVSchedule(4, 3, 0)
    with pytest.raises(
        ValueError, match=r"virtual_stage must be in \[0, 6\) for 3 stages × 2 chunks, got 6"
    ):
        schedule.locate(6)
    with pytest.raises(ValueError, match=r"chunks 0..1, got chunk_id=2"):
        schedule.virtual_stage(0, 2)


def test_zbv_turns_on_the_last_stage_with_a_local_transfer() -> None:
    """Chunk 0 to chunk 1 of the last stage is a send and a receive on the same rank."""
    texts = [repr(ins) for step in ZBVSchedule(2, 3, 2).steps() for ins in step]
    for mb in range(2):
        assert texts.index(f"SA{mb}") < texts.index(f"RA{mb}c1")  # activation turns
        assert texts.index(f"SG{mb}c1") < texts.index(f"RG{mb}")  # and its gradient


def test_zbv_first_stage_loads_inputs_and_labels_per_chunk() -> None:
    """Stage 0 holds virtual stage 0 (inputs) and the last one (labels): one load each."""
    loads = [
        (ins.micro_batch_id, ins.chunk_id)
        for step in ZBVSchedule(3, 2, 0).steps()
        for ins in step
        if isinstance(ins, LoadMicroBatch)
    ]
    assert sorted(loads) == [(mb, chunk) for mb in range(3) for chunk in (0, 1)]
    assert not any(ins.code == "L" for step in ZBVSchedule(3, 2, 1).steps() for ins in step)


def test_zbv_buffers_are_per_chunk() -> None:
    schedule = ZBVSchedule(16, 4, 0)
    buffers = {
        (ins.chunk_id, ins.buffer_id)
        for step in schedule.steps()
        for ins in step
        if isinstance(ins, ForwardPass)
    }
    assert max(b for _, b in buffers) == schedule.num_pipe_buffers() - 1
    assert {c for c, _ in buffers} == {0, 1}


# -- the timelines in the docstrings are the real ones -----------------------------------
@pytest.mark.parametrize(
    ("cls", "factory", "micro_batches", "stages"),
    [
        (GPipeSchedule, GPipeSchedule, 4, 3),
        (InterleavedSchedule, functools.partial(InterleavedSchedule, virtual_stages=2), 4, 2),
        (ZeroBubbleH1Schedule, ZeroBubbleH1Schedule, 6, 4),
        (ZBVSchedule, ZBVSchedule, 4, 2),
        (ZeroBubbleH2Schedule, ZeroBubbleH2Schedule, 6, 3),
    ],
)
def test_docstring_timelines_match_the_simulation(
    cls: type[PassOrderSchedule], factory: Factory, micro_batches: int, stages: int
) -> None:
    drawn = format_timeline(simulate(factory, micro_batches=micro_batches, stages=stages).events)
    doc = [line.strip() for line in inspect.getdoc(cls).splitlines()]  # type: ignore[union-attr]
    for line in drawn.splitlines():
        assert line.strip() in doc, f"{cls.__name__}'s docstring lacks:\n{line}"


# -- the base class ------------------------------------------------------------------------
class _Broken(PassOrderSchedule):
    """Stage 1 forgets micro-batch 1, so stage 1 never sends its gradient."""

    def pass_order(self, stage_id: int):  # type: ignore[no-untyped-def]
        for mb in range(self.micro_batches):
            if not (stage_id == 1 and mb == 1):
                yield Pass("F", mb)
        for mb in range(self.micro_batches):
            if not (stage_id == 1 and mb == 1):
                yield Pass("B", mb)


def test_pass_order_that_skips_a_micro_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"stage 0 needs the gradient of micro-batch 1"):
        list(_Broken(2, 2, 0).steps())


def test_unknown_pass_kind_is_an_error() -> None:
    class Odd(PassOrderSchedule):
        def pass_order(self, stage_id: int):  # type: ignore[no-untyped-def]
            yield Pass("X", 0)

    with pytest.raises(ValueError, match=r"unknown pass kind 'X'"):
        list(Odd(1, 1, 0).steps())


def test_pass_text() -> None:
    assert repr(Pass("F", 3)) == "F3"
    assert repr(Pass("W", 2, 1)) == "W2c1"


# -- registry ------------------------------------------------------------------------------
def test_registry_names_every_schedule() -> None:
    assert schedule_names() == [
        "1f1b",
        "gpipe",
        "interleaved",
        "zb-h1",
        "zbv",
        "zb-h2",
        "dualpipev",
    ]
    assert get_schedule_class("1f1b") is TrainSchedule
    assert get_schedule_class("GPipe") is GPipeSchedule
    assert get_schedule_class("zb_h1") is ZeroBubbleH1Schedule
    assert get_schedule_class("zbv") is ZBVSchedule
    assert get_schedule_class("interleaved") is InterleavedSchedule


def test_unknown_schedule_lists_the_valid_names() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown pipeline schedule 'pipedream': valid names are 1f1b, gpipe, interleaved, zb-h1, zbv, zb-h2, dualpipev",
    ):
        get_schedule_class("pipedream")
    with pytest.raises(TypeError, match=r"must be a string, got int 3"):
        get_schedule_class(3)  # type: ignore[arg-type]


def test_make_schedule() -> None:
    schedule = make_schedule("interleaved", 8, 4, 2, virtual_stages=3)
    assert isinstance(schedule, InterleavedSchedule)
    assert (schedule.micro_batches, schedule.stages, schedule.stage_id, schedule.num_chunks) == (
        8,
        4,
        2,
        3,
    )
    assert make_schedule("interleaved", 8, 4, 2).num_chunks == 2
    assert make_schedule("zbv", 8, 4, 2, virtual_stages=2).num_chunks == 2
    assert isinstance(make_schedule("1f1b", 8, 4, 2, virtual_stages=1), TrainSchedule)


def test_fixed_chunk_schedules_reject_other_virtual_stages() -> None:
    with pytest.raises(
        ValueError, match=r"'zbv' runs 2 chunk\(s\) per stage, got virtual_stages=3"
    ):
        make_schedule("zbv", 8, 4, 0, virtual_stages=3)
    with pytest.raises(
        ValueError, match=r"'1f1b' runs 1 chunk\(s\) per stage, got virtual_stages=2"
    ):
        schedule_factory("1f1b", 2)
    with pytest.raises(ValueError, match=r"virtual_stages must be an integer >= 1"):
        schedule_factory("interleaved", 0)


def test_engine_style_keyword_construction() -> None:
    """The engine builds schedules with keywords; every registered class accepts them."""
    for name in schedule_names():
        schedule = get_schedule_class(name)(micro_batches=4, stages=2, stage_id=1)
        assert (schedule.micro_batches, schedule.stages, schedule.stage_id) == (4, 2, 1)


@pytest.mark.parametrize(
    "module", [gpipe_module, interleaved_module, zero_bubble_module, registry_module]
)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.failed == 0
