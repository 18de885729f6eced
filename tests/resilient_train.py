"""A small training job for the resilience tests: under torchrun, as plain processes, or in-process.

``python -m torch.distributed.run ... tests/resilient_train.py --out DIR [options]`` trains a
tiny MLP (with dropout, so RNG states matter) over 2 stages with AdamW, saving periodic
checkpoints and resuming from them (``--save-dir``, ``--every``, ``--resume auto``). The
data comes from ``deepspeed_io`` (``--data loader``) or from a plain iterator that skips
``engine.global_steps`` batches after a resume (``--data iterator``).

Faults come from a plan (``--plan FILE``, JSON ``[{"step", "rank", "point"}]``): the rank
SIGKILLs itself ``before`` step ``step``, ``mid`` step (at its second forward) or ``save``
(after the first checkpoint file it writes from that step on; with async saves that is the
background thread). Each entry fires once: a marker file in ``--marks`` records it first.
``--stop-at STEP --stop-rank R`` makes rank R SIGSTOP itself before that step instead.

At the end every rank writes ``rank{R}.pt`` into ``--out``: its weights and counters.
``train_job(rank, world_size, options)`` runs the same job in processes that already
joined a group (the uninterrupted reference of the tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

import stagewise
from stagewise.pipe import LayerSpec, PipelineModule
from stagewise.schedule import ForwardPass

MICRO, MB, SAMPLES = 2, 4, 96  # 96 samples / (4 x 2) = 12 steps per epoch


def specs() -> list[Any]:
    return [
        LayerSpec(nn.Linear, 6, 16),
        nn.ReLU(),
        LayerSpec(nn.Dropout, 0.1),
        LayerSpec(nn.Linear, 16, 16),
        nn.Tanh(),
        LayerSpec(nn.Dropout, 0.1),
        LayerSpec(nn.Linear, 16, 3),
    ]


def dataset() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(7)
    return torch.utils.data.TensorDataset(
        torch.randn(SAMPLES, 6, generator=gen), torch.randint(0, 3, (SAMPLES,), generator=gen)
    )


def batches_from(step: int) -> Any:
    """The user's own data: micro-batch k of step s is samples (s * MICRO + k) * MB ..."""
    data = dataset()
    while True:
        for k in range(MICRO):
            start = ((step * MICRO + k) * MB) % SAMPLES
            yield data.tensors[0][start : start + MB], data.tensors[1][start : start + MB]
        step += 1


def config(options: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": MICRO,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "steps_per_print": 1000,
        "pipeline": {"timeout_s": options.get("timeout_s", 20)},
    }
    if options.get("save_dir"):
        cfg["checkpoint"] = {
            "save_dir": options["save_dir"],
            "every_steps": options.get("every", 5),
            "keep_last": options.get("keep_last", 2),
            "async": bool(options.get("async_save")),
            "resume": options.get("resume", "never"),
        }
    return cfg


def _marked(marks: str, index: int) -> bool:
    path = os.path.join(marks, f"done-{index}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return True
    return False


def _die_mid_step(engine: Any) -> None:
    """SIGKILL this process at its second forward pass from now on."""
    calls = {"n": 0}
    previous: Any = None

    def forward_then_die(instr: Any, batch: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        previous(instr, batch)

    previous = engine.register_instruction(ForwardPass, forward_then_die)


def _die_in_save() -> None:
    """SIGKILL this process right after the next file it writes with torch.save."""
    original = torch.save

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die  # type: ignore[assignment]


def _arm(engine: Any, step: int, rank: int, options: dict[str, Any]) -> None:
    """Carry out the plan's faults for this rank at this step."""
    for index, fault in enumerate(options.get("plan", [])):
        if fault["step"] != step or fault["rank"] != rank or _marked(options["marks"], index):
            continue
        print(f"[fault] rank {rank} {fault['point']} step {step}", flush=True)
        if fault["point"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault["point"] == "mid":
            _die_mid_step(engine)
        elif fault["point"] == "save":
            _die_in_save()
    if options.get("stop_at") == step and options.get("stop_rank") == rank:
        with open(os.path.join(options["marks"], f"stopped-{rank}"), "w") as handle:
            handle.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)


def train_job(rank: int, world_size: int, options: dict[str, Any]) -> dict[str, Any]:
    """Build, resume if configured, train to ``options["steps"]``; weights and counters."""
    torch.set_num_threads(1)
    stages = options.get("stages", 2)
    module = PipelineModule(
        layers=specs(),
        num_stages=stages,
        loss_fn=nn.functional.cross_entropy,
        seed_layers=True,
        partition_method="uniform",
    )
    use_loader = options.get("data", "loader") == "loader"
    engine, _, _, _ = stagewise.initialize(
        model=module,
        config=config(options),
        training_data=dataset() if use_loader else None,
    )
    data = None if use_loader else batches_from(engine.global_steps)
    ready = options.get("ready")
    while engine.global_steps < options["steps"]:
        step = engine.global_steps + 1
        _arm(engine, step, rank, options)
        engine.train_batch(data)
        if ready and engine.global_steps == options.get("ready_after", 2) and rank == 0:
            with open(ready, "w") as handle:
                handle.write("ready")
        if options.get("sleep"):
            time.sleep(options["sleep"])
    engine.wait_for_checkpoint()
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "steps": engine.global_steps,
        "skipped": engine.skipped_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--save-dir")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--resume", default="never")
    parser.add_argument("--data", choices=["loader", "iterator"], default="loader")
    parser.add_argument("--plan", help="a JSON file of faults")
    parser.add_argument("--marks", help="where fired faults are recorded")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--stop-rank", type=int)
    parser.add_argument("--timeout-s", type=float, default=20)
    parser.add_argument("--ready", help="rank 0 writes this file after --ready-after steps")
    parser.add_argument("--ready-after", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds between steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
    options = {k: v for k, v in vars(args).items() if v is not None}
    if args.plan:
        with open(args.plan) as handle:
            options["plan"] = json.load(handle)
    stagewise.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result = train_job(rank, world, options)
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    print(f"[done] rank {rank} at step {result['steps']}", flush=True)


if __name__ == "__main__":
    main()
