"""The planner on synthetic costs whose best plan is known, its files and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from stagewise.cli import main
from stagewise.plan import (
    EngineCosts,
    LayerCosts,
    Linear,
    ModelCosts,
    PlanError,
    module_arguments,
    parse_bytes,
    plan_config,
    profile,
    search,
)
from stagewise.plan.costs import fingerprint
from stagewise.spec import LayerSpec

MIB = 1 << 20


def _costs(
    layers: int = 8,
    seconds_per_row: float = 1e-3,
    out_bytes_per_row: float = 4096,
    act_bytes_per_row: float = 4096,
    param_bytes: int = 4 * MIB,
    engine: EngineCosts | None = None,
) -> ModelCosts:
    t = Linear(0, seconds_per_row)
    layer = LayerCosts(
        "Linear", "0", t, t, t, Linear(0, act_bytes_per_row), Linear(0, out_bytes_per_row),
        param_bytes=param_bytes,
    )  # fmt: skip
    return ModelCosts(
        (layer,) * layers,
        input_bytes=Linear(0, out_bytes_per_row),
        engine=engine or EngineCosts(bandwidth=1e12, reduce_bandwidth=1e12),
    )


def test_heavy_compute_wants_more_stages_and_many_micro_batches() -> None:
    # activations cross for free, gradients all-reduce slowly: data parallelism loses
    engine = EngineCosts(bandwidth=1e12, reduce_bandwidth=1e8)
    result = search(_costs(engine=engine), devices=4, global_batch=64, schedules=["1f1b"])
    best = result.best.candidate
    assert best.stages == 4 and best.data_parallel == 1
    # compute is linear in rows: the smallest micro-batches leave the smallest bubble
    assert best.micro_batch_size == 1
    assert result.best.estimate.bubble < 0.1


def test_comm_heavy_wants_one_stage() -> None:
    slow_link = EngineCosts(latency=1e-2, bandwidth=1e6, reduce_bandwidth=1e12)
    costs = _costs(out_bytes_per_row=1e6, engine=slow_link)
    best = search(costs, devices=2, global_batch=32, schedules=["1f1b", "gpipe"]).best
    assert best.candidate.stages == 1 and best.candidate.data_parallel == 2


def test_a_tight_budget_forces_checkpointing() -> None:
    costs = _costs(act_bytes_per_row=1 * MIB, param_bytes=1 * MIB)
    free = search(costs, devices=2, global_batch=16, schedules=["1f1b"], stages=[2])
    assert not free.best.candidate.checkpointing
    peak_without = min(p.peak for p in free.plans if not p.candidate.checkpointing)
    tight = search(
        costs, devices=2, global_batch=16, schedules=["1f1b"], stages=[2], memory=peak_without * 0.9
    )
    assert tight.best.candidate.checkpointing
    assert all(p.over_by > 0 for p in tight.plans if not p.candidate.checkpointing)


def test_nothing_fits_names_the_smallest_overshoot() -> None:
    with pytest.raises(PlanError, match=r"smallest peak is .* over by .* Give at least"):
        search(_costs(), devices=2, global_batch=16, memory=1 * MIB)


@pytest.mark.parametrize("devices", [0, -1])
def test_zero_devices_is_an_error(devices: int) -> None:
    with pytest.raises(PlanError, match="devices must be an integer >= 1"):
        search(_costs(), devices=devices, global_batch=16)


def test_every_schedule_is_considered() -> None:
    result = search(_costs(), devices=2, global_batch=16, stages=[2])
    names = {p.candidate.schedule for p in result.plans}
    assert names == {"1f1b", "gpipe", "interleaved", "zb-h1", "zbv", "zb-h2", "dualpipev"}


def test_json_round_trip_and_scaling(tmp_path: Path) -> None:
    costs = _costs(engine=EngineCosts(per_pass=1e-4, latency=1e-5, bandwidth=1e9))
    path = tmp_path / "costs.json"
    costs.save(path)
    assert ModelCosts.load(path) == costs
    fast = costs.scaled(2.0, bandwidth=5e9)
    assert fast.layers[0].forward.slope == pytest.approx(costs.layers[0].forward.slope / 2)
    assert fast.engine.bandwidth == 5e9 and fast.engine.latency == 1e-5


def _specs(width: int) -> list[LayerSpec]:
    return [LayerSpec(nn.Linear, width, width), LayerSpec(nn.ReLU), LayerSpec(nn.Linear, width, 4)]


def test_profile_measures_and_refuses_another_model(tmp_path: Path) -> None:
    specs = _specs(16)
    costs = profile(
        specs, torch.randn(8, 16), sample_labels=torch.randn(8, 4),
        loss_fn=nn.functional.mse_loss, micro_batch_sizes=[4, 8], repeats=2, warmup=1,
    )  # fmt: skip
    assert costs.fingerprint == fingerprint(specs)
    assert costs.layers[0].param_bytes == (16 * 16 + 16) * 4
    assert costs.layers[1].activation_bytes.at(8) == pytest.approx(8 * 16 * 4)  # ReLU's result
    assert costs.layers[2].output_bytes.at(8) == pytest.approx(8 * 4 * 4)
    path = tmp_path / "c.json"
    costs.save(path)
    ModelCosts.load(path, specs)  # the same model
    with pytest.raises(PlanError, match="costs file is of another model: layer 0"):
        ModelCosts.load(path, _specs(32))
    with pytest.raises(PlanError, match="has 3 layers, the model 1"):
        search(costs, devices=2, global_batch=8, layers=specs[:1])


def test_config_and_module_arguments() -> None:
    result = search(_costs(), devices=2, global_batch=16, schedules=["zbv"], stages=[2])
    best = result.best
    config = plan_config(best, 16)
    assert config["pipeline"] == {"schedule": "zbv", "virtual_stages": 2}
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] == 16
    args = module_arguments(best)
    assert args["placement"] == "v" and len(args["partition_method"]) == 5


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512 MiB") == 512 * MIB
    with pytest.raises(PlanError, match="not a memory size"):
        parse_bytes("lots")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "costs.json"
    _costs().save(path)
    out = tmp_path / "plan.json"
    argv = ["plan", "--costs", str(path), "--devices", "2", "--global-batch", "16"]
    assert main([*argv, "--memory", "1GiB", "--config-out", str(out)]) == 0
    assert "winner:" in capsys.readouterr().out
    assert json.loads(out.read_text())["pipeline_module"]["num_stages"] in (1, 2)
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]
    assert main([*argv, "--memory", "1MiB"]) == 2
    assert "over by" in capsys.readouterr().err
    assert main(["plan", "--costs", str(path), "--devices", "0", "--global-batch", "16"]) == 2
    assert "devices must be" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert (
        main(
            ["plan", "--costs", str(tmp_path / "bad.json"), "--devices", "2", "--global-batch", "4"]
        )
        == 2
    )
    assert "not a stagewise costs file" in capsys.readouterr().err


def test_the_big_program_is_fast_enough_to_simulate() -> None:
    """256 stages x 2048 micro-batches of 1F1B, generated, checked and simulated."""
    import time

    from stagewise.schedule.build import schedule_program
    from stagewise.schedule.check import check_program
    from stagewise.schedule.registry import schedule_factory
    from stagewise.schedule.simulate import Costs, simulate

    start = time.perf_counter()
    program = schedule_program(schedule_factory("1f1b"), 2048, 256)
    check_program(program)
    simulate(program, Costs(send=0.1), record_events=False)
    assert time.perf_counter() - start < 6.0  # 2 s on an idle core; slack for a busy machine
