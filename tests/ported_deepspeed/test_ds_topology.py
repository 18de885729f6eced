"""DeepSpeed's ``tests/unit/runtime/pipe/test_topology.py``, checked in our words.

Through ``stagewise.runtime.pipe.topology`` and ``stagewise.comm``. DeepSpeed's
grid tests also call the private ``PipelineParallelGrid._is_grid_valid()``; the
public fact it checks (the topology covers the world) is checked instead.
"""

from __future__ import annotations

import pytest
import torch

import stagewise.comm as dist
from ported_deepspeed.common import DistributedTest
from stagewise.accelerator import get_accelerator
from stagewise.runtime.pipe.topology import PipelineParallelGrid as Grid
from stagewise.runtime.pipe.topology import ProcessTopology as Topo
from stagewise.runtime.pipe.topology import _prime_factors


def test_two_and_three_axes() -> None:
    topo = Topo(axes=["row", "col"], dims=[2, 2])
    assert topo.world_size() == 4
    assert [topo.get_rank(row=r, col=c) for r in (0, 1) for c in (0, 1)] == [0, 1, 2, 3]
    assert [topo.get_axis_list(axis="row", idx=i) for i in (0, 1)] == [[0, 1], [2, 3]]
    assert [topo.get_axis_list(axis="col", idx=i) for i in (0, 1)] == [[0, 2], [1, 3]]
    topo = Topo(axes=["a", "b", "c"], dims=[2, 3, 4])
    assert topo.world_size() == 24 and [topo.get_dim(a) for a in "abc"] == [2, 3, 4]
    topo = Topo(axes=["a", "b", "c"], dims=[2, 2, 2])
    ranks = [topo.get_rank(a=a, b=b, c=c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    assert ranks == list(range(8))
    assert [topo.get_coord(r) for r in range(8)] == [
        topo.ProcessCoord(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)
    ]
    assert topo.get_axis_list("b", 1) == [2, 3, 6, 7] and topo.get_axis_list("c", 0) == [0, 2, 4, 6]
    assert topo.filter_match(a=0) == [0, 1, 2, 3] and topo.filter_match(b=1, c=1) == [3, 7]
    assert topo.filter_match(a=1, b=1, c=1) == [7] and topo.get_coord(0).a == 0


def test_matching_and_communicator_lists() -> None:
    topo = Topo(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert topo.filter_match(pipe=0, data=1) == [2, 3]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.get_axis_comm_lists("jeff") == []  # an axis it lacks: no lists, no error


def test_rank_repr() -> None:
    topo = Topo(axes=["a", "b"], dims=[2, 2])
    assert [topo.get_rank_repr(rank=r) for r in range(4)] == [
        "a_00-b_00",
        "a_00-b_01",
        "a_01-b_00",
        "a_01-b_01",
    ]
    assert topo.get_rank_repr(rank=3, inner_sep="+") == "a+01-b+01"
    assert topo.get_rank_repr(rank=3, inner_sep="~", outer_sep="_X_") == "a~01_X_b~01"
    topo = Topo(axes=["pipe", "data"], dims=[2, 2])
    assert {topo.get_rank_repr(rank=r) for r in range(4)} == {""}
    assert [topo.get_rank_repr(rank=r, omit_axes=["pipe"]) for r in range(4)] == [
        "data_00",
        "data_01",
    ] * 2
    assert topo.get_rank_repr(rank=2, omit_axes=[]) == "pipe_01-data_00"
    topo = Topo(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert [topo.get_rank_repr(rank=r) for r in range(8)] == ["model_00", "model_01"] * 4


def test_prime_factors() -> None:
    with pytest.raises(ValueError, match="positive integer, got 0"):
        _prime_factors(0)
    for number in range(1, 30):
        factors = _prime_factors(number)
        assert torch.tensor(factors, dtype=torch.long).prod().item() == number
        assert all(_prime_factors(p) == [p] for p in factors)


class TestDistributedTopology(DistributedTest):
    world_size = 4

    def test_grid_pipe_data(self) -> None:
        topo = Topo(axes=["pipe", "data"], dims=[2, 2])
        grid = Grid(topology=topo)
        assert topo.world_size() == dist.get_world_size()
        rank = dist.get_rank()
        assert grid.is_first_stage == (grid.get_stage_id() == 0)
        assert grid.is_last_stage == (
            grid.get_stage_id() == grid.get_pipe_parallel_world_size() - 1
        )
        for group, members in (
            (grid.get_pipe_parallel_group(), grid.pp_group),
            (grid.get_data_parallel_group(), grid.dp_group),
        ):
            total = torch.LongTensor([rank]).to(get_accelerator().device_name())
            dist.all_reduce(total, group=group)
            assert int(total) == sum(members)
        assert [grid.stage_to_global(stage_id=s, data=d) for s in (0, 1) for d in (0, 1)] == [
            0,
            1,
            2,
            3,
        ]
        me = topo.get_coord(rank=rank)
        assert [grid.stage_to_global(stage_id=s) for s in (0, 1)] == [me.data, 2 + me.data]
