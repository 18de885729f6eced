"""One rank of ``benchmarks/peers.py``: every contender, in turn, inside the same processes.

Not meant to be run by hand (``benchmarks/peers.py`` launches it), but it can be::

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m torch.distributed.run \\
        --standalone --nproc_per_node 2 benchmarks/peers_worker.py --out /tmp/peers.json

The workload: 8 ``Linear(1024, 1024)`` with a ReLU between each pair (15 layers),
MSE against fixed random targets, 8 micro-batches of 16 rows, SGD, 2 stages (2
chunks of 2 linears per stage for the interleaved and V schedules), one thread
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
import importlib.util
import itertools
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
from torch import nn

WIDTH = 1024
LINEARS = 8
MICRO_BATCH = 16
MICRO_BATCHES = 8
STAGES = 2
LR = 1e-4

TORCH_SCHEDULES = ("1f1b", "interleaved", "zbv")
STAGEWISE_SCHEDULES = ("1f1b", "gpipe", "interleaved", "zb-h1", "zbv")
ALL_CONTENDERS = (
    "single",
    "single-x2",
    "deepspeed",
    *(f"torch-{name}" for name in TORCH_SCHEDULES),
    *(f"stagewise-{name}" for name in STAGEWISE_SCHEDULES),
)


def layer_list() -> list[nn.Module]:
    """The 15 layers: ``Linear, ReLU, Linear, ..., ReLU, Linear`` (8 linears), seeded."""
    torch.manual_seed(1234)
    layers: list[nn.Module] = []
    for index in range(LINEARS):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(WIDTH, WIDTH))
    return layers


def layer_specs(spec_cls: Any) -> list[Any]:
    """The same 15 layers as ``LayerSpec`` s of DeepSpeed or stagewise."""
    specs: list[Any] = []
    for index in range(LINEARS):
        if index:
            specs.append(spec_cls(nn.ReLU))
        specs.append(spec_cls(nn.Linear, WIDTH, WIDTH))
    return specs


def boundaries(parts: int) -> list[int]:
    """Uniform layer boundaries (DeepSpeed's ``partition_uniform``): 2 linears per 4 parts."""
    count = 2 * LINEARS - 1
    base, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return bounds


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 8 fixed (inputs, targets) micro-batches, the same on every rank."""
    gen = torch.Generator().manual_seed(42)
    return [
        (
            torch.randn(MICRO_BATCH, WIDTH, generator=gen),  # (16, 1024)
            torch.randn(MICRO_BATCH, WIDTH, generator=gen),  # (16, 1024)
        )
        for _ in range(MICRO_BATCHES)
    ]


def mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs, labels)


@dataclass
class Contender:
    """A built contender: ``step()`` trains one batch; ``ranks`` run it (others wait)."""

    name: str
    step: Callable[[], None]
    ranks: tuple[int, ...] = (0, 1)
    note: str = ""


# -- the contenders ------------------------------------------------------------------
def build_single(rank: int) -> Contender:
    """One process, no pipeline: 8 micro-batches with gradient accumulation."""
    model = nn.Sequential(*layer_list())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = micro_batches()

    def step() -> None:
        for inputs, labels in data:
            loss = mse(model(inputs), labels) / MICRO_BATCHES
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender("single", step, ranks=(0,), note="rank 0 alone")


def build_single_x2(rank: int) -> Contender:
    """The one-process workload on both ranks at once: what the machine gives 2 processes."""
    single = build_single(rank)
    return Contender("single-x2", single.step, note="one copy per rank, simultaneously")


def build_deepspeed(rank: int) -> Contender:
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    model = PipelineModule(
        layers=layer_specs(LayerSpec),
        num_stages=STAGES,
        loss_fn=mse,
        partition_method="uniform",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    data = itertools.cycle(micro_batches())

    def step() -> None:
        engine.train_batch(data)

    return Contender("deepspeed", step, note=f"deepspeed {deepspeed.__version__}")


def stagewise_engine(
    schedule: str, record_timeline: bool = False
) -> tuple[Any, Callable[[], None]]:
    """A stagewise engine running ``schedule``, and a function that trains it one batch."""
    import stagewise
    from stagewise.pipe import LayerSpec, PipelineModule

    chunks = {"interleaved": (2, "loop"), "zbv": (2, "v")}.get(schedule, (1, "loop"))
    model = PipelineModule(
        layers=layer_specs(LayerSpec),
        num_stages=STAGES,
        loss_fn=mse,
        partition_method="uniform",
        virtual_stages=chunks[0],
        placement=chunks[1],
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "pipeline": {"schedule": schedule, "record_timeline": record_timeline},
    }
    engine, _, _, _ = stagewise.initialize(model=model, optimizer=optimizer, config=config)
    data = itertools.cycle(micro_batches())

    def step() -> None:
        engine.train_batch(data)

    return engine, step


def build_stagewise(rank: int, schedule: str) -> Contender:
    _engine, step = stagewise_engine(schedule)
    return Contender(f"stagewise-{schedule}", step)


def build_torch(rank: int, schedule: str) -> Contender:
    """``torch.distributed.pipelining`` over the same layers, split by hand."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
        ScheduleZBVZeroBubble,
    )
    from torch.distributed.pipelining.stage import _PipelineStageBase

    layers = layer_list()
    if schedule == "1f1b":
        total, mine = STAGES, [rank]
    elif schedule == "interleaved":
        total, mine = 2 * STAGES, [rank, rank + STAGES]  # loop: rank r holds r and r + S
    else:
        total, mine = 2 * STAGES, [rank, 2 * STAGES - 1 - rank]  # V: r and 2S - 1 - r
    bounds = boundaries(total)
    modules = {index: nn.Sequential(*layers[bounds[index] : bounds[index + 1]]) for index in mine}
    stages: list[_PipelineStageBase] = [
        PipelineStage(modules[index], index, total, torch.device("cpu")) for index in sorted(mine)
    ]
    params = [p for module in modules.values() for p in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=LR)
    sched: Any
    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], MICRO_BATCHES, loss_fn=mse)
    elif schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, MICRO_BATCHES, loss_fn=mse)
    else:
        sched = ScheduleZBVZeroBubble(stages, MICRO_BATCHES, loss_fn=mse)
    data = micro_batches()
    inputs = torch.cat([x for x, _ in data])  # (128, 1024)
    targets = torch.cat([y for _, y in data])  # (128, 1024)
    first, last = 0 in mine, total - 1 in mine
    args: tuple[torch.Tensor, ...] = (inputs,) if first else ()
    kwargs: dict[str, Any] = {"target": targets} if last else {}

    def step() -> None:
        sched.step(*args, return_outputs=False, **kwargs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Contender(f"torch-{schedule}", step)


def build(name: str, rank: int) -> Contender:
    if name == "single":
        return build_single(rank)
    if name == "single-x2":
        return build_single_x2(rank)
    if name == "deepspeed":
        return build_deepspeed(rank)
    family, schedule = name.split("-", 1)
    if family == "torch":
        return build_torch(rank, schedule)
    return build_stagewise(rank, schedule)


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


def record_timelines(rank: int, directory: Path, steps: int) -> None:
    """Run each stagewise schedule with ``record_timeline`` and write its PNG and trace."""
    directory.mkdir(parents=True, exist_ok=True)
    for schedule in STAGEWISE_SCHEDULES:
        engine, step = stagewise_engine(schedule, record_timeline=True)
        for _ in range(steps):
            step()
        stem = directory / f"stagewise-{schedule}"
        with contextlib.suppress(ImportError):  # no matplotlib: the trace only
            engine.write_timeline(png=f"{stem}.png", title=f"stagewise {schedule}")
        engine.write_timeline(trace=f"{stem}.json")
        del engine, step
        dist.barrier()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    parser.add_argument("--out", required=True, help="rank 0 writes the results here (JSON)")
    parser.add_argument("--timeline-dir", help="also record stagewise timelines here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(ALL_CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {list(ALL_CONTENDERS)}")
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
        contender = build(name, rank)
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
        record_timelines(rank, Path(args.timeline_dir), steps=3)
    if rank == 0:
        meta = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "steps": args.steps,
            "warmup": args.warmup,
            "deepspeed_installed": has_deepspeed,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
