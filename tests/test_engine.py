"""The engine over real processes (gloo, CPU): every result is compared with one process."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch

import stagewise
from distributed import run_distributed, run_distributed_raw
from pipeline_cases import batches_for, build_pipeline, ds_config, train_pipeline, train_reference

pytestmark = pytest.mark.slow


def merged_state(
    results: list[dict[str, Any]], tied_attrs: tuple[str, ...] = ("wte.weight",)
) -> dict[str, torch.Tensor]:
    """Every rank's weights by name; copies of one name (tied, data parallel) must agree.

    A tied module's other parameters (the position table of an embedding reused as the
    head) are kept in sync by no one, in DeepSpeed as here: only the tied attributes and
    the copy of the lowest rank (the one that uses them) count.
    """
    state: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["state"].items():
            shadow = name.startswith("tied_modules.") and not name.endswith(tied_attrs)
            if name in state:
                if not shadow:
                    torch.testing.assert_close(value, state[name], msg=f"copies of {name} differ")
                continue
            state[name] = value
    return state


def check_against_reference(
    case: dict[str, Any], results: list[dict[str, Any]], **tol: Any
) -> None:
    ref = train_reference(case)
    for result in results:
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(ref["losses"]), **tol
        )
    state = merged_state(results)
    assert set(state) == set(ref["state"]), sorted(set(state) ^ set(ref["state"]))
    for name, value in ref["state"].items():
        torch.testing.assert_close(state[name], value, msg=f"weight {name} differs", **tol)


BASE = {"model": "mlp", "micro_batches": 4, "mb_size": 3, "steps": 3}


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stages_match_one_process(stages: int) -> None:
    case = {**BASE, "stages": stages}
    results = run_distributed(train_pipeline, stages, case)
    check_against_reference(case, results)
    assert [r["stage"] for r in results] == list(range(stages))


def test_two_stages_two_data_parallel() -> None:
    case = {**BASE, "stages": 2, "dp": 2}
    results = run_distributed(train_pipeline, 4, case)
    check_against_reference(case, results)


def test_gpt_with_tied_embedding_and_head() -> None:
    case = {"model": "gpt", "stages": 2, "micro_batches": 3, "mb_size": 2, "steps": 3}
    results = run_distributed(train_pipeline, 2, case)
    check_against_reference(case, results)
    # Both ends hold the tied embedding and it stayed identical (merged_state checks copies).
    assert all("tied_modules.embed.wte.weight" in r["state"] for r in results)


def test_int_and_bool_tensors_between_stages() -> None:
    case = {**BASE, "model": "multi", "stages": 3}
    results = run_distributed(train_pipeline, 3, case)
    check_against_reference(case, results)


def test_activation_checkpointing_with_token_inputs() -> None:
    # The first stage's input (token ids) needs no gradient: DeepSpeed's reentrant
    # checkpointing breaks here; the non-reentrant default does not.
    case = {
        "model": "gpt",
        "stages": 2,
        "micro_batches": 2,
        "mb_size": 2,
        "steps": 2,
        "ckpt_interval": 1,
    }
    results = run_distributed(train_pipeline, 2, case)
    check_against_reference(case, results)


def test_gradient_clipping_over_all_stages() -> None:
    case = {**BASE, "model": "gpt", "stages": 2, "clip": 0.05, "mb_size": 2}
    results = run_distributed(train_pipeline, 2, case)
    check_against_reference(case, results)


def test_bf16_autocast() -> None:
    case = {**BASE, "stages": 2, "bf16": True}
    results = run_distributed(train_pipeline, 2, case)
    check_against_reference(case, results, rtol=2e-2, atol=2e-2)


def test_shapes_change_between_batches() -> None:
    case = {
        "model": "gpt",
        "stages": 3,
        "micro_batches": 2,
        "mb_size": 2,
        "steps": 4,
        "seq_lens": [8, 5, 5, 11],
    }
    results = run_distributed(train_pipeline, 3, case)
    check_against_reference(case, results)


def test_eval_batch_options() -> None:
    case = {**BASE, "stages": 2, "steps": 1, "eval": True}
    results = run_distributed(train_pipeline, 2, case)
    ref = train_reference(case)
    mean = torch.stack(ref["eval_losses"]).mean()
    for result in results:
        torch.testing.assert_close(result["eval"], mean)
        torch.testing.assert_close(result["eval_logits"][0], mean)
    first, last = results
    assert first["eval_nobcast"] is None
    torch.testing.assert_close(last["eval_nobcast"], mean)
    assert first["eval_logits"][1] is None
    assert len(last["eval_logits"][1]) == case["micro_batches"]  # every micro-batch's output
    for got, want in zip(last["eval_logits"][1], ref["eval_logits"], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.stack(last["eval_none"]), torch.stack(ref["eval_losses"]))
    torch.testing.assert_close(last["eval_half"], torch.stack(ref["eval_losses"][:2]).mean())
    torch.testing.assert_close(last["eval_noloss"], torch.stack(ref["eval_logits"]).mean(0))


# -- errors ----------------------------------------------------------------------------------


def _expect_error(rank: int, world_size: int, what: str) -> str:
    case = {**BASE, "stages": 2}
    try:
        if what == "topology":
            topo = stagewise.PipeDataParallelTopology(num_pp=2, num_dp=2)
            stagewise.PipelineModule(layers=BASE_SPECS(), topology=topo)
        elif what == "batch":
            module = build_pipeline(case)
            stagewise.initialize(
                model=module,
                config={
                    "train_batch_size": 10,
                    "train_micro_batch_size_per_gpu": 3,
                    "gradient_accumulation_steps": 4,
                },
            )
        elif what == "unknown_key":
            module = build_pipeline(case)
            config = {**ds_config(case), "trian_batch_size": 8, "strict_config": True}
            stagewise.initialize(model=module, config=config)
        elif what == "bad_output":
            module = build_pipeline({**case, "model": "bad_output"})
            engine, *_ = stagewise.initialize(model=module, config=ds_config(case))
            engine.train_batch(iter(batches_for(case, 0, 0)))
        elif what == "forward":
            module = build_pipeline(case)
            engine, *_ = stagewise.initialize(model=module, config=ds_config(case))
            engine(torch.zeros(2, 4))
        elif what in ("partition", "partition_ok"):
            module = build_pipeline(case)  # partitioned "uniform"
            method = "parameters" if what == "partition" else "Uniform"
            config = ds_config(case)
            config["pipeline"]["partition_method"] = method
            stagewise.initialize(model=module, config=config)
        elif what == "too_many_stages":
            stagewise.PipelineModule(layers=BASE_SPECS()[:1], num_stages=2)
        elif what == "mpu":
            module = build_pipeline(case)
            stagewise.initialize(model=module, config=ds_config(case), mpu=object())
        elif what == "own_mpu":
            module = build_pipeline(case)
            stagewise.initialize(model=module, config=ds_config(case), mpu=module.mpu())
        elif what == "grid_group":
            group = torch.distributed.new_group(ranks=[0, 1])
            stagewise.PipelineParallelGrid(process_group=group)
    except Exception as exc:  # the message is what the test pins
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def BASE_SPECS() -> list[Any]:
    from pipeline_cases import mlp_specs

    return mlp_specs()


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("topology", r"ValueError: the topology has 4 ranks .* world size is 2"),
        (
            "batch",
            r"ConfigError: inconsistent batch sizes: train_batch_size=10, "
            r"train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=4",
        ),
        (
            "unknown_key",
            r"ConfigError: unknown config key 'trian_batch_size'; did you mean "
            r"'train_batch_size'",
        ),
        ("forward", r"PipelineError: forward\(\) is not available .*train_batch"),
        ("too_many_stages", r"ValueError: cannot cut 1 layers into 2 pipeline parts"),
        (
            "partition",
            r"ConfigError: pipeline.partition_method='parameters' but the PipelineModule was "
            r"partitioned with 'uniform'",
        ),
        ("partition_ok", r"^no error$"),
        ("mpu", r"ValueError: initialize\(mpu=\.\.\.\) must be None for a pipeline"),
        ("own_mpu", r"^no error$"),
        ("grid_group", r"ValueError: PipelineParallelGrid\(process_group=\.\.\.\) must be None"),
    ],
)
def test_clear_errors(what: str, pattern: str) -> None:
    messages = run_distributed(_expect_error, 2, what)
    for message in messages:
        assert __import__("re").search(pattern, message), message


def test_layer_returning_a_non_tensor_is_named() -> None:
    messages = run_distributed(_expect_error, 2, "bad_output", timeout=60)
    assert "TypeError: layer 1 (<lambda>) is the last of stage 0 and returned dict" in messages[0]


# -- a dead peer -------------------------------------------------------------------------------


def _die_mid_batch(rank: int, world_size: int, case: dict[str, Any]) -> str:
    module = build_pipeline(case)
    engine, *_ = stagewise.initialize(model=module, config=ds_config(case))
    engine.train_batch(iter(batches_for(case, 0, 0)))
    if rank == 1:
        data = iter(batches_for(case, 1, 0))
        calls = {"n": 0}
        original: Any = None

        def forward_then_die(instr: Any, batch: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            original(instr, batch)

        from stagewise.schedule import ForwardPass

        original = engine.register_instruction(ForwardPass, forward_then_die)
        engine.train_batch(data)
        return "survived"
    start = time.monotonic()
    try:
        engine.train_batch(iter(batches_for(case, 1, 0)))
    except stagewise.PeerError as exc:
        return f"PeerError after {time.monotonic() - start:.1f}s: {exc}"
    return "no error"


def test_killed_stage_is_reported_by_the_others() -> None:
    case = {**BASE, "stages": 3, "micro_batches": 6, "timeout_s": 10}
    outcomes = run_distributed_raw(_die_mid_batch, 3, case, timeout=90)
    assert not outcomes[1].ok  # killed
    for rank in (0, 2):
        assert outcomes[rank].ok, outcomes[rank].error
        message = outcomes[rank].value
        assert message.startswith("PeerError"), message
        assert "stage 1 (rank 1)" in message or "timeout" in message, message
        seconds = float(message.split("after ")[1].split("s:")[0])
        assert seconds < 10 + 5, message
