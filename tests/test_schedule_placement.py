"""Placement: one value says where every virtual stage lives; schedules and the registry read it."""

from __future__ import annotations

import doctest

import pytest

from stagewise.schedule import (
    Placement,
    PlacementKind,
    get_schedule_class,
    schedule_factory,
    schedule_layout,
    schedule_names,
)
from stagewise.schedule import placement as placement_module
from stagewise.schedule.chunked_inference import ChunkedInferenceSchedule
from stagewise.schedule.interleaved import InterleavedSchedule
from stagewise.schedule.zero_bubble import ZBVSchedule


@pytest.mark.parametrize("stages", range(1, 7))
@pytest.mark.parametrize(("kind", "chunks"), [("loop", 1), ("loop", 2), ("loop", 3), ("v", 2)])
def test_locate_inverts_virtual_stage(stages: int, kind: str, chunks: int) -> None:
    placement = Placement(stages, chunks, kind)  # type: ignore[arg-type]
    seen = []
    for stage in range(stages):
        for chunk in range(chunks):
            virtual = placement.virtual_stage(stage, chunk)
            assert placement.locate(virtual) == (stage, chunk)
            seen.append(virtual)
    assert sorted(seen) == list(range(placement.num_virtual_stages))
    first, last = placement.locate(0), placement.locate(placement.num_virtual_stages - 1)
    for stage in range(stages):
        assert placement.stage_holds_input(stage) == (stage == first[0])
        assert placement.stage_holds_loss(stage) == (stage == last[0])
        for chunk in range(chunks):
            assert placement.is_first(stage, chunk) == ((stage, chunk) == first)
            assert placement.is_last(stage, chunk) == ((stage, chunk) == last)
            nxt, prv = placement.next(stage, chunk), placement.prev(stage, chunk)
            virtual = placement.virtual_stage(stage, chunk)
            assert nxt == (None if (stage, chunk) == last else placement.locate(virtual + 1))
            assert prv == (None if (stage, chunk) == first else placement.locate(virtual - 1))


def test_loop_and_v() -> None:
    loop = Placement(3, 2, PlacementKind.LOOP)
    assert [loop.virtual_stages_of(s) for s in range(3)] == [(0, 3), (1, 4), (2, 5)]
    v = Placement(3, 2, PlacementKind.V)
    assert [v.virtual_stages_of(s) for s in range(3)] == [(0, 5), (1, 4), (2, 3)]
    assert v.stage_holds_input(0) and v.stage_holds_loss(0)
    assert v.next(2, 0) == (2, 1)  # the turn of the V stays on the last stage


def test_value_semantics() -> None:
    assert Placement(4, 2, "v") == Placement(4, 2, PlacementKind.V)  # type: ignore[arg-type]
    assert Placement(4) == Placement(4, 1, PlacementKind.LOOP)
    assert hash(Placement(4, 2, PlacementKind.V)) == hash(Placement(4, 2, PlacementKind.V))
    assert Placement(4, 2, PlacementKind.V) != Placement(4, 2, PlacementKind.LOOP)
    assert str(Placement(4, 2, PlacementKind.V)) == "v placement of 4 stage(s) × 2 chunk(s)"


def test_parse() -> None:
    assert PlacementKind.parse(" V ") is PlacementKind.V
    assert PlacementKind.parse("loop") is PlacementKind.LOOP
    assert PlacementKind.parse(PlacementKind.V) is PlacementKind.V
    assert str(PlacementKind.V) == "v"
    with pytest.raises(ValueError, match=r"unknown placement 'zigzag': use 'loop' .* or 'v'"):
        PlacementKind.parse("zigzag")
    with pytest.raises(ValueError, match=r"unknown placement 2"):
        PlacementKind.parse(2)  # type: ignore[arg-type]


def test_validation() -> None:
    with pytest.raises(ValueError, match=r"'v' placement has exactly 2 chunks .* got chunks=3"):
        Placement(4, 3, PlacementKind.V)
    with pytest.raises(ValueError, match=r"Placement.stages must be an integer >= 1, got 0"):
        Placement(0)
    with pytest.raises(ValueError, match=r"Placement.chunks must be an integer >= 1, got True"):
        Placement(2, True)
    placement = Placement(3, 2)
    with pytest.raises(ValueError, match=r"virtual_stage must be in \[0, 6\) .* got -1"):
        placement.locate(-1)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 3\), got 3"):
        placement.virtual_stage(3, 0)
    with pytest.raises(ValueError, match=r"chunks 0..1, got chunk_id=2"):
        placement.virtual_stage(0, 2)


# -- schedules and the registry read it -----------------------------------------------------
@pytest.mark.parametrize("name", schedule_names())
def test_schedules_hold_the_layout_the_registry_gives(name: str) -> None:
    for stages in (1, 2, 5):
        layout = schedule_layout(name, None, stages)
        schedule = schedule_factory(name)(2 * stages, stages, 0)  # dualpipev: M >= 2S
        assert schedule.placement == layout
        assert schedule.num_chunks == layout.chunks
        for stage in range(stages):
            for chunk in range(layout.chunks):
                assert schedule.virtual_stage(stage, chunk) == layout.virtual_stage(stage, chunk)


def test_layouts_by_name() -> None:
    assert schedule_layout("1f1b", None, 4) == Placement(4)
    assert schedule_layout("1F1B", 1, 4) == Placement(4)
    assert schedule_layout("zbv", None, 4) == Placement(4, 2, PlacementKind.V)
    assert schedule_layout("zbv", 2, 4) == Placement(4, 2, PlacementKind.V)
    assert schedule_layout("interleaved", None, 4) == Placement(4, 2)
    assert schedule_layout("interleaved", 3, 4) == Placement(4, 3)
    with pytest.raises(ValueError, match=r"schedule 'zbv' runs 2 chunk\(s\) per stage, got"):
        schedule_layout("zbv", 3, 4)
    with pytest.raises(ValueError, match=r"virtual_stages must be an integer >= 1"):
        schedule_layout("interleaved", 0, 4)
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'nope'"):
        schedule_layout("nope", None, 4)


def test_chunk_counts_come_from_the_classes() -> None:
    assert get_schedule_class("zbv").placement_kind is PlacementKind.V
    assert ZBVSchedule.placement_for(3) == Placement(3, 2, PlacementKind.V)
    assert InterleavedSchedule.configurable_chunks
    assert not ZBVSchedule.configurable_chunks
    assert InterleavedSchedule.placement_for(3, 4) == Placement(3, 4)


def test_chunked_inference_follows_its_layout() -> None:
    layout = ZBVSchedule(4, 3, 1)
    inference = ChunkedInferenceSchedule(4, 3, 1, layout)
    assert inference.placement == layout.placement
    assert inference.locate(5) == (0, 1)


def test_doctests() -> None:
    assert doctest.testmod(placement_module).failed == 0
