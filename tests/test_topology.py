"""ProcessTopology: DeepSpeed's answers, exhaustively over small grids, and clear errors."""

from __future__ import annotations

import itertools
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

import stagewise.topology as topology_module
from stagewise.topology import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "topology_deepspeed.json").read_text())

#: Small topologies: every axis count 0..3 with dims in 1..3 (and a few specialisations).
GRID: list[tuple[list[str], list[int]]] = [([], [])] + [
    (["pipe", "data", "model"][:count], list(dims))
    for count in (1, 2, 3)
    for dims in itertools.product((1, 2, 3), repeat=count)
]


def build(name: str, kwargs: dict[str, Any]) -> ProcessTopology:
    return getattr(topology_module, name)(**kwargs)  # type: ignore[no-any-return]


# --- DeepSpeed parity, from the golden file (no DeepSpeed needed) ---------------------------


@pytest.mark.parametrize("case", GOLDEN, ids=lambda case: f"{case['class']}{case['kwargs']}")
def test_matches_deepspeed_golden(case: dict[str, Any]) -> None:
    topo = build(case["class"], case["kwargs"])
    axes, dims = case["axes"], case["dims"]
    assert topo.get_axis_names() == axes
    assert topo.dims == dims
    assert topo.world_size() == case["world_size"]
    assert str(topo) == case["str"]
    for rank, coord in enumerate(case["coords"]):
        got = topo.get_coord(rank)
        assert type(got).__name__ == "ProcessCoord" and got._fields == tuple(axes)
        assert list(got) == coord
        assert topo.get_rank(**dict(zip(axes, coord, strict=True))) == rank
    assert [topo.get_rank_repr(rank) for rank in range(topo.world_size())] == case["rank_repr"]
    for omit, inner, outer, expected in case["rank_repr_variants"]:
        got_reprs = [topo.get_rank_repr(r, omit, inner, outer) for r in range(topo.world_size())]
        assert got_reprs == expected
    assert {axis: topo.get_dim(axis) for axis in case["dim"]} == case["dim"]
    for axis, lists in case["comm_lists"].items():
        assert topo.get_axis_comm_lists(axis) == lists
    for axis, lists in case["axis_lists"].items():
        assert [topo.get_axis_list(axis, idx) for idx in range(len(lists))] == lists
    for given, ranks in case["filter_match"]:
        assert topo.filter_match(**given) == ranks


# --- DeepSpeed parity, live (skipped without DeepSpeed) --------------------------------------


@pytest.fixture(scope="module")
def ds_topology() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return pytest.importorskip("deepspeed.runtime.pipe.topology")


def test_matches_deepspeed_live_over_grid(ds_topology: Any) -> None:
    for axes, dims in GRID:
        ours, theirs = ProcessTopology(axes, dims), ds_topology.ProcessTopology(axes, dims)
        assert str(ours) == str(theirs)
        assert ours.get_axis_names() == theirs.get_axis_names()
        assert ours.world_size() == theirs.world_size()
        for rank in range(theirs.world_size()):
            assert ours.get_coord(rank) == theirs.get_coord(rank)
            assert ours.get_rank_repr(rank) == theirs.get_rank_repr(rank)
            assert ours.get_rank_repr(rank, omit_axes=()) == theirs.get_rank_repr(rank, [])
        for axis in [*axes, "other"]:
            assert ours.get_dim(axis) == theirs.get_dim(axis)
            assert ours.get_axis_comm_lists(axis) == theirs.get_axis_comm_lists(axis)
        for axis, dim in zip(axes, dims, strict=True):
            for idx in range(-1, dim + 1):
                assert ours.get_axis_list(axis, idx) == theirs.get_axis_list(axis, idx)
        for values in itertools.product(*[[None, -1, *range(dim + 1)] for dim in dims]):
            given = {
                axis: value for axis, value in zip(axes, values, strict=True) if value is not None
            }
            assert ours.filter_match(**given) == theirs.filter_match(**given), given


