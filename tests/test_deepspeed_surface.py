"""DeepSpeed's surface in one process: module paths, helper APIs, config keys, optimizer defaults.

Each fact about DeepSpeed comes from ``tests/golden/deepspeed_surface.json``
(written by ``tests/golden/make_deepspeed_golden.py`` from DeepSpeed 0.19.8);
where DeepSpeed is installed, the ``live`` tests ask it again through that script.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import stagewise
from golden import make_deepspeed_golden as dsg
from stagewise.config import Config
from stagewise.config.deepspeed_keys import TOP_LEVEL
from stagewise.engine.optim import optimizer_from_config
from stagewise.errors import ConfigError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "deepspeed_surface.json").read_text())
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
live = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def deepspeed_now(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the installed DeepSpeed answers today (the golden script, run again)."""
    out = tmp_path_factory.mktemp("ds") / "surface.json"
    parts = ["config_keys", "names", "config_arguments", "random_draws", "optimizers", "fused_adam"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    script = Path(dsg.__file__)
    cmd = [sys.executable, str(script), "--out", str(out), "--only", *parts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(out.read_text()))


# -- module paths and names ------------------------------------------------------------------

MIRRORS = {
    "deepspeed": "stagewise",
    "deepspeed.pipe": "stagewise.pipe",
    "deepspeed.runtime.pipe": "stagewise.runtime.pipe",
    "deepspeed.runtime.pipe.module": "stagewise.runtime.pipe.module",
    "deepspeed.runtime.pipe.topology": "stagewise.runtime.pipe.topology",
    "deepspeed.runtime.pipe.schedule": "stagewise.runtime.pipe.schedule",
    "deepspeed.runtime.pipe.engine": "stagewise.runtime.pipe.engine",
    "deepspeed.runtime.utils": "stagewise.runtime.utils",
    "deepspeed.runtime.dataloader": "stagewise.runtime.dataloader",
    "deepspeed.runtime.lr_schedules": "stagewise.runtime.lr_schedules",
    "deepspeed.runtime.activation_checkpointing.checkpointing": (
        "stagewise.runtime.activation_checkpointing.checkpointing"
    ),
    "deepspeed.utils": "stagewise.utils",
    "deepspeed.accelerator": "stagewise.accelerator",
    "deepspeed.comm": "stagewise.comm",
    "deepspeed.ops.adam": "stagewise.ops.adam",
    "deepspeed.ops.lamb": "stagewise.ops.lamb",
    "deepspeed.ops.transformer": "stagewise.ops.transformer",
}


def test_every_name_a_script_imports_from_deepspeed_exists_here() -> None:
    names = GOLDEN["names"]
    for ds_module, ours in MIRRORS.items():
        module = importlib.import_module(ours)
        missing = [name for name in names[ds_module] if not hasattr(module, name)]
        assert not missing, f"{ours} lacks {missing} (DeepSpeed's {ds_module} has them)"
    accelerator = stagewise.get_accelerator()
    assert [m for m in names["accelerator methods"] if not hasattr(accelerator, m)] == []
    engine = stagewise.PipelineEngine
    assert [m for m in names["PipelineEngine methods"] if not hasattr(engine, m)] == []


def test_the_mirrors_are_the_real_objects() -> None:
    from stagewise.runtime.activation_checkpointing import checkpointing as ds_checkpointing
    from stagewise.runtime.pipe import engine, module, schedule, topology

    assert module.PipelineModule is stagewise.PipelineModule
    assert (
        module.LayerSpec is stagewise.LayerSpec and module.TiedLayerSpec is stagewise.TiedLayerSpec
    )
    assert topology.PipelineParallelGrid is stagewise.PipelineParallelGrid
    assert topology.ProcessTopology is stagewise.ProcessTopology
    assert schedule.TrainSchedule is stagewise.schedule.TrainSchedule
    assert engine.PipelineEngine is stagewise.PipelineEngine
    assert stagewise.utils.RepeatingLoader is stagewise.RepeatingLoader
    assert stagewise.runtime.utils.partition_balanced is stagewise.partition_balanced
    assert ds_checkpointing.configure is stagewise.checkpointing.configure
    default = stagewise.PipelineModule.__init__.__defaults__
    assert stagewise.checkpointing.non_reentrant_checkpoint in (default or ())


def test_import_stagewise_as_deepspeed_then_attribute_paths() -> None:
    code = (
        "import stagewise as deepspeed\n"
        "print(deepspeed.pipe.PipelineModule.__name__, deepspeed.pipe.LayerSpec.__name__,\n"
        "      deepspeed.runtime.utils.set_random_seed.__name__,\n"
        "      deepspeed.runtime.pipe.schedule.TrainSchedule.__name__,\n"
        "      deepspeed.utils.RepeatingLoader.__name__, deepspeed.checkpointing.checkpoint.__name__,\n"
        "      deepspeed.comm.get_rank.__name__, deepspeed.accelerator.get_accelerator().device_name())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [
        "PipelineModule",
        "LayerSpec",
        "seed_everything",
        "TrainSchedule",
        "RepeatingLoader",
        "checkpoint",
        "get_rank",
        stagewise.get_accelerator().device_name(),
    ]


@live
def test_deepspeed_still_has_every_name(deepspeed_now: dict[str, Any]) -> None:
    assert deepspeed_now["names"] == GOLDEN["names"]


# -- helper APIs ------------------------------------------------------------------------------


def test_add_config_arguments_and_initialize_args() -> None:
    parser = stagewise.add_config_arguments(argparse.ArgumentParser())
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    assert defaults == GOLDEN["config_arguments"]
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", "ds.json"])
    assert args.deepspeed and args.deepspeed_config == "ds.json"
    from stagewise.entry import _config_source

    assert _config_source(None, None, args) == "ds.json"
    old = parser.parse_args(["--deepscale_config", "old.json"])
    assert _config_source(None, None, old) == "old.json"
    assert _config_source({"a": 1}, None, parser.parse_args([])) == {"a": 1}
    with pytest.raises(ValueError, match=r"config twice: config=\{'a': 1\} and args"):
        _config_source({"a": 1}, None, args)


def test_set_random_seed_draws_as_deepspeeds() -> None:
    stagewise.runtime.utils.set_random_seed(1138)
    draws = [random.random(), float(np.random.rand()), torch.rand(3).tolist()]
    assert draws == GOLDEN["random_draws"]


@live
def test_live_helpers_agree(deepspeed_now: dict[str, Any]) -> None:
    for key in ("config_arguments", "random_draws"):
        assert deepspeed_now[key] == GOLDEN[key], key


def test_repeating_loader_and_log_dist(caplog: pytest.LogCaptureFixture) -> None:
    loader = stagewise.utils.RepeatingLoader([1, 2])
    assert [next(loader) for _ in range(5)] == [1, 2, 1, 2, 1]
    with caplog.at_level(logging.INFO, logger="stagewise"):
        stagewise.utils.log_dist("hello", ranks=[0])
        stagewise.utils.log_dist("not here", ranks=[3])
    assert [r.getMessage() for r in caplog.records] == ["[Rank 0] hello"]


def test_checkpointing() -> None:
    ckpt = stagewise.checkpointing
    layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Tanh())
    x = torch.randn(4, 3, requires_grad=True)
    torch.manual_seed(3)
    ckpt.checkpoint(layer, x).sum().backward()
    got = (x.grad.clone(), layer[0].weight.grad.clone())
    x.grad, layer[0].weight.grad = None, None
    torch.manual_seed(3)
    layer(x).sum().backward()  # the same dropout mask: the RNG state is restored to recompute
    torch.testing.assert_close(got, (x.grad, layer[0].weight.grad))
    tokens = torch.randint(0, 3, (2,))  # no input wants a gradient: still trains the weights
    emb = torch.nn.Embedding(3, 2)
    ckpt.checkpoint(emb, tokens).sum().backward()
    assert emb.weight.grad is not None
    ckpt.configure(None, deepspeed_config={"activation_checkpointing": {"profile": False}})
    assert ckpt.is_configured()
    with pytest.raises(NotImplementedError, match="no model-parallel RNG tracker"):
        ckpt.model_parallel_cuda_manual_seed(1)


