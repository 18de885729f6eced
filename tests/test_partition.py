"""Partitioning: DeepSpeed's uniform split, an optimal balanced split, and method parsing."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stagewise.partition import (
    PartitionMethod,
    compute_boundaries,
    part_weights,
    partition_balanced,
    partition_uniform,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "partition_deepspeed.json").read_text())


def exact_parts(weights: list[Any], boundaries: list[int]) -> list[Fraction]:
    values = [Fraction(w) for w in weights]
    return [sum(values[a:b], Fraction(0)) for a, b in itertools.pairwise(boundaries)]


def heaviest(weights: list[Any], boundaries: list[int]) -> Fraction:
    return max(exact_parts(weights, boundaries))


def brute_force(weights: list[Any], num_parts: int) -> tuple[Fraction, Fraction]:
    """The best (heaviest, lightest) over every split into non-empty parts."""
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), num_parts - 1):
        parts = exact_parts(weights, [0, *cuts, n])
        key = (max(parts), -min(parts))
        best = key if best is None or key < best else best
    assert best is not None
    return best[0], -best[1]


def check_shape(boundaries: list[int], n: int, num_parts: int) -> None:
    assert len(boundaries) == num_parts + 1
    assert boundaries[0] == 0 and boundaries[-1] == n
    assert all(type(b) is int for b in boundaries)
    if n >= num_parts:
        assert all(a < b for a, b in itertools.pairwise(boundaries)), "empty part"
    else:
        assert all(a <= b for a, b in itertools.pairwise(boundaries))


# --- partition_uniform ------------------------------------------------------------------------


def test_uniform_matches_deepspeed_golden() -> None:
    table = GOLDEN["partition_uniform"]
    assert len(table) == 65
    for n, row in enumerate(table):
        for num_parts, expected in enumerate(row, start=1):
            assert partition_uniform(n, num_parts) == expected, (n, num_parts)


def test_uniform_matches_deepspeed_live() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_utils = pytest.importorskip("deepspeed.runtime.utils")
    for n in range(0, 80):
        for num_parts in range(1, 20):
            assert partition_uniform(n, num_parts) == ds_utils.partition_uniform(n, num_parts)


def test_uniform_errors() -> None:
    with pytest.raises(ValueError, match="num_parts must be at least 1, got 0"):
        partition_uniform(4, 0)
    with pytest.raises(ValueError, match="num_items must be at least 0, got -1"):
        partition_uniform(-1, 2)
    with pytest.raises(ValueError, match=r"num_parts must be an integer, got 2\.5"):
        partition_uniform(4, 2.5)  # type: ignore[arg-type]


# --- partition_balanced: optimality --------------------------------------------------------------


def test_balanced_optimal_exhaustive_small_integers() -> None:
    for n in range(1, 7):
        for weights in itertools.product((0, 1, 3), repeat=n):
            for num_parts in range(1, 6):
                got = partition_balanced(list(weights), num_parts)
                check_shape(got, n, num_parts)
                if n <= num_parts:
                    assert got == partition_uniform(n, num_parts)
                    continue
                parts = exact_parts(list(weights), got)
                assert (max(parts), min(parts)) == brute_force(list(weights), num_parts)


def test_balanced_optimal_random_floats() -> None:
    rng = random.Random(7)
    for _ in range(250):
        n = rng.randint(2, 10)
        num_parts = rng.randint(1, min(n, 6))
        weights = [rng.choice([0.0, rng.random(), rng.uniform(0, 1e6), 1e-9]) for _ in range(n)]
        got = partition_balanced(weights, num_parts)
        check_shape(got, n, num_parts)
        parts = exact_parts(weights, got)
        assert (max(parts), min(parts)) == brute_force(weights, num_parts), weights


def test_balanced_is_exact_with_floats() -> None:
    # Float prefix sums would call 0.1 + 0.2 heavier than 0.3; exact sums do not.
    weights = [0.1, 0.2, 0.3]
    got = partition_balanced(weights, 2)
    assert heaviest(weights, got) == brute_force(weights, 2)[0]
    tiny = [1e-300, 1.0, 1e-300, 1.0, 5e-324]
    assert heaviest(tiny, partition_balanced(tiny, 2)) == brute_force(tiny, 2)[0]


def test_balanced_equal_weights_follow_uniform() -> None:
    for n in range(0, 30):
        for num_parts in range(1, 9):
            assert partition_balanced([5] * n, num_parts) == partition_uniform(n, num_parts)
            assert partition_balanced([0.25] * n, num_parts) == partition_uniform(n, num_parts)


def test_balanced_all_zero_weights_as_deepspeed() -> None:
    # Every split is optimal; DeepSpeed keeps the latest cut: one layer in each later part.
    for n in range(0, 30):
        for num_parts in range(1, 9):
            got = partition_balanced([0] * n, num_parts)
            if n <= num_parts:
                assert got == partition_uniform(n, num_parts)
            else:
                assert got == [0, *range(n - num_parts + 1, n + 1)]


def test_balanced_pins() -> None:
    assert partition_balanced([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [0, 5, 7, 9]
    # A heavy head at the end: the two other stages share the rest evenly.
    assert partition_balanced([1] * 10 + [10], 3) == [0, 5, 10, 11]
    assert partition_balanced([], 3) == [0, 0, 0, 0]
    assert partition_balanced([7], 1) == [0, 1]
    assert partition_balanced([3, 1], 4) == [0, 1, 2, 2, 2]


def test_balanced_accepts_number_types() -> None:
    weights: list[Any] = [np.int64(3), np.float32(1.5), Fraction(1, 3), True, 2, np.float64(0.5)]
    exact: list[Any] = [3, 1.5, Fraction(1, 3), 1, 2, 0.5]
    got = partition_balanced(weights, 3)
    check_shape(got, 6, 3)
    assert got == partition_balanced(exact, 3)
    assert heaviest(exact, got) == brute_force(exact, 3)[0]


def test_balanced_large_is_near_the_lower_bound() -> None:
    rng = random.Random(3)
    weights = [rng.random() for _ in range(2048)]
    got = partition_balanced(weights, 128)
    check_shape(got, 2048, 128)
    bound = max(max(weights), sum(weights) / 128)
    assert max(part_weights(weights, got)) <= bound * 1.1


# --- partition_balanced: never heavier than DeepSpeed ------------------------------------------


def test_balanced_never_heavier_than_deepspeed_golden() -> None:
    for case in GOLDEN["partition_balanced"]:
        weights, num_parts = case["weights"], case["num_parts"]
        got = partition_balanced(weights, num_parts)
        check_shape(got, len(weights), num_parts)
        assert heaviest(weights, got) <= heaviest(weights, case["deepspeed"]), case


def test_balanced_never_heavier_than_deepspeed_live() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_utils = pytest.importorskip("deepspeed.runtime.utils")
    rng = random.Random(11)
    for trial in range(120):
        n = rng.randint(0, 32)
        num_parts = rng.randint(1, 8)
        if trial % 3 == 0:
            weights: list[Any] = [rng.randint(0, 10**6) for _ in range(n)]
        elif trial % 3 == 1:
            weights = [rng.expovariate(1.0) for _ in range(n)]
        else:
            weights = [rng.choice([0, 0, 1, 2, 50]) for _ in range(n)]
        ours = partition_balanced(weights, num_parts)
        theirs = [int(b) for b in ds_utils.partition_balanced(weights, num_parts)]
        assert len(ours) == len(theirs) and ours[0] == theirs[0] and ours[-1] == theirs[-1]
        assert heaviest(weights, ours) <= heaviest(weights, theirs), (weights, num_parts)
        if n <= num_parts:
            assert ours == theirs


# --- partition_balanced: DeepSpeed's ties -------------------------------------------------------


def check_deepspeed_tie(weights: list[Any], num_parts: int, theirs: list[int]) -> bool:
    """Ours is DeepSpeed's split where that is optimal, else strictly lighter; True if equal."""
    ours = partition_balanced(weights, num_parts)
    check_shape(ours, len(weights), num_parts)
    if heaviest(weights, theirs) == heaviest(weights, ours):
        assert ours == theirs, (weights, num_parts, ours, theirs)
        return True
    assert heaviest(weights, ours) < heaviest(weights, theirs), (weights, num_parts)
    return False


