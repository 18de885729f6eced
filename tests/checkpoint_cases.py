"""Training runs that save and load checkpoints, one function per process role.

A *case* (as in ``pipeline_cases``) names the model, stages, data parallelism and
batch shape, plus ``optimizer`` (``"sgd"``: momentum SGD, ``"adam"``: AdamW) and
``scheduler`` (a WarmupLR when true). :func:`run_actions` trains one case on one
rank through a list of actions (load, train, save, probe the RNGs, evaluate) and
reports what the tests compare; :func:`train_reference_ckpt` trains the same case in one process.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import torch

import stagewise
from interop.tiny_gpt import EVAL_SEED, gpt_specs, token_batches
from pipeline_cases import LOSSES, SPECS, batches_for, build_pipeline, ds_config
from stagewise.lr_schedules import build_lr_scheduler
from stagewise.models.gpt import gpt_loss
from stagewise.models.reference import build_reference
from stagewise.spec import LayerSpec, TiedLayerSpec

SCHEDULER = {"warmup_min_lr": 0.01, "warmup_max_lr": 0.05, "warmup_num_steps": 5}


def make_optimizer(case: dict[str, Any], params: Any) -> torch.optim.Optimizer:
    """The case's optimizer over ``params`` (the same in the pipeline and the reference)."""
    if case.get("optimizer", "sgd") == "adam":
        return torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.9), weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def make_scheduler(case: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    if not case.get("scheduler"):
        return None
    return build_lr_scheduler("WarmupLR", optimizer, dict(SCHEDULER))


def build_engine(case: dict[str, Any]) -> stagewise.PipelineEngine:
    module = build_pipeline(case)
    optimizer = make_optimizer(case, module.parameters())
    config = ds_config(case)
    del config["optimizer"]
    engine, _, _, _ = stagewise.initialize(
        model=module,
        optimizer=optimizer,
        config=config,
        lr_scheduler=make_scheduler(case, optimizer),
    )
    return engine


def eval_batches(case: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Fixed evaluation micro-batches, the same whatever the stages and data parallelism."""
    return batches_for({**case, "dp": 1}, 99, 0)


def rng_probe() -> list[float]:
    """Draw from every generator a checkpoint restores (this consumes them)."""
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist()]


def _train(engine: stagewise.PipelineEngine, case: dict[str, Any], steps: int) -> list[float]:
    dp_rank = engine.grid.get_data_parallel_rank()
    losses = []
    for _ in range(steps):
        data = batches_for(case, engine.global_steps, dp_rank)
        losses.append(float(engine.train_batch(iter(data))))
    return losses


def _die_after_first_save() -> None:
    """Make this process SIGKILL itself right after its next file is written."""
    original = torch.save

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die  # type: ignore[assignment]


def run_actions(rank: int, world_size: int, case: dict[str, Any], actions: list[Any]) -> Any:
    """One rank builds the case's engine and performs ``actions`` in order.

    Actions: ``("train", n)``, ``("save", dir)`` (client state: rank and step),
    ``("save", dir, kill_rank)`` (rank ``kill_rank`` SIGKILLs itself after its first file),
    ``("save", dir, None, tag)`` (under ``tag``),
    ``("load", dir, kwargs)``, ``("probe",)`` (draw from the RNGs), ``("eval",)``
    (loss and logits on fixed data). Returns ``{"rank", "stage", "results"}`` with
    one entry per action; an action that raises ends the run with
    ``{"error": "<Type>: <message>"}`` as its entry.
    """
    engine = build_engine(case)
    results: list[Any] = []
    out = {"rank": rank, "stage": engine.stage_id, "results": results}
    for action in actions:
        kind = action[0]
        try:
            if kind == "train":
                results.append(_train(engine, case, action[1]))
            elif kind == "save":
                if len(action) > 2 and action[2] == rank:
                    _die_after_first_save()
                client = {"rank": rank, "steps": engine.global_steps}
                tag = action[3] if len(action) > 3 else None
                results.append(engine.save_checkpoint(action[1], tag, client_state=client))
            elif kind == "load":
                path, client = engine.load_checkpoint(action[1], **action[2])
                results.append(
                    {
                        "path": path,
                        "client": client,
                        "steps": engine.global_steps,
                        "lr": engine.get_lr(),
                    }
                )
            elif kind == "probe":
                results.append(rng_probe())
            elif kind == "eval":
                loss, logits = engine.eval_batch(iter(eval_batches(case)), return_logits=True)
                results.append({"loss": float(loss), "logits": logits})
            else:
                raise ValueError(f"unknown action {action!r}")
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            break
    return out


def run_many(rank: int, world_size: int, runs: list[tuple[dict[str, Any], list[Any]]]) -> list[Any]:
    """Several ``(case, actions)`` runs one after another in the same processes."""
    return [run_actions(rank, world_size, case, actions) for case, actions in runs]


def expect_load_errors(
    rank: int, world_size: int, case: dict[str, Any], attempts: list[dict[str, Any]]
) -> list[str]:
    """Try each load; return ``"OK: <result>"`` or ``"<ErrorType>: <message>"`` per attempt."""
    engine = build_engine(case)
    messages = []
    for attempt in attempts:
        try:
            path, client = engine.load_checkpoint(attempt["dir"], **attempt.get("kwargs", {}))
            messages.append(f"OK: {path} {client}")
        except Exception as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages


def train_reference_ckpt(case: dict[str, Any], steps: int) -> list[float]:
    """The case trained ``steps`` batches in one process (optimizer and scheduler included)."""
    torch.set_num_threads(1)
    model = build_reference(SPECS[case["model"]](), base_seed=1234, seed_layers=True)
    loss_fn = LOSSES[case["model"]]
    optimizer = make_optimizer(case, model.parameters())
    scheduler = make_scheduler(case, optimizer)
    m, dp = case["micro_batches"], case.get("dp", 1)
    losses = []
    for step in range(steps):
        total = 0.0
        for d in range(dp):
            for x, y in batches_for(case, step, d):
                loss = loss_fn(model(x), y)
                (loss / (m * dp)).backward()
                total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(total / (m * dp))
    return losses


# -- DeepSpeed's checkpoint: the model of tests/interop/ds_save_checkpoint.py -------------


def ds_gpt_specs() -> list[Any]:
    """The specs that tests/interop/ds_save_checkpoint.py builds with DeepSpeed's classes."""
    return gpt_specs(LayerSpec, TiedLayerSpec)


def ds_eval_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation micro-batches (the same in the DeepSpeed script)."""
    return token_batches(EVAL_SEED)


def eval_ds_checkpoint(rank: int, world_size: int, load_dir: str) -> float:
    """Load DeepSpeed's layer files (module only) over ``world_size`` stages; the eval loss."""
    module = stagewise.PipelineModule(
        layers=ds_gpt_specs(),
        num_stages=world_size,
        loss_fn=gpt_loss,
        seed_layers=True,
        base_seed=999,  # other initial weights: every loaded value must come from the files
        partition_method="uniform",
    )
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    engine, _, _, _ = stagewise.initialize(model=module, config=config)
    engine.load_checkpoint(load_dir, load_module_only=True)
    return float(engine.eval_batch(iter(ds_eval_batches())))