def test_checkpointing_configure_names_what_it_does_not_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="stagewise.checkpointing"):
        stagewise.checkpointing.configure(
            None,
            deepspeed_config={"activation_checkpointing": {"cpu_checkpointing": True}},
            partition_activations=True,
            contiguous_checkpointing=True,
            num_checkpoints=9,
        )
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "checkpointing.configure: partition_activations, contiguous_checkpointing, "
        "checkpoint_in_cpu not implemented by stagewise"
    )


def test_accelerator_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    acc = stagewise.get_accelerator()
    assert (acc.device_name(), acc.device_name(1), acc.device()) == (
        "cpu",
        "cpu",
        torch.device("cpu"),
    )
    assert (acc.device_count(), acc.communication_backend_name()) == (1, "gloo")
    assert acc.current_device_name() == "cpu" and acc.is_available()
    acc.synchronize()
    acc.set_device(0)
    acc.manual_seed(7)
    first = torch.rand(2)
    acc.manual_seed(7)
    assert torch.equal(first, torch.rand(2))
    assert acc.on_accelerator(torch.zeros(1)) and acc.supported_dtypes()[0] == torch.float32
    with pytest.raises(NotImplementedError, match="reports CUDA memory"):
        acc.memory_allocated()
    with pytest.raises(AttributeError, match="op builders"):
        acc.create_op_builder("FusedAdam")


