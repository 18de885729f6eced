"""Regenerate the DeepSpeed golden files of the topology and partition tests.

Needs DeepSpeed (0.19.8 made the committed files); run from the repository root:

    DS_ACCELERATOR=cpu .venv/bin/python tests/golden/make_golden.py

The tests read these files, so they check DeepSpeed parity without DeepSpeed.
``tests/golden/make_deepspeed_golden.py`` writes the other DeepSpeed goldens (config
keys, optimizer defaults, the example's losses).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe import topology as ds_topology

HERE = Path(__file__).parent

#: (class name, constructor keyword arguments) of every golden topology.
TOPOLOGY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("ProcessTopology", {"axes": ["x"], "dims": [3]}),
    ("ProcessTopology", {"axes": ["a", "b"], "dims": [2, 3]}),
    ("ProcessTopology", {"axes": ["a", "b", "c", "d"], "dims": [2, 1, 3, 2]}),
    ("PipeDataParallelTopology", {"num_pp": 4, "num_dp": 2}),
    ("PipeModelDataParallelTopology", {"num_pp": 2, "num_mp": 3, "num_dp": 2}),
    ("PipeModelDataParallelTopology", {"num_pp": 3, "num_mp": 1, "num_dp": 2}),
]

#: (omit_axes, inner_sep, outer_sep) asked of get_rank_repr besides the defaults.
REPR_VARIANTS: list[tuple[list[str], str, str]] = [
    ([], "_", "-"),
    (["model"], "=", "/"),
    (["a", "pipe"], "", "."),
]


def topology_record(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Everything DeepSpeed answers for one topology (queries over all small arguments)."""
    topo = getattr(ds_topology, name)(**kwargs)
    axes, dims = list(topo.get_axis_names()), list(topo.dims)
    world = topo.world_size()
    filters = []
    for values in itertools.product(*[[None, *range(dim + 1)] for dim in dims]):
        given = {axis: value for axis, value in zip(axes, values, strict=True) if value is not None}
        filters.append([given, topo.filter_match(**given)])
    return {
        "class": name,
        "kwargs": kwargs,
        "axes": axes,
        "dims": dims,
        "world_size": world,
        "str": str(topo),
        "coords": [list(topo.get_coord(rank)) for rank in range(world)],
        "rank_repr": [topo.get_rank_repr(rank) for rank in range(world)],
        "rank_repr_variants": [
            [omit, inner, outer, [topo.get_rank_repr(r, omit, inner, outer) for r in range(world)]]
            for omit, inner, outer in REPR_VARIANTS
        ],
        "dim": {axis: topo.get_dim(axis) for axis in [*axes, "nope"]},
        "comm_lists": {axis: topo.get_axis_comm_lists(axis) for axis in [*axes, "nope"]},
        "axis_lists": {
            axis: [topo.get_axis_list(axis, idx) for idx in range(dim + 1)]
            for axis, dim in zip(axes, dims, strict=True)
        },
        "filter_match": filters,
    }


def balanced_cases() -> list[dict[str, Any]]:
    """DeepSpeed's partition_balanced on seeded random weights (ints, floats, zeros)."""
    rng = random.Random(20240519)
    cases = []
    for index in range(60):
        n = rng.randint(1, 24)
        parts = rng.randint(1, 8)
        if index % 3 == 0:
            weights: list[float] = [rng.randint(0, 1000) for _ in range(n)]
        elif index % 3 == 1:
            weights = [round(rng.uniform(0.0, 5.0), 6) for _ in range(n)]
        else:
            weights = [rng.choice([0, 0, 1, 7, 40]) for _ in range(n)]
        boundaries = [int(b) for b in ds_utils.partition_balanced(weights, parts)]
        cases.append({"weights": weights, "num_parts": parts, "deepspeed": boundaries})
    return cases


#: Parameter counts of torchvision's AlexNet (22 layers as DeepSpeed's example cuts it:
#: features, avgpool, flatten, classifier) and of DeepSpeed's CIFAR AlexNet (15 layers).
ALEXNET_22 = [23296, 0, 0, 307392, 0, 0, 663936, 0, 884992, 0, 590080, 0, 0, 0, 0, 0,
              37752832, 0, 0, 16781312, 0, 40970]  # fmt: skip
ALEXNET_CIFAR = [23296, 0, 0, 307392, 0, 0, 663936, 0, 884992, 0, 590080, 0, 0, 0, 2570]


def tie_cases() -> list[dict[str, Any]]:
    """DeepSpeed's partition_balanced where many splits tie: zeros and repeated weights."""
    rng = random.Random(20250101)
    alphabets: list[list[float]] = [
        [0, 1],
        [0, 0, 0, 1, 2],
        [0, 5, 5, 10],
        [0, 0, 3, 3, 3, 7],
        [0.0, 0.5, 1.5],
        [1, 1, 1, 2],
    ]
    cases = []
    for index in range(300):
        n = rng.randint(2, 24)
        parts = rng.randint(2, min(8, n))
        alphabet = alphabets[index % len(alphabets)]
        weights = [rng.choice(alphabet) for _ in range(n)]
        cases.append({"weights": weights, "num_parts": parts})
    for parts in range(2, 9):
        cases.append({"weights": list(ALEXNET_22), "num_parts": parts})
    for parts in range(2, 5):
        cases.append({"weights": list(ALEXNET_CIFAR), "num_parts": parts})
    for n in range(2, 20):
        for parts in range(2, min(8, n) + 1):
            cases.append({"weights": [0] * n, "num_parts": parts})
            cases.append({"weights": [5] * n, "num_parts": parts})
    for case in cases:
        result = ds_utils.partition_balanced(case["weights"], case["num_parts"])
        case["deepspeed"] = [int(b) for b in result]
    return cases


def main() -> None:
    topology = [topology_record(name, kwargs) for name, kwargs in TOPOLOGY_CASES]
    (HERE / "topology_deepspeed.json").write_text(
        json.dumps(topology, separators=(",", ":")) + "\n"
    )
    uniform = [
        [[int(b) for b in ds_utils.partition_uniform(n, parts)] for parts in range(1, 17)]
        for n in range(65)
    ]
    partition = {
        "partition_uniform": uniform,
        "partition_balanced": balanced_cases(),
        "partition_ties": tie_cases(),
    }
    (HERE / "partition_deepspeed.json").write_text(
        json.dumps(partition, separators=(",", ":")) + "\n"
    )


if __name__ == "__main__":
    main()
