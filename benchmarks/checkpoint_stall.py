"""How long a save stalls training: synchronous beside asynchronous, about 100M parameters.

Run from the repository root:

    .venv/bin/python benchmarks/checkpoint_stall.py            # 8 x Linear(3584, 3584): 103M
    .venv/bin/python benchmarks/checkpoint_stall.py --width 512 --rounds 2   # a smoke test

Two processes (gloo on the CPU, one thread each) train 8 ``Linear(W, W)`` layers with a
ReLU between them over 2 pipeline stages (4 linears, about 51M parameters, per stage) with
AdamW, so each rank saves its weights and both Adam moments (about 615 MB at W=3584).
For each mode (``"checkpoint": {"async": false}``, then ``true``) the script times plain
steps (``train_batch``), then ``--rounds`` times a step followed by
``save_checkpoint``: the *stall* is that step's time minus the median plain step. For
the asynchronous mode it also times the steps taken while the files are written in the
background, and how long the save took to be committed. Every figure is the slowest
rank's. The machine's load is printed: on a busy machine compare the two modes of one
run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import stagewise
from stagewise.pipe import LayerSpec, PipelineModule

GOAL = 0.2  # async stall / sync stall


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - start)


def _measure(args: argparse.Namespace, save_dir: str, async_save: bool) -> dict[str, Any]:
    layers: list[Any] = []
    for i in range(8):
        layers.append(LayerSpec(nn.Linear, args.width, args.width))
        if i < 7:
            layers.append(nn.ReLU())
    module = PipelineModule(
        layers=layers, num_stages=2, loss_fn=nn.functional.mse_loss, partition_method="uniform"
    )
    engine, *_ = stagewise.initialize(
        model=module,
        config={
            "train_micro_batch_size_per_gpu": args.rows,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "steps_per_print": 10**9,
            "pipeline": {"timeout_s": 600},
            "checkpoint": {"save_dir": save_dir, "async": async_save},
        },
    )
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.rows, args.width, generator=gen),) * 2 for _ in range(2)]
    batch = stagewise.RepeatingLoader(data)
    for _ in range(2):
        engine.train_batch(batch)
    plain = statistics.median(_timed(lambda: engine.train_batch(batch)) for _ in range(args.plain))
    stalls, during, commits = [], [], []
    for _ in range(args.rounds):
        saving = _timed(lambda: (engine.train_batch(batch), engine.save_checkpoint(save_dir)))
        stalls.append(saving - plain)
        tag_dir = os.path.join(save_dir, f"global_step{engine.global_steps}")
        if async_save:
            start = time.perf_counter()
            during.extend(_timed(lambda: engine.train_batch(batch)) for _ in range(args.after))
            engine.wait_for_checkpoint()
            commits.append(_slowest(time.perf_counter() - start) + saving)
    params = sum(p.numel() for p in module.parameters())
    total = torch.tensor([params], dtype=torch.int64)
    dist.all_reduce(total)
    engine.wait_for_checkpoint()
    size = sum(os.path.getsize(os.path.join(tag_dir, f)) for f in os.listdir(tag_dir))
    return {
        "params": int(total.item()),
        "bytes": size,
        "plain": plain,
        "stall": statistics.median(stalls),
        "stalls": stalls,
        "during": statistics.median(during) if during else None,
        "commit": statistics.median(commits) if commits else None,
    }


def _worker(rank: int, port: int, args: argparse.Namespace, root: str, out: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    stagewise.init_distributed()
    results = {}
    for name, async_save in (("sync", False), ("async", True)):
        results[name] = _measure(args, os.path.join(root, name), async_save)
        dist.barrier()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=3584, help="features of each Linear")
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--plain", type=int, default=5, help="plain steps timed per mode")
    parser.add_argument("--rounds", type=int, default=3, help="saving steps timed per mode")
    parser.add_argument("--after", type=int, default=3, help="steps timed during an async write")
    parser.add_argument("--dir", help="where to save (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = args.dir or tempfile.mkdtemp(prefix="stagewise-stall-")
    print(f"load average before: {os.getloadavg()}")
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(_free_port(), args, root, out), nprocs=2, start_method="spawn"
    )
    results = out.get()
    print(f"load average after:  {os.getloadavg()}")
    sync, asyn = results["sync"], results["async"]
    print(
        f"model: {sync['params'] / 1e6:.1f}M parameters on 2 stages; one checkpoint: "
        f"{sync['bytes'] / 1e6:.0f} MB (weights and AdamW moments) in {root}"
    )
    print(f"{'mode':6} {'plain step':>11} {'stall':>9}  stalls of each round")
    for name, r in (("sync", sync), ("async", asyn)):
        rounds = ", ".join(f"{s:.3f}" for s in r["stalls"])
        print(f"{name:6} {r['plain']:10.3f}s {r['stall']:8.3f}s  [{rounds}]")
    ratio = asyn["stall"] / sync["stall"] if sync["stall"] > 0 else float("nan")
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"async stall / sync stall = {ratio:.3f} (goal <= {GOAL}: {verdict})")
    print(
        f"async: steps while the files are written take {asyn['during']:.3f}s (plain "
        f"{asyn['plain']:.3f}s); a save is committed {asyn['commit']:.3f}s after it starts"
    )
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