def test_balanced_breaks_ties_as_deepspeed_golden() -> None:
    cases = GOLDEN["partition_balanced"] + GOLDEN["partition_ties"]
    same = [check_deepspeed_tie(c["weights"], c["num_parts"], c["deepspeed"]) for c in cases]
    # Most of these cases tie; DeepSpeed's own split is optimal in most of them.
    assert len(cases) == 580 and sum(same) > len(cases) // 2


def test_the_cnn_of_deepspeeds_example_is_cut_where_deepspeed_cuts_it() -> None:
    # torchvision's AlexNet as 22 layers: several cuts give the same heaviest stage.
    for case in GOLDEN["partition_ties"]:
        if len(case["weights"]) == 22 and case["num_parts"] == 2:
            assert partition_balanced(case["weights"], 2) == case["deepspeed"] == [0, 19, 22]


def test_balanced_breaks_ties_as_deepspeed_live() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_utils = pytest.importorskip("deepspeed.runtime.utils")
    rng = random.Random(2024)
    same = 0
    for trial in range(300):
        n = rng.randint(2, 28)
        num_parts = rng.randint(2, min(n, 8))
        alphabet = [[0, 1], [0, 0, 2, 9], [0, 3, 3], [0.0, 0.25, 0.75], [0, 1, 10**6]][trial % 5]
        weights: list[Any] = [rng.choice(alphabet) for _ in range(n)]
        theirs = [int(b) for b in ds_utils.partition_balanced(weights, num_parts)]
        same += check_deepspeed_tie(weights, num_parts, theirs)
    assert same > 150


