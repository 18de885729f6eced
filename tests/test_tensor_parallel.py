"""Tensor parallelism through the ``model`` axis: Megatron-style layers trained over stages.

Every run is compared with the unsharded model trained in one process (``tp_layers``):
losses, and the weights joined from every slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distributed import run_distributed
from tp_layers import merge_slices, run_tp, tp_case, train_tp_reference

pytestmark = pytest.mark.slow


def _check(results: list[dict[str, Any]], ref: dict[str, Any], steps: slice) -> None:
    for result in results:
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(ref["losses"][steps]), rtol=1e-5, atol=0
        )
    merged = merge_slices(results)
    assert merged.keys() == ref["state"].keys(), sorted(set(merged) ^ set(ref["state"]))
    for name, value in ref["state"].items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _many(rank: int, world_size: int, runs: list[tuple[dict[str, Any], list[Any]]]) -> Any:
    return [run_tp(rank, world_size, case, actions) for case, actions in runs]


def _resume_then_partitioned(
    rank: int, world_size: int, case: dict[str, Any], actions: list[Any]
) -> tuple[dict[str, Any], str]:
    """Resume ``case``; then build it with ``pipeline.pipe_partitioned: true`` (an error)."""
    result = run_tp(rank, world_size, case, actions)
    try:
        run_tp(rank, world_size, {**case, "pipeline": {"pipe_partitioned": True}}, [])
    except Exception as exc:
        return result, f"{type(exc).__name__}: {exc}"
    return result, "no error"


def test_two_stages_two_slices_match_one_process(tmp_path: Path) -> None:
    """2 stages x 2 slices (clipping on, a tensor-parallel layer tied between the stages):
    the unsharded model's losses and weights; saved, it resumes on 1 stage x 2 slices;
    with ZeRO-1 over 2 replicas of 1 stage x 2 slices, the same again."""
    case = tp_case()
    save = str(tmp_path / "tp")
    replicas = tp_case(stages=1, dp=2, zero=1, optimizer_config=None)
    first = run_distributed(
        _many, 4, [(case, [("train", 2), ("save", save), ("train", 1)]), (replicas, [("train", 3)])],
        timeout=150,
    )  # fmt: skip
    ref = train_tp_reference(case, 3)
    assert ref["last_norm"] > case["clip"]  # the clipping acts
    _check([r[0] for r in first], ref, slice(0, 3))
    _check([r[1] for r in first], train_tp_reference(replicas, 3), slice(0, 3))

    names = sorted(p.name for p in (tmp_path / "tp" / "global_step2").iterdir())
    for layer in (0, 1, 3, 4, 6, 7):  # DeepSpeed's names: one file per slice
        for slice_rank in (0, 1):
            assert f"layer_{layer:02d}-model_{slice_rank:02d}-model_states.pt" in names
    assert "layer_01-model_01-optim_states.pt" in names

    second = run_distributed(
        _resume_then_partitioned, 2, tp_case(stages=1), [("load", save), ("train", 1)], timeout=120
    )
    _check([r[0] for r in second], ref, slice(2, 3))
    for _, message in second:
        assert message.startswith("ConfigError: pipeline.pipe_partitioned=true: stagewise sends"), (
            message
        )