def test_comm_profiling_is_an_error_that_says_what_to_use() -> None:
    with pytest.raises(NotImplementedError, match=r"comms logger is not mirrored.*torch\.profiler"):
        stagewise.comm.all_reduce(torch.zeros(1), prof=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bogus'\]"):
        stagewise.comm.barrier(bogus=1)
    with pytest.raises(NotImplementedError, match="comms logger"):
        stagewise.comm.log_summary()


# -- DeepSpeed's config files as they are -------------------------------------------------------

# DeepSpeed's own pipeline test config: a typo, a local_rank, keys of sections stagewise lacks.
REAL = {
    "train_batch_size": 4,
    "grandient_accumulation_steps": 1,
    "local_rank": 0,
    "steps_per_print": 20,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "weight_decay": 3e-7}},
    "zero_optimization": {"stage": 0},
    "fp16": {"enabled": False, "consecutive_hysteresis": False},
    "pipeline": {"seed_layers": True, "activation_checkpoint_interval": 1, "use_reentrant": True},
    "tensorboard": {"enabled": True, "output_path": "tb"},
    "wandb": {"enabled": False},
    "flops_profiler": {"enabled": True, "profile_step": 1},
    "comms_logger": {"enabled": True},
}


def test_a_real_deepspeed_config_loads_with_warnings() -> None:
    config = Config.from_dict(REAL)
    assert config.train_batch_size == 4 and config.pipeline.activation_checkpoint_interval == 1
    assert config.notices == [
        "config keys that DeepSpeed reads but stagewise does not implement (ignored): "
        "comms_logger, flops_profiler, fp16.consecutive_hysteresis, pipeline.use_reentrant, "
        "tensorboard",
        "unknown config key 'grandient_accumulation_steps'; did you mean "
        "'gradient_accumulation_steps'? (ignored)",
        "unknown config key 'local_rank' (ignored)",
    ]


def test_strict_config_makes_them_errors() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'grandient_accumulation_steps'; did you mean .*; unknown "
        r"config key 'local_rank'; config keys that stagewise does not implement: "
        r"comms_logger, flops_profiler, .* \(an error because the config sets \"strict_config\"",
    ):
        Config.from_dict({**REAL, "strict_config": True})
    with pytest.raises(ConfigError, match="strict_config must be true or false, got 'yes'"):
        Config.from_dict({"train_batch_size": 1, "strict_config": "yes"})
    assert Config.from_dict({"train_batch_size": 1, "strict_config": True}).notices == []


def test_unknown_keys_in_sections_and_defaults_that_change_nothing() -> None:
    config = Config.from_dict(
        {
            "train_batch_size": 2,
            "pipeline": {"schedul": "gpipe", "pipe_partitioned": True, "stages": "auto"},
            "bf16": {"enabled": False, "immediate_grad_update": False},
            "optimizer": {"type": "SGD", "params": {"lr": 1.0}, "legacy_fusion": False},
        }
    )
    assert config.pipeline.schedule == "1f1b"
    (notice,) = config.notices
    assert notice.startswith(
        "unknown config key 'pipeline.schedul'; did you mean 'schedule'? (keys of pipeline: "
    )


def test_every_deepspeed_top_level_key_is_known() -> None:
    assert sorted(TOP_LEVEL) == GOLDEN["config_keys"]
    # Each loads (values that are dicts or scalars DeepSpeed would accept).
    for key in TOP_LEVEL - set(Config._KNOWN):
        assert Config.from_dict({"train_batch_size": 1, key: {"enabled": True}}).notices == [
            f"config keys that DeepSpeed reads but stagewise does not implement (ignored): {key}"
        ]