def test_deepspeed_split_is_deepspeeds_exactly_live() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_utils = pytest.importorskip("deepspeed.runtime.utils")
    from stagewise.partition.deepspeed_split import deepspeed_split

    rng = random.Random(99)
    for _ in range(200):
        n = rng.randint(2, 30)
        num_parts = rng.randint(1, min(n - 1, 9))
        weights = [rng.choice([0, 1, rng.random(), rng.randint(0, 50)]) for _ in range(n)]
        theirs = [int(b) for b in ds_utils.partition_balanced(weights, num_parts)]
        assert deepspeed_split(weights, num_parts) == theirs, (weights, num_parts)


def test_deepspeed_split_gives_way_above_its_budget() -> None:
    from stagewise.partition.deepspeed_split import BUDGET, deepspeed_split

    assert 64 * (1024 - 64) ** 2 <= BUDGET < 128 * (2048 - 128) ** 2
    assert deepspeed_split([1.0] * 2048, 128) is None


# --- partition_balanced: errors -----------------------------------------------------------------


def test_balanced_errors() -> None:
    with pytest.raises(ValueError, match=r"weights\[2\] = -1 is negative"):
        partition_balanced([1, 2, -1], 2)
    with pytest.raises(ValueError, match=r"weights\[0\] = -0.5 is negative"):
        partition_balanced([-0.5], 2)
    with pytest.raises(ValueError, match=r"weights\[1\] = nan is not a finite number"):
        partition_balanced([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match=r"weights\[0\] = inf is not a finite number"):
        partition_balanced([float("inf")], 1)
    with pytest.raises(ValueError, match=r"weights\[0\] = 'a' is not a finite number"):
        partition_balanced(["a"], 1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="num_parts must be at least 1, got 0"):
        partition_balanced([1, 2], 0)
    with pytest.raises(ValueError, match="num_parts must be at least 1, got -3"):
        partition_balanced([1, 2], -3)


def test_part_weights() -> None:
    assert part_weights([1, 2, 3, 4], [0, 1, 1, 4]) == [1.0, 0.0, 9.0]


# --- PartitionMethod ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uniform", PartitionMethod("uniform")),
        ("Parameters", PartitionMethod("parameters")),
        ("  PROFILE ", PartitionMethod("profile")),
        ("type:Transformer", PartitionMethod("type", pattern="Transformer")),
        ("TYPE:(?:lin)ear", PartitionMethod("type", pattern="(?:lin)ear")),
        ([0, 2, 4], PartitionMethod("explicit", boundaries=(0, 2, 4))),
        ((0, 0, 3), PartitionMethod("explicit", boundaries=(0, 0, 3))),
        ([np.int64(0), np.int64(5)], PartitionMethod("explicit", boundaries=(0, 5))),
    ],
)
def test_parse(text: Any, expected: PartitionMethod) -> None:
    parsed = PartitionMethod.parse(text)
    assert parsed == expected
    assert PartitionMethod.parse(parsed) is parsed
    assert (
        PartitionMethod.parse(
            str(parsed) if parsed.kind != "explicit" else list(parsed.boundaries or ())
        )
        == parsed
    )


