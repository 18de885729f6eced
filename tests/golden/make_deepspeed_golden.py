"""Record what DeepSpeed answers for the surface a pipeline script uses, as golden JSON.

Needs DeepSpeed (0.19.8 made the committed file); run from the repository root:

    DS_ACCELERATOR=cpu .venv/bin/python tests/golden/make_deepspeed_golden.py

It writes ``tests/golden/deepspeed_surface.json`` (``--out`` elsewhere, ``--only``
for some parts): the config keys DeepSpeed reads, the names of DeepSpeed's modules
that scripts import, ``add_config_arguments``' flags, ``set_random_seed``'s draws,
the optimizer DeepSpeed builds for each ``optimizer`` section and the weights it
trains, and the losses of ``examples/deepspeed_pipeline/train.py`` run on DeepSpeed
with its imports changed back. The tests compare stagewise with this file (and,
where DeepSpeed is installed, with DeepSpeed itself through this script).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
EXAMPLE = ROOT / "examples" / "deepspeed_pipeline" / "train.py"
EXAMPLE_CONFIG = EXAMPLE.parent / "ds_config.json"
EXAMPLE_STEPS = 8

#: DeepSpeed module -> the names pipeline scripts use from it (stagewise mirrors each).
SURFACE: dict[str, list[str]] = {
    "deepspeed": [
        "initialize",
        "init_distributed",
        "add_config_arguments",
        "PipelineModule",
        "PipelineEngine",
        "get_accelerator",
        "pipe",
        "comm",
        "checkpointing",
        "runtime",
        "utils",
        "accelerator",
        "ops",
    ],
    "deepspeed.pipe": ["PipelineModule", "LayerSpec", "TiedLayerSpec"],
    "deepspeed.runtime.pipe": ["PipelineModule", "LayerSpec", "TiedLayerSpec", "ProcessTopology"],
    "deepspeed.runtime.pipe.module": [
        "PipelineModule",
        "LayerSpec",
        "TiedLayerSpec",
        "PipelineError",
    ],
    "deepspeed.runtime.pipe.topology": [
        "ProcessTopology",
        "PipeDataParallelTopology",
        "PipeModelDataParallelTopology",
        "PipelineParallelGrid",
    ],
    "deepspeed.runtime.pipe.schedule": [
        "PipeSchedule",
        "InferenceSchedule",
        "TrainSchedule",
        "DataParallelSchedule",
        "PipeInstruction",
        "OptimizerStep",
        "ReduceGrads",
        "ReduceTiedGrads",
        "BufferOpInstruction",
        "LoadMicroBatch",
        "ForwardPass",
        "BackwardPass",
        "SendActivation",
        "RecvActivation",
        "SendGrad",
        "RecvGrad",
    ],
    "deepspeed.runtime.pipe.engine": ["PipelineEngine"],
    "deepspeed.runtime.utils": ["set_random_seed", "partition_uniform", "partition_balanced"],
    "deepspeed.runtime.dataloader": ["RepeatingLoader"],
    "deepspeed.runtime.lr_schedules": ["WarmupLR", "WarmupDecayLR"],
    "deepspeed.runtime.activation_checkpointing.checkpointing": [
        "checkpoint",
        "configure",
        "non_reentrant_checkpoint",
        "is_configured",
        "reset",
        "set_num_layers",
        "partition_activations_in_checkpoint",
        "model_parallel_cuda_manual_seed",
        "get_cuda_rng_tracker",
    ],
    "deepspeed.utils": ["RepeatingLoader", "logger", "log_dist"],
    "deepspeed.ops.adam": ["FusedAdam", "DeepSpeedCPUAdam"],
    "deepspeed.ops.lamb": ["FusedLamb"],
    "deepspeed.ops.transformer": ["DeepSpeedTransformerLayer", "DeepSpeedTransformerConfig"],
    "deepspeed.accelerator": ["get_accelerator"],
    "deepspeed.comm": [
        "init_distributed",
        "is_initialized",
        "is_available",
        "destroy_process_group",
        "new_group",
        "get_rank",
        "get_world_size",
        "get_local_rank",
        "get_global_rank",
        "get_world_group",
        "get_all_ranks_from_group",
        "barrier",
        "monitored_barrier",
        "broadcast",
        "broadcast_object_list",
        "all_reduce",
        "inference_all_reduce",
        "reduce",
        "all_gather",
        "all_gather_into_tensor",
        "allgather_fn",
        "all_gather_object",
        "reduce_scatter_tensor",
        "reduce_scatter_fn",
        "reduce_scatter",
        "all_to_all_single",
        "all_to_all",
        "gather",
        "scatter",
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
        "P2POp",
        "ReduceOp",
        "has_all_gather_into_tensor",
        "has_reduce_scatter_tensor",
        "log_summary",
        "configure",
    ],
}

#: Methods of DeepSpeed's accelerator and pipeline engine that scripts call.
ACCELERATOR_METHODS = [
    "device_name",
    "device",
    "current_device",
    "current_device_name",
    "set_device",
    "device_count",
    "is_available",
    "synchronize",
    "manual_seed",
    "manual_seed_all",
    "initial_seed",
    "get_rng_state",
    "set_rng_state",
    "random",
    "communication_backend_name",
    "is_bf16_supported",
    "is_fp16_supported",
    "supported_dtypes",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "reset_peak_memory_stats",
    "total_memory",
    "empty_cache",
    "pin_memory",
    "is_pinned",
    "on_accelerator",
    "range_push",
    "range_pop",
]
ENGINE_METHODS = [
    "train_batch",
    "eval_batch",
    "is_first_stage",
    "is_last_stage",
    "set_dataiterator",
    "set_dataloader",
    "set_batch_fn",
    "reset_activation_shape",
    "save_checkpoint",
    "load_checkpoint",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "get_lr",
    "module_state_dict",
    "deepspeed_io",
    "_exec_load_micro_batch",
    "_exec_forward_pass",
    "_exec_backward_pass",
    "_exec_send_activations",
    "_exec_recv_activations",
    "_exec_send_grads",
    "_exec_recv_grads",
    "_exec_reduce_tied_grads",
    "_exec_reduce_grads",
    "_exec_optimizer_step",
    "_INSTRUCTION_MAP",
]

#: (type, params) of every optimizer section compared with DeepSpeed.
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [
    ("Adam", {}),
    ("Adam", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False}),
    ("Adam", {"lr": 0.01, "torch_adam": True}),
    ("Adam", {"lr": 0.01, "torch_adam": True, "adam_w_mode": False}),
    ("AdamW", {"lr": 0.01, "torch_adam": True}),
    ("AdamW", {"lr": 0.01, "torch_adam": True, "weight_decay": 0.0}),
    ("Adagrad", {"lr": 0.01}),
    ("SGD", {"lr": 0.01, "momentum": 0.9}),
]
OPTIMIZER_STEPS = 3


def optimizer_model() -> torch.nn.Module:
    """The small model both sides train with each optimizer (weights fixed by seed 5)."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def optimizer_batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + step))