def test_specialisations_match_deepspeed_live(ds_topology: Any) -> None:
    for pp, mp, dp in itertools.product((1, 2, 3), repeat=3):
        ours = PipeModelDataParallelTopology(pp, mp, dp)
        theirs = ds_topology.PipeModelDataParallelTopology(pp, mp, dp)
        assert str(ours) == str(theirs)
        assert [ours.get_rank_repr(r) for r in range(ours.world_size())] == [
            theirs.get_rank_repr(r) for r in range(theirs.world_size())
        ]
        for axis in ("pipe", "data", "model"):
            assert ours.get_axis_comm_lists(axis) == theirs.get_axis_comm_lists(axis)
    for pp, dp in itertools.product((1, 2, 4), repeat=2):
        assert str(PipeDataParallelTopology(pp, dp)) == str(
            ds_topology.PipeDataParallelTopology(pp, dp)
        )


# --- Properties, exhaustively over small grids -----------------------------------------------


@pytest.mark.parametrize(("axes", "dims"), GRID, ids=str)
def test_round_trip_and_row_major(axes: list[str], dims: list[int]) -> None:
    topo = ProcessTopology(axes, dims)
    coords = [topo.get_coord(rank) for rank in range(topo.world_size())]
    assert [tuple(c) for c in coords] == list(itertools.product(*[range(d) for d in dims]))
    for rank, coord in enumerate(coords):
        assert topo.get_rank(**coord._asdict()) == rank
    for axis in axes:
        lists = topo.get_axis_comm_lists(axis)
        assert sorted(rank for group in lists for rank in group) == list(range(len(coords)))
        for group in lists:
            others = {
                tuple(v for a, v in topo.get_coord(r)._asdict().items() if a != axis) for r in group
            }
            assert len(others) == 1 and len(group) == topo.get_dim(axis)


def test_huge_topology_is_arithmetic_not_a_scan() -> None:
    # 2**40 ranks: building a mapping or scanning it would never finish.
    topo = ProcessTopology(["outer", "inner"], [2**20, 2**20])
    assert topo.world_size() == 2**40
    assert topo.get_coord(2**40 - 1) == (2**20 - 1, 2**20 - 1)
    assert topo.get_rank(outer=3, inner=5) == 3 * 2**20 + 5
    assert topo.filter_match(outer=7, inner=9) == [7 * 2**20 + 9]
    assert topo.get_rank_repr(2**20 + 2, omit_axes=["outer"]) == "inner_02"


def test_65536_ranks() -> None:
    topo = PipeModelDataParallelTopology(num_pp=64, num_mp=32, num_dp=32)
    assert topo.world_size() == 65536
    assert topo.get_coord(65535) == (63, 31, 31)
    assert topo.get_rank(pipe=1, data=2, model=3) == 1024 + 64 + 3
    assert topo.get_axis_comm_lists("pipe")[1] == list(range(1, 65536, 1024))
    assert topo.filter_match(pipe=5, data=6) == list(range(5 * 1024 + 6 * 32, 5 * 1024 + 7 * 32))


def test_specialisation_axes() -> None:
    assert PipeDataParallelTopology(3, 2).get_axis_names() == ["pipe", "data"]
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=3, num_dp=4)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    assert topo.dims == [2, 4, 3]
    assert topo.get_rank_repr(5) == "model_02"


def test_coords_pickle_and_compare() -> None:
    topo = PipeModelDataParallelTopology(2, 2, 2)
    coord = topo.get_coord(6)
    again = pickle.loads(pickle.dumps(coord))
    assert again == coord and again.pipe == 1 and type(again) is type(coord)
    assert type(PipeModelDataParallelTopology(1, 1, 1).get_coord(0)) is type(coord)