def test_parse_is_frozen_and_hashable() -> None:
    method = PartitionMethod.parse("type:linear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.kind = "uniform"  # type: ignore[misc]
    assert len({method, PartitionMethod.parse("TYPE:linear")}) == 1
    assert PartitionMethod.parse("parameters").needs_param_counts
    assert PartitionMethod.parse("profile").needs_profile
    assert not PartitionMethod.parse("uniform").needs_param_counts


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("balanced", r"unknown partition method 'balanced'; valid forms: 'uniform', 'parameters'"),
        ("uniform:x", r"unknown partition method 'uniform:x'"),
        ("", r"unknown partition method ''"),
        (3, r"unknown partition method 3 of type int"),
        (None, r"unknown partition method None of type NoneType"),
        ("type:", r"needs a regular expression after the colon"),
        ("type:(", r"'\(' is not a valid regular expression"),
        ([1, 2], r"boundaries \[1, 2\] must start at 0"),
        ([], r"boundaries \[\] must start at 0"),
        ([0, 3, 2, 5], r"must never decrease, but 3 at index 1 is followed by 2"),
        ([0, 1.5], r"must be integers, got 1.5 at index 1"),
        ([0, True], r"must be integers"),
    ],
)
def test_parse_errors(method: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionMethod.parse(method)


def test_inconsistent_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="a pattern goes with kind 'type' only"):
        PartitionMethod("uniform", pattern="x")
    with pytest.raises(ValueError, match="boundaries go with kind 'explicit' only"):
        PartitionMethod("explicit")
    with pytest.raises(ValueError, match="unknown partition kind 'fast'"):
        PartitionMethod("fast")  # type: ignore[arg-type]


# --- compute_boundaries ---------------------------------------------------------------------------

NAMES = [
    "Embedding",
    "TransformerLayer",
    "TransformerLayer",
    "TransformerLayer",
    "TransformerLayer",
    "LayerNorm",
    None,
    "Linear",
]


def test_compute_uniform_parameters_profile() -> None:
    assert compute_boundaries("uniform", 3, class_names=NAMES) == partition_uniform(8, 3)
    counts = [100, 10, 10, 10, 10, 1, 0, 100]
    assert compute_boundaries("parameters", 3, class_names=NAMES, param_counts=counts) == (
        partition_balanced(counts, 3)
    )
    costs = [0.5, 1.0, 1.0, 1.0, 1.0, 0.1, 0.0, 0.7]
    assert compute_boundaries("profile", 2, class_names=NAMES, profile_costs=costs) == (
        partition_balanced(costs, 2)
    )


def test_compute_type_uses_binary_weights_like_deepspeed() -> None:
    # search (not match), case-insensitive; a nameless layer weighs 0.
    flags = [0, 1, 1, 1, 1, 0, 0, 0]
    assert compute_boundaries("type:transformer", 2, class_names=NAMES) == (
        partition_balanced(flags, 2)
    )
    assert compute_boundaries("type:former", 4, class_names=NAMES) == partition_balanced(flags, 4)
    assert compute_boundaries("type:^(embedding|linear)$", 2, class_names=NAMES) == (
        partition_balanced([1, 0, 0, 0, 0, 0, 0, 1], 2)
    )


def test_compute_explicit() -> None:
    assert compute_boundaries([0, 1, 5, 8], 3, class_names=NAMES) == [0, 1, 5, 8]
    with pytest.raises(ValueError, match=r"\[0, 1, 8\] give 2 stages but there are 3; give 4"):
        compute_boundaries([0, 1, 8], 3, class_names=NAMES)
    with pytest.raises(ValueError, match=r"must end at the number of layers, 8, not 7"):
        compute_boundaries([0, 1, 7], 2, class_names=NAMES)


def test_compute_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"regex 'conv' matches none of the layer class names \['Embedding', 'LayerNorm', "
        r"'Linear', 'TransformerLayer'\]",
    ):
        compute_boundaries("type:conv", 2, class_names=NAMES)
    with pytest.raises(ValueError, match="'parameters' needs param_counts"):
        compute_boundaries("parameters", 2, class_names=NAMES)
    with pytest.raises(ValueError, match="'profile' needs profile_costs"):
        compute_boundaries("profile", 2, class_names=NAMES)
    with pytest.raises(ValueError, match="param_counts has 3 entries but there are 8 layers"):
        compute_boundaries("parameters", 2, class_names=NAMES, param_counts=[1, 2, 3])
    with pytest.raises(ValueError, match="profile_costs has 9 entries but there are 8 layers"):
        compute_boundaries("profile", 2, class_names=NAMES, profile_costs=[1.0] * 9)
    with pytest.raises(ValueError, match="num_parts must be at least 1, got 0"):
        compute_boundaries("uniform", 0, class_names=NAMES)
    with pytest.raises(ValueError, match=r"weights\[1\] = -4 is negative"):
        compute_boundaries("parameters", 2, class_names=["A", "B"], param_counts=[1, -4])