@live
def test_deepspeed_reads_the_same_keys(deepspeed_now: dict[str, Any]) -> None:
    assert deepspeed_now["config_keys"] == sorted(TOP_LEVEL)


# -- DeepSpeed's optimizer defaults --------------------------------------------------------------


def _train_ours(kind: str, params: dict[str, Any]) -> tuple[Any, list[Any]]:
    model = dsg.optimizer_model()
    optimizer = optimizer_from_config(kind, params, model.parameters())
    weights = []
    for step in range(dsg.OPTIMIZER_STEPS):
        model(dsg.optimizer_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        weights.append([p.detach().flatten().tolist() for p in model.parameters()])
    return optimizer, weights


def _check_optimizers(reference: list[dict[str, Any]]) -> None:
    assert [(r["type"], r["params"]) for r in reference] == dsg.OPTIMIZERS
    for case in reference:
        optimizer, weights = _train_ours(case["type"], case["params"])
        group = optimizer.param_groups[0]
        what = f"{case['type']} {case['params']} (DeepSpeed: {case['class']})"
        assert dsg._decoupled(optimizer, group) == case["decoupled"], what
        assert group.get("weight_decay", 0.0) == case["weight_decay"], what
        for step, (ours, theirs) in enumerate(zip(weights, case["weights"], strict=True)):
            for a, b in zip(ours, theirs, strict=True):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=f"{what} {step}")


def test_optimizer_defaults_as_deepspeeds() -> None:
    _check_optimizers(GOLDEN["optimizers"])


@live
def test_optimizer_defaults_as_deepspeeds_live(deepspeed_now: dict[str, Any]) -> None:
    _check_optimizers(deepspeed_now["optimizers"])


def test_optimizer_names_deepspeed_has_and_torch_lacks() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("Lamb", "Lion", "Muon", "MuAdam"):
        with pytest.raises(ConfigError, match=rf"optimizer.type '{name}' is not available"):
            optimizer_from_config(name, {}, params)
    with pytest.raises(ConfigError, match='set the config\'s "gradient_clipping" instead'):
        optimizer_from_config("Adam", {"max_grad_norm": 1.0}, params)
    with pytest.raises(ConfigError, match="bias_correction=false"):
        optimizer_from_config("Adam", {"bias_correction": False}, params)
    assert type(optimizer_from_config("adam", {"amsgrad": True}, params)) is torch.optim.AdamW


def _check_fused_adam(reference: list[dict[str, Any]]) -> None:
    assert [r["kwargs"] for r in reference] == dsg.FUSED_ADAM
    for case in reference:
        weights = dsg.train_directly(stagewise.ops.adam.FusedAdam, case["kwargs"])
        for ours, theirs in zip(weights, case["weights"], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=str(case["kwargs"]))


def test_fused_adam_trains_as_deepspeeds() -> None:
    _check_fused_adam(GOLDEN["fused_adam"])
    cpu_adam = stagewise.ops.adam.DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
    assert cpu_adam.defaults["weight_decay"] == 0.0 and cpu_adam.adam_w_mode == 1


@live
def test_fused_adam_trains_as_deepspeeds_live(deepspeed_now: dict[str, Any]) -> None:
    _check_fused_adam(deepspeed_now["fused_adam"])


def test_deepspeed_kernels_are_errors_that_say_what_to_use() -> None:
    with pytest.raises(NotImplementedError, match="torch has no LAMB: use a LAMB implementation"):
        stagewise.ops.lamb.FusedLamb([])
    with pytest.raises(NotImplementedError, match=r"torch\.nn\.TransformerEncoderLayer"):
        stagewise.ops.transformer.DeepSpeedTransformerLayer()
    with pytest.raises(ValueError, match=r"FusedAdam\(bias_correction=False\) is not supported"):
        stagewise.ops.adam.FusedAdam([torch.nn.Parameter(torch.zeros(1))], bias_correction=False)


def test_init_distributed_takes_deepspeeds_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(
        RuntimeError, match=r"dist_init_required=False\) but torch\.distributed is not initialized"
    ):
        stagewise.init_distributed(dist_backend="gloo", dist_init_required=False)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"launched by MPI \(4 processes\) without torchrun"):
        stagewise.init_distributed(dist_backend="gloo", distributed_port=29511, verbose=False)
    assert not torch.distributed.is_initialized()
    assert stagewise.comm.init_distributed is stagewise.init_distributed
