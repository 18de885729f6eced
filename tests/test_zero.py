"""ZeRO-1: the flat arithmetic and the config in one process; the sharded engine over processes.

Every sharded run is compared with the same run unsharded: losses, final weights,
checkpoint files and resumed losses at other sizes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_cases import run_actions, run_many
from distributed import run_distributed
from pipeline_cases import train_pipeline
from stagewise.config import Config
from stagewise.engine.flat_shards import FlatSpace, shard_state, unshard_state
from stagewise.engine.zero import ZeroOptimizer
from stagewise.errors import CheckpointError, ConfigError

# -- pure: the flat space ------------------------------------------------------------------


def test_flat_space_cuts_parameters_into_equal_parts() -> None:
    params = [torch.arange(6.0).view(2, 3), torch.arange(6.0, 11.0), torch.tensor(11.0)]
    space = FlatSpace(params, 3)
    assert (space.numel, space.part_size) == (12, 4)
    assert [space.bounds(r) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    # part 1 = elements 4..7: the end of the matrix, the start of the vector
    assert list(space.segments(4, 8)) == [(0, 4, 6, 0), (1, 0, 2, 2)]
    out = torch.empty(4)
    space.read(params, 4, out)
    assert out.tolist() == [4.0, 5.0, 6.0, 7.0]
    space.read([None, params[1], None], 4, out)  # missing gradients read as zeros
    assert out.tolist() == [0.0, 0.0, 6.0, 7.0]
    space.write(torch.tensor([-1.0, -2.0, -3.0, -4.0]), 8)
    assert params[1].tolist() == [6.0, 7.0, -1.0, -2.0, -3.0]
    assert params[2].item() == -4.0
    padded = FlatSpace([torch.zeros(5)], 2)
    assert (padded.part_size, padded.bounds(1)) == (3, (3, 6))
    assert list(padded.segments(3, 6)) == [(0, 3, 5, 0)]  # the 6th element is padding


def test_state_shards_and_unshards() -> None:
    params = [torch.zeros(2, 2), torch.zeros(3)]
    space = FlatSpace(params, 2)  # 7 elements: parts of 4
    states = [
        {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0).view(2, 2)},
        {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0, 7.0)},
    ]
    parts = [shard_state(space, r, states, torch.device("cpu")) for r in range(2)]
    assert parts[0]["exp_avg"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert parts[1]["exp_avg"].tolist() == [4.0, 5.0, 6.0, 0.0]  # padded
    assert parts[1]["step"].item() == 3.0
    full = {"step": parts[0]["step"], "exp_avg": torch.cat([p["exp_avg"] for p in parts])}
    back = unshard_state(space, full, {"exp_avg"})
    for got, want in zip(back, states, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])
    with pytest.raises(CheckpointError, match=r"state 'step' differs between parameters"):
        shard_state(space, 0, [states[0], {**states[1], "step": torch.tensor(2.0)}], "cpu")
    with pytest.raises(CheckpointError, match=r"1 of 2 parameters .* have no optimizer state"):
        shard_state(space, 0, [states[0], {}], torch.device("cpu"))


# -- pure: the config ------------------------------------------------------------------------


def _zero(section: Any, **top: Any) -> Any:
    return Config.from_dict({"zero_optimization": section, **top}).zero


def test_zero_config() -> None:
    assert _zero({"stage": 1}).stage == 1
    assert _zero({"stage": 0}).not_applied == ()
    cfg = _zero(
        {
            "stage": 1,
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 1000,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": False,
            "offload_optimizer": {"device": "none"},
            "stage3_max_live_parameters": 1e9,
        },
        zero_allow_untested_optimizer=True,
    )
    assert (cfg.reduce_bucket_size, cfg.allgather_bucket_size) == (50_000_000, 1000)
    assert cfg.allow_untested_optimizer
    assert cfg.not_applied == (
        "overlap_comm=True",
        "contiguous_gradients=True",
        "stage3_max_live_parameters=1000000000.0",
    )
    assert _zero({"stage": 0, "overlap_comm": False}).not_applied == ("overlap_comm=False",)
    for stage, what in ((2, "gradients"), (3, "gradients and parameters")):
        with pytest.raises(ConfigError, match=rf"stage={stage} shards {what}, but a pipeline"):
            _zero({"stage": stage})
    # an unknown key is a warning with "did you mean" (DeepSpeed's configs carry typos),
    # an error under strict_config
    notices = Config.from_dict({"zero_optimization": {"stag": 1}}).notices
    assert any("'zero_optimization.stag'; did you mean 'stage'" in n for n in notices), notices
    with pytest.raises(ConfigError, match=r"unknown config key 'zero_optimization\.stag'"):
        _zero({"stag": 1}, strict_config=True)
    with pytest.raises(ConfigError, match=r"reduce_bucket_size must be >= 1, got 0"):
        _zero({"stage": 1, "reduce_bucket_size": 0})


# -- one process: a ZeroOptimizer over one replica --------------------------------------------


class OneReplica:
    """The data-parallel answers of a grid with one replica (no process group needed)."""

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_group(self) -> Any:
        return None

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [0]

    def get_global_rank(self) -> int:
        return 0


def _zero_optimizer(optimizer: Any, **cfg: Any) -> ZeroOptimizer:
    from stagewise.collectives import Collectives

    config = _zero({"stage": 1}, **cfg)
    return ZeroOptimizer(optimizer, OneReplica(), Collectives(10.0, "rank 0"), config)  # type: ignore[arg-type]


def test_one_replica_steps_as_the_optimizer_and_round_trips_its_state() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(5, 3)
    sharded = torch.nn.Linear(5, 3)
    sharded.load_state_dict(plain.state_dict())
    sharded.bias.requires_grad_(False)  # frozen: not optimized, not in a flat part
    plain.bias.requires_grad_(False)
    opt = torch.optim.AdamW(plain.parameters(), lr=0.1, weight_decay=0.1)
    zero = _zero_optimizer(torch.optim.AdamW(sharded.parameters(), lr=0.1, weight_decay=0.1))
    x = torch.randn(4, 5)
    for _ in range(3):
        for model in (plain, sharded):
            model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        zero.step()
        zero.zero_grad()
        assert sharded.weight.grad is None
    torch.testing.assert_close(sharded.weight, plain.weight, rtol=0, atol=0)
    gathered = zero.gather_unsharded()
    assert gathered is not None
    want = opt.state[plain.weight]
    got = gathered.state[sharded.weight]
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # an unsharded optimizer's state dict, loaded into a fresh sharded one
    fresh = _zero_optimizer(torch.optim.AdamW(sharded.parameters(), lr=0.5))
    fresh.unsharded_loader().load_state_dict(opt.state_dict())
    assert fresh.optimizer.param_groups[0]["lr"] == 0.1  # the saved hyperparameters
    (shard,) = fresh.optimizer.param_groups[0]["params"]
    torch.testing.assert_close(fresh.optimizer.state[shard]["exp_avg"], want["exp_avg"].view(-1))


def test_keys_that_do_not_act_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    from stagewise.collectives import Collectives
    from stagewise.engine.zero import build_zero

    params = [torch.nn.Parameter(torch.zeros(3))]
    config = _zero({"stage": 1, "overlap_comm": True, "allgather_partitions": True})
    with caplog.at_level("WARNING", logger="stagewise.engine.zero"):
        zero = build_zero(config, torch.optim.SGD(params, lr=0.1), OneReplica(), Collectives(1, ""))  # type: ignore[arg-type]
    assert isinstance(zero, ZeroOptimizer)
    assert "zero_optimization at stage 1: overlap_comm=True ignored" in caplog.text
    assert "allgather_partitions" not in caplog.text  # what stagewise does anyway


def test_optimizers_that_cannot_be_sharded_are_named() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match=r"LBFGS is not known to: .*zero_allow_untested"):
        _zero_optimizer(torch.optim.LBFGS(params))
    _zero_optimizer(torch.optim.LBFGS(params), zero_allow_untested_optimizer=True)
    used = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = torch.ones(3)
    used.step()
    with pytest.raises(ConfigError, match=r"already has state; .* build it anew"):
        _zero_optimizer(used)


# -- over processes: 2 stages x 2 data-parallel ----------------------------------------------

ADAMW = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.8, 0.9], "weight_decay": 0.01}}
ZERO_2X2 = {
    "model": "gpt",
    "stages": 2,
    "dp": 2,
    "micro_batches": 2,
    "mb_size": 2,
    "steps": 3,
    "clip": 0.5,
    "optimizer_config": ADAMW,
}


def _both(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [train_pipeline(rank, world_size, case) for case in cases]


@pytest.mark.slow
def test_zero1_equals_unsharded_with_half_the_state() -> None:
    sharded = {**ZERO_2X2, "zero": 1, "zero_keys": {"reduce_bucket_size": 300}}
    sharded["zero_keys"]["allgather_bucket_size"] = 100  # several buckets each way
    results = run_distributed(_both, 4, [ZERO_2X2, sharded], timeout=120)
    for plain, zero in results:
        torch.testing.assert_close(
            torch.tensor(zero["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=0
        )
        assert zero["state"].keys() == plain["state"].keys()
        for name, value in plain["state"].items():
            torch.testing.assert_close(zero["state"][name], value, rtol=1e-6, atol=1e-7)
        # AdamW: two moments per element and a 4-byte step count per stepped tensor
        numel = sum(v.numel() for v in plain["state"].values())
        count = len(plain["state"])
        assert plain["optim_bytes"] == 8 * numel + 4 * count
        assert zero["optim_bytes"] == 8 * math.ceil(numel / 2) + 4  # one flat part
        print(f"stage {plain['stage']}: {plain['optim_bytes']} -> {zero['optim_bytes']} bytes")


GPT_CKPT = {"model": "gpt", "micro_batches": 2, "mb_size": 2, "scheduler": True, "timeout_s": 30}
SAVED = {**GPT_CKPT, "stages": 2, "dp": 2, "optimizer": "adam", "zero": 1}


@pytest.mark.slow
def test_zero1_checkpoint_resumes_at_other_sizes(tmp_path: Path) -> None:
    zero_dir, plain_dir = str(tmp_path / "zero"), str(tmp_path / "plain")
    runs = [
        (SAVED, [("train", 2), ("save", zero_dir), ("train", 2)]),
        ({**SAVED, "zero": None}, [("train", 2), ("save", plain_dir)]),
    ]
    first = run_distributed(run_many, 4, runs, timeout=150)
    unbroken = first[0][0]["results"][2]

    # the files are those of the unsharded run, tensor for tensor
    zero_files = sorted(p.name for p in (tmp_path / "zero" / "global_step2").iterdir())
    plain_files = sorted(p.name for p in (tmp_path / "plain" / "global_step2").iterdir())
    assert zero_files == plain_files
    for name in (n for n in zero_files if re.match(r"layer_\d+-optim_states\.pt", n)):
        a = torch.load(tmp_path / "zero" / "global_step2" / name, weights_only=False)
        b = torch.load(tmp_path / "plain" / "global_step2" / name, weights_only=False)
        assert a["optimizer"] == b["optimizer"] == "AdamW"
        assert a["param_groups"] == b["param_groups"]
        assert a["params"].keys() == b["params"].keys()
        for pname, entry in b["params"].items():
            assert entry["group"] == a["params"][pname]["group"]
            for key, value in entry["state"].items():
                torch.testing.assert_close(
                    a["params"][pname]["state"][key], value, rtol=1e-6, atol=1e-8
                )

    # 4 stages (ZeRO over one replica); 1 stage x 2 replicas (other cuts); 1 x 1 without ZeRO:
    # the same global batch each time (micro-batches x replicas = 4)
    resumed = [
        run_distributed(
            run_actions,
            4,
            {**SAVED, "stages": 4, "dp": 1, "micro_batches": 4},
            [("load", zero_dir, {}), ("train", 2)],
            timeout=150,
        ),
        run_distributed(
            run_actions,
            2,
            {**SAVED, "stages": 1},
            [("load", zero_dir, {}), ("train", 2)],
            timeout=120,
        ),
        run_distributed(
            run_actions,
            1,
            {**SAVED, "stages": 1, "dp": 1, "micro_batches": 4, "zero": None},
            [("load", zero_dir, {}), ("train", 2)],
            timeout=120,
        ),
    ]
    for outcome in resumed:
        for rank_result in outcome:
            loaded, losses = rank_result["results"]
            assert loaded["steps"] == 2, loaded
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(unbroken), rtol=1e-5, atol=1e-6
            )