def _init_one_process() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group("gloo", rank=0, world_size=1)


def config_keys() -> list[str]:
    """Every top-level key DeepSpeedConfig reads from a config dict."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _init_one_process()
    seen: set[str] = set()

    class Keys:
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def __contains__(self, key: str) -> bool:
            seen.add(key)
            return key in self.data

        def __iter__(self) -> Any:
            return iter(self.data)

        def __len__(self) -> int:
            return len(self.data)

    class Recorder(dict):  # type: ignore[type-arg]
        def get(self, key: str, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key: object) -> bool:
            seen.add(str(key))
            return super().__contains__(key)

        def __getitem__(self, key: str) -> Any:
            seen.add(key)
            return super().__getitem__(key)

        def keys(self) -> Any:
            return Keys(dict(self))

    DeepSpeedConfig(Recorder({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}))
    return sorted(seen)


def surface_names() -> dict[str, list[str]]:
    """The names of SURFACE that DeepSpeed has, and its accelerator's and engine's methods."""
    import importlib

    out: dict[str, list[str]] = {}
    for module_name, names in SURFACE.items():
        module = importlib.import_module(module_name)
        out[module_name] = [name for name in names if hasattr(module, name)]
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.pipe.engine import PipelineEngine

    out["accelerator methods"] = [m for m in ACCELERATOR_METHODS if hasattr(get_accelerator(), m)]
    out["PipelineEngine methods"] = [m for m in ENGINE_METHODS if hasattr(PipelineEngine, m)]
    return out


def config_arguments() -> dict[str, Any]:
    """The flags deepspeed.add_config_arguments adds: dest -> default."""
    import deepspeed

    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    return {action.dest: action.default for action in parser._actions if action.dest != "help"}


def random_draws() -> list[Any]:
    """Python's, NumPy's and torch's first draws after DeepSpeed's set_random_seed(1138)."""
    from deepspeed.runtime.utils import set_random_seed

    set_random_seed(1138)
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def _decoupled(optimizer: Any, group: dict[str, Any]) -> bool:
    """Whether an Adam decouples weight decay (DeepSpeed's FusedAdam, or torch's)."""
    if hasattr(optimizer, "adam_w_mode"):
        return bool(optimizer.adam_w_mode)
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))


def optimizers() -> list[dict[str, Any]]:
    """For each OPTIMIZERS section: the optimizer DeepSpeed builds and the weights it trains."""
    import deepspeed

    _init_one_process()
    out = []
    for kind, params in OPTIMIZERS:
        model = optimizer_model()
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**6,
            "optimizer": {"type": kind, "params": dict(params)},
        }
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        inner = getattr(optimizer, "optimizer", optimizer)
        group = inner.param_groups[0]
        weights = []
        for step in range(OPTIMIZER_STEPS):
            loss = engine(optimizer_batch(step)).square().mean()
            engine.backward(loss)
            engine.step()
            weights.append([p.detach().flatten().tolist() for p in model.parameters()])
        out.append(
            {
                "type": kind,
                "params": params,
                "class": type(inner).__name__,
                "decoupled": _decoupled(inner, group),
                "weight_decay": float(group.get("weight_decay", 0.0)),
                "weights": weights,
            }
        )
    return out


#: Keyword arguments of DeepSpeed's FusedAdam trained directly (no engine).
FUSED_ADAM: list[dict[str, Any]] = [
    {},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": False},
    {"lr": 0.01, "betas": [0.8, 0.9], "eps": 1e-6},
]


def train_directly(optimizer_class: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The weights ``optimizer_class(params, **kwargs)`` trains in OPTIMIZER_STEPS steps."""
    model = optimizer_model()
    optimizer = optimizer_class(model.parameters(), **kwargs)
    weights = []
    for step in range(OPTIMIZER_STEPS):
        model(optimizer_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        weights.append([p.detach().flatten().tolist() for p in model.parameters()])
    return weights


def fused_adam() -> list[dict[str, Any]]:
    """DeepSpeed's FusedAdam, built by hand: the weights it trains for each FUSED_ADAM."""
    from deepspeed.ops.adam import FusedAdam

    return [{"kwargs": kw, "weights": train_directly(FusedAdam, kw)} for kw in FUSED_ADAM]


def deepspeed_script(source: Path, target: Path) -> None:
    """``source`` with its stagewise imports changed back to DeepSpeed's."""
    text = source.read_text()
    text = re.sub(r"^import stagewise as deepspeed$", "import deepspeed", text, flags=re.M)
    text = re.sub(r"^from stagewise\.", "from deepspeed.", text, flags=re.M)
    target.write_text(text)


def example_losses(script: Path, steps: int = EXAMPLE_STEPS, deepspeed: bool = True) -> Any:
    """The example's losses on 2 stages (on DeepSpeed, its imports changed back)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = script
        if deepspeed:
            run = Path(tmp) / "train.py"
            deepspeed_script(script, run)
        out = Path(tmp) / "losses.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(run),
            "--deepspeed_config",
            str(EXAMPLE_CONFIG),
            "--steps",
            str(steps),
            "--losses",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(out.read_text())


PARTS = {
    "config_keys": config_keys,
    "names": surface_names,
    "config_arguments": config_arguments,
    "random_draws": random_draws,
    "optimizers": optimizers,
    "fused_adam": fused_adam,
    "example": lambda: example_losses(EXAMPLE),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "deepspeed_surface.json"))
    parser.add_argument("--only", nargs="*", choices=sorted(PARTS), default=sorted(PARTS))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}  # parts not asked for stay
    record.update({name: PARTS[name]() for name in args.only})
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
