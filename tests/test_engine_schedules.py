"""Every schedule trains to the same losses and weights as one process (only the order changes)."""

from __future__ import annotations

from typing import Any

import pytest

from distributed import run_distributed
from pipeline_cases import train_pipeline
from test_engine import check_against_reference

pytestmark = pytest.mark.slow

CHUNKED = {
    "interleaved": {"virtual_stages": 2, "placement": "loop"},
    "zbv": {"virtual_stages": 2, "placement": "v"},
    "dualpipev": {"virtual_stages": 2, "placement": "v"},
}


def schedule_case(schedule: str, stages: int, **extra: Any) -> dict[str, Any]:
    case: dict[str, Any] = {
        "model": "mlp",
        "stages": stages,
        "micro_batches": 4,
        "mb_size": 3,
        "steps": 2,
        "pipeline": {"schedule": schedule},
        "module_kwargs": CHUNKED.get(schedule, {}),
        **extra,
    }
    if schedule == "interleaved":
        case["pipeline"]["virtual_stages"] = 2
    return case


@pytest.mark.parametrize("schedule", ["gpipe", "interleaved", "zb-h1", "zbv", "zb-h2", "dualpipev"])
def test_schedule_matches_one_process(schedule: str) -> None:
    case = schedule_case(schedule, 2)
    check_against_reference(case, run_distributed(train_pipeline, 2, case))


@pytest.mark.parametrize("schedule", ["interleaved", "zbv", "dualpipev"])
def test_chunked_schedules_on_gpt_with_tied_weights(schedule: str) -> None:
    case = schedule_case(schedule, 2, model="gpt", mb_size=2)
    check_against_reference(case, run_distributed(train_pipeline, 2, case))


def test_zero_bubble_on_four_stages_with_eval() -> None:
    case = schedule_case("zb-h1", 4, micro_batches=8, eval=True)
    results = run_distributed(train_pipeline, 4, case)
    check_against_reference(case, results)


@pytest.mark.parametrize("schedule", ["zb-h1", "zbv"])
def test_split_backward_under_bf16_and_checkpointing_on_gpt(schedule: str) -> None:
    # The general split: every parameter (embedding, norms, attention, linears) waits for W,
    # under autocast, with the checkpointed activations kept from I to W.
    case = schedule_case(schedule, 2, model="gpt", mb_size=2, bf16=True, ckpt_interval=1)
    results = run_distributed(train_pipeline, 2, case)
    check_against_reference(case, results, rtol=2e-2, atol=2e-2)


def test_transfers_matched_by_tags_as_well() -> None:
    # The default matches messages by their order on each link direction alone (NCCL's
    # rule), which every test above runs; "tags" adds gloo's tags, as a debugging aid.
    case = schedule_case(
        "interleaved", 2, pipeline={"schedule": "interleaved", "p2p_match": "tags"}
    )
    check_against_reference(case, run_distributed(train_pipeline, 2, case))
