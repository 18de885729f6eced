"""DeepSpeed's ``tests/unit/runtime/pipe/test_pipe_module.py``, checked in our words.

A ``torch.nn.Sequential`` cut into two stages evaluates as the one-process model
does, with and without ``checkpointing.configure`` (and once compiled); the
checkpoint-interval setter and ``use_reentrant: false`` keep the module's
non-reentrant checkpoint function. DeepSpeed's own versions of the last two
also call its private ``_precompute_checkpointable_values``,
``is_checkpointable_results`` and ``_reentrant_activation_checkpointing``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import stagewise as deepspeed
import stagewise.comm as dist
from distributed import run_distributed
from stagewise.accelerator import get_accelerator
from stagewise.pipe import PipelineModule
from stagewise.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from stagewise.utils import RepeatingLoader

pytestmark = pytest.mark.slow

HIDDEN_DIM = 32
LAYERS = 8
CONFIG = {
    "train_batch_size": 2,
    "train_micro_batch_size_per_gpu": 1,
    "steps_per_print": 1,
    "optimizer": {
        "type": "Adam",
        "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
    },
    "pipeline": {"activation_checkpoint_interval": 1},
}
VARIANTS = [(False, False), (True, False), (True, True)]  # (activation checkpoints, compile)


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        *[nn.Linear(HIDDEN_DIM, HIDDEN_DIM) for _ in range(LAYERS)], nn.Linear(HIDDEN_DIM, 1)
    )


def _eval_matches(checkpoints: bool, use_compile: bool) -> bool:
    base_model = _sequential()
    base_input = torch.randn(1, HIDDEN_DIM, generator=torch.Generator().manual_seed(1))
    base_output = base_model(base_input)
    base_params = sum(p.numel() for p in base_model.parameters())
    pipe_model = PipelineModule(layers=copy.deepcopy(base_model), num_stages=2)
    if use_compile:
        pipe_model.compile()
    total = torch.LongTensor([sum(p.numel() for p in pipe_model.parameters())])
    total = total.to(get_accelerator().device_name())
    dist.all_reduce(total)
    assert total.item() == base_params
    engine, _, _, _ = deepspeed.initialize(
        config=copy.deepcopy(CONFIG),
        model=pipe_model,
        model_parameters=list(pipe_model.parameters()),
    )
    if checkpoints:
        deepspeed.checkpointing.configure(
            None,
            deepspeed_config=engine.config,
            partition_activations=True,
            contiguous_checkpointing=True,
            num_checkpoints=9,
        )
    data_iter = iter(RepeatingLoader([(base_input.clone(), 0)]))  # label 0 is meaningless
    output = engine.eval_batch(data_iter=data_iter)
    return bool(torch.allclose(base_output, output.cpu(), atol=1e-4))


def _mixed() -> nn.Sequential:
    return nn.Sequential(
        *[nn.ReLU() for _ in range(LAYERS // 2)],
        *[nn.Linear(HIDDEN_DIM, HIDDEN_DIM) for _ in range(LAYERS // 2)],
    )


def _checkpoint_function_kept() -> list[bool]:
    config: dict[str, Any] = copy.deepcopy(CONFIG)
    config["pipeline"] = {"activation_checkpoint_interval": 0, "use_reentrant": False}
    model = PipelineModule(layers=_mixed(), num_stages=dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(config=config, model=model)
    before = engine.module.activation_checkpoint_func is ds_checkpointing.non_reentrant_checkpoint
    engine.module.set_checkpoint_interval(1)
    after = engine.module.activation_checkpoint_func is ds_checkpointing.non_reentrant_checkpoint
    return [before, after, engine.module.activation_checkpoint_interval == 1]


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    return {
        "eval": [_eval_matches(*variant) for variant in VARIANTS],
        "checkpoint_function": _checkpoint_function_kept(),
    }


def test_pipe_module_sequential() -> None:
    for result in run_distributed(_worker, 2, timeout=300):
        assert result["eval"] == [True] * len(VARIANTS)
        assert result["checkpoint_function"] == [True, True, True]