def test_topologies_pickle() -> None:
    for topo in (PipeModelDataParallelTopology(2, 3, 1), PipeDataParallelTopology(2, 2)):
        again = pickle.loads(pickle.dumps(topo))
        assert type(again) is type(topo) and str(again) == str(topo)
        assert again.get_coord(3) == topo.get_coord(3)
        assert type(again.get_coord(3)) is type(topo.get_coord(3))


def test_axis_names_are_a_copy() -> None:
    topo = PipeDataParallelTopology(2, 2)
    topo.get_axis_names().append("oops")
    assert topo.get_axis_names() == ["pipe", "data"]


def test_repr_and_mapping() -> None:
    topo = ProcessTopology(["a", "b"], [1, 2])
    assert repr(topo) == "ProcessTopology(axes=['a', 'b'], dims=[1, 2])"
    assert str(topo) == "{ProcessCoord(a=0, b=0): 0, ProcessCoord(a=0, b=1): 1}"
    assert topo.mapping == {topo.get_coord(0): 0, topo.get_coord(1): 1}


def test_out_of_range_filters_match_nothing() -> None:
    topo = ProcessTopology(["a", "b"], [2, 3])
    assert topo.filter_match(a=2) == []
    assert topo.filter_match(a=-1, b=0) == []
    assert topo.get_axis_list("b", 3) == []
    assert topo.filter_match() == list(range(6))


# --- Errors name the values -------------------------------------------------------------------


def test_get_rank_errors() -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 3])
    with pytest.raises(ValueError, match=r"missing \['data'\], unknown \[\].*filter_match"):
        topo.get_rank(pipe=0)
    with pytest.raises(ValueError, match=r"missing \['data'\], unknown \['model'\]"):
        topo.get_rank(pipe=0, model=1)
    with pytest.raises(ValueError, match=r"data=3 is outside range\(3\)"):
        topo.get_rank(pipe=0, data=3)
    with pytest.raises(ValueError, match=r"pipe=-1 is outside range\(2\)"):
        topo.get_rank(pipe=-1, data=0)
    with pytest.raises(ValueError, match=r"coordinate pipe must be an integer, got 'x'"):
        topo.get_rank(pipe="x", data=0)


@pytest.mark.parametrize("rank", [-1, 6, 100, "1", 1.5, None])
def test_get_coord_outside(rank: Any) -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 3])
    with pytest.raises(ValueError, match=r"not found in topology: ranks are 0\.\.5"):
        topo.get_coord(rank)
    with pytest.raises(ValueError, match="not found in topology"):
        topo.get_rank_repr(rank)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"one dim per axis, got 2 axes \['a', 'b'\] and 1 dims"):
        ProcessTopology(["a", "b"], [2])
    with pytest.raises(ValueError, match=r"dim of axis 'b' must be at least 1, got 0"):
        ProcessTopology(["a", "b"], [2, 0])
    with pytest.raises(ValueError, match=r"dim of axis 'pipe' must be at least 1, got -2"):
        PipeDataParallelTopology(-2, 1)
    with pytest.raises(ValueError, match=r"dim of axis 'a' must be an integer, got 2.0"):
        ProcessTopology(["a"], [2.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="duplicate field name"):
        ProcessTopology(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="Type names and field names"):
        ProcessTopology(["not valid"], [1])


def test_unknown_axis_errors() -> None:
    topo = ProcessTopology(["pipe", "data"], [2, 3])
    with pytest.raises(
        ValueError, match=r"filter_match\(\): unknown axis 'model'.*\['pipe', 'data'\]"
    ):
        topo.filter_match(model=0)
    with pytest.raises(ValueError, match=r"get_axis_list\(\): unknown axis 'model'"):
        topo.get_axis_list("model", 0)
    with pytest.raises(ValueError, match=r"coordinate pipe must be an integer, got 'a'"):
        topo.filter_match(pipe="a")
    assert topo.get_axis_comm_lists("model") == []
    assert topo.get_dim("model") == 0
