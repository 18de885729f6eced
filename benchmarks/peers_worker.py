"""One rank of ``benchmarks/peers.py``: every contender, in turn, inside the same processes.

Not meant to be run by hand (``benchmarks/peers.py`` launches it), but it can be::

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m torch.distributed.run \\
        --standalone --nproc_per_node 2 benchmarks/peers_worker.py --out /tmp/peers.json

The workload (``--workload``, see ``benchmarks/workloads.py``): the MLP or the GPT,
in fp32 or under bf16 autocast, with or without activation checkpointing; SGD,
2 stages (2 chunks per stage for the interleaved and V schedules), one thread
per process, gloo on the CPU. A step is one whole training batch: the 8
micro-batches' forwards and backwards and the optimizer step.

Every contender is built once; then round ``r`` runs each of them (in an order
rotated by ``r``, so none always runs right after the same neighbour) for
``--warmup`` untimed steps and ``--steps`` timed ones. A timed step lasts from
the end of the previous step to its own end on each rank, and counts as the
longer of the two ranks; a round's value is the median over its steps. Rank 0
writes every round's value per contender as JSON to ``--out``.

The one-process contender (``single``) runs on rank 0 alone while rank 1 waits
in a barrier (a blocking wait, no CPU used). ``single-x2`` runs that same
workload on both ranks at once, each its own copy: ``single / single-x2`` is
the most a 2-process pipeline can get out of this machine at the moment (1.0
on two idle cores; less where the cores share a memory bus or other jobs run).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from workloads import WORKLOADS, Workload, iterate

STAGES = 2
LR = 1e-4

TORCH_SCHEDULES = ("1f1b", "interleaved", "zbv")
CHUNKS = {"interleaved": (2, "loop"), "zbv": (2, "v"), "dualpipev": (2, "v")}


def stagewise_schedules() -> tuple[str, ...]:
    from stagewise.schedule.registry import schedule_names

    return tuple(schedule_names())


def all_contenders() -> tuple[str, ...]:
    return (
        "single",
        "single-x2",
        "deepspeed",
        *(f"torch-{name}" for name in TORCH_SCHEDULES),
        *(f"stagewise-{name}" for name in stagewise_schedules()),
    )


def boundaries(workload: Workload, parts: int) -> list[int]:
    """The layer boundaries every pipeline uses (stagewise's partition of the workload)."""
    from stagewise.partition import compute_boundaries

    specs = workload.stagewise_specs()
    names = [spec.typename.__name__ for spec in specs]
    return compute_boundaries(workload.partition_method, parts, class_names=names)


@dataclass
class Contender:
    """A built contender: ``step()`` trains one batch; ``ranks`` run it (others wait)."""

    name: str
    step: Callable[[], None]
    ranks: tuple[int, ...] = (0, 1)
    note: str = ""


# -- the contenders ------------------------------------------------------------------
def build_single(rank: int, workload: Workload) -> Contender:
    """One process, no pipeline: the micro-batches with gradient accumulation."""
    model = workload.reference()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = workload.data()
    loss_fn, count = workload.loss_fn, workload.micro_batches

    def step() -> None:
        for inputs, labels in data:
            with workload.autocast():
                loss = loss_fn(model(inputs), labels) / count
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender("single", step, ranks=(0,), note="rank 0 alone")


def build_single_x2(rank: int, workload: Workload) -> Contender:
    """The one-process workload on both ranks at once: what the machine gives 2 processes."""
    single = build_single(rank, workload)
    return Contender("single-x2", single.step, note="one copy per rank, simultaneously")


def build_deepspeed(rank: int, workload: Workload) -> Contender | None:
    """DeepSpeed's engine; None under bf16 autocast (DeepSpeed's bf16 casts the model)."""
    if workload.bf16:
        return None
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    model = PipelineModule(
        layers=workload.specs(LayerSpec, TiedLayerSpec),
        num_stages=STAGES,
        loss_fn=workload.loss_fn,
        partition_method=workload.partition_method,
        activation_checkpoint_interval=1 if workload.ckpt else 0,
        activation_checkpoint_func=ckpt,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": workload.micro_batch_size,
        "gradient_accumulation_steps": workload.micro_batches,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    data = iterate(workload.data())

    def step() -> None:
        engine.train_batch(data)

    return Contender("deepspeed", step, note=f"deepspeed {deepspeed.__version__}")


def stagewise_engine(
    schedule: str, workload: Workload, record_timeline: bool = False
) -> tuple[Any, Callable[[], None]]:
    """A stagewise engine running ``schedule``, and a function that trains it one batch."""
    import stagewise
    from stagewise.pipe import PipelineModule

    chunks = CHUNKS.get(schedule, (1, "loop"))
    model = PipelineModule(
        layers=workload.stagewise_specs(),
        num_stages=STAGES,
        loss_fn=workload.loss_fn,
        partition_method=workload.partition_method,
        activation_checkpoint_interval=1 if workload.ckpt else 0,
        virtual_stages=chunks[0],
        placement=chunks[1],
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": workload.micro_batch_size,
        "gradient_accumulation_steps": workload.micro_batches,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "pipeline": {"schedule": schedule, "record_timeline": record_timeline},
    }
    if workload.bf16:
        config["bf16"] = {"enabled": True}
    engine, _, _, _ = stagewise.initialize(model=model, optimizer=optimizer, config=config)
    data = iterate(workload.data())

    def step() -> None:
        engine.train_batch(data)

    return engine, step


def build_stagewise(rank: int, schedule: str, workload: Workload) -> Contender:
    _engine, step = stagewise_engine(schedule, workload)
    return Contender(f"stagewise-{schedule}", step)


def build_torch(rank: int, schedule: str, workload: Workload) -> Contender:
    """``torch.distributed.pipelining`` over the same layers, split by hand at the same
    boundaries; a weight tied across ranks gets its gradients summed by hand."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
        ScheduleZBVZeroBubble,
    )
    from torch.distributed.pipelining.stage import _PipelineStageBase

    if schedule == "1f1b":
        total, mine = STAGES, [rank]
    elif schedule == "interleaved":
        total, mine = 2 * STAGES, [rank, rank + STAGES]  # loop: rank r holds r and r + S
    else:
        total, mine = 2 * STAGES, [rank, 2 * STAGES - 1 - rank]  # V: r and 2S - 1 - r
    modules, tied = workload.torch_stage_modules(boundaries(workload, total), mine)
    stages: list[_PipelineStageBase] = [
        PipelineStage(modules[index], index, total, torch.device("cpu")) for index in sorted(mine)
    ]
    params = list({id(p): p for m in modules.values() for p in m.parameters()}.values())
    optimizer = torch.optim.SGD(params, lr=LR)
    loss_fn, count = workload.loss_fn, workload.micro_batches
    sched: Any
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], count, loss_fn=loss_fn)
    elif schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, count, loss_fn=loss_fn)
    else:
        sched = ScheduleZBVZeroBubble(stages, count, loss_fn=loss_fn)
    data = workload.data()
    inputs = torch.cat([x for x, _ in data])
    targets = torch.cat([y for _, y in data])
    first, last = 0 in mine, total - 1 in mine
    args: tuple[torch.Tensor, ...] = (inputs,) if first else ()
    kwargs: dict[str, Any] = {"target": targets} if last else {}

    def step() -> None:
        sched.step(*args, return_outputs=False, **kwargs)
        for weight in tied:  # the tie torch.distributed.pipelining does not keep
            if weight.grad is not None:
                dist.all_reduce(weight.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(f"torch-{schedule}", step)


def build(name: str, rank: int, workload: Workload) -> Contender | None:
    if name == "single":
        return build_single(rank, workload)
    if name == "single-x2":
        return build_single_x2(rank, workload)
    if name == "deepspeed":
        return build_deepspeed(rank, workload)
    family, schedule = name.split("-", 1)
    if family == "torch":
        return build_torch(rank, schedule, workload)
    return build_stagewise(rank, schedule, workload)


# -- timing ------------------------------------------------------------------------------
def timed_round(contender: Contender, rank: int, warmup: int, steps: int) -> float | None:
    """Median step time (s) of one round of ``contender`` (on rank 0; None elsewhere)."""
    dist.barrier()
    durations: list[float] = []
    if rank in contender.ranks:
        for _ in range(warmup):
            contender.step()
    dist.barrier()
    if rank in contender.ranks:
        last = time.perf_counter()
        for _ in range(steps):
            contender.step()
            now = time.perf_counter()
            durations.append(now - last)
            last = now
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, durations)
    per_step = [max(ds) for ds in zip(*(g for g in gathered if g), strict=True)]
    return statistics.median(per_step) if rank == 0 else None


def record_timelines(rank: int, directory: Path, steps: int, workload: Workload) -> None:
    """Run each stagewise schedule with ``record_timeline`` and write its PNG and trace."""
    directory.mkdir(parents=True, exist_ok=True)
    for schedule in stagewise_schedules():
        engine, step = stagewise_engine(schedule, workload, record_timeline=True)
        for _ in range(steps):
            step()
        stem = directory / f"stagewise-{workload.name}{'-bf16' if workload.bf16 else ''}"
        stem = Path(f"{stem}{'-ckpt' if workload.ckpt else ''}-{schedule}")
        with contextlib.suppress(ImportError):  # no matplotlib: the trace only
            engine.write_timeline(
                png=f"{stem}.png", title=f"stagewise {schedule}, {workload.label}"
            )
        engine.write_timeline(trace=f"{stem}.json")
        del engine, step
        dist.barrier()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--contenders", default="", help="comma-separated (default: all)")
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--out", required=True, help="rank 0 writes the results here (JSON)")
    parser.add_argument("--timeline-dir", help="also record stagewise timelines here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = WORKLOADS[args.workload]
    names = [n for n in args.contenders.split(",") if n] or list(all_contenders())
    unknown = sorted(set(names) - set(all_contenders()))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {list(all_contenders())}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if "deepspeed" in names and not has_deepspeed:
        names.remove("deepspeed")
    if has_deepspeed and "deepspeed" in names:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        import stagewise

        stagewise.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)  # after the imports: none of them may raise it again
    rank = dist.get_rank()
    if dist.get_world_size() != STAGES:
        raise SystemExit(f"run with {STAGES} processes, got {dist.get_world_size()}")

    contenders = []
    for name in names:
        contender = build(name, rank, workload)
        if contender is None:
            continue
        timed_round(contender, rank, warmup=2, steps=1)  # first-step set-up (shapes, buffers)
        contenders.append(contender)
    results: dict[str, list[float]] = {c.name: [] for c in contenders}
    for round_index in range(args.rounds):
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            if torch.get_num_threads() != 1:
                raise RuntimeError(
                    f"{contender.name}: torch uses {torch.get_num_threads()} threads"
                )
            median = timed_round(contender, rank, args.warmup, args.steps)
            if median is not None:
                results[contender.name].append(median)
        if rank == 0:
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    if args.timeline_dir:
        del contenders
        record_timelines(rank, Path(args.timeline_dir), 3, workload)
    if rank == 0:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "deepspeed_installed": has_deepspeed,
            "workload": args.workload,
            "describe": workload.describe(),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
