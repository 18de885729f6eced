"""``stagewise demo``: train a character-level GPT over pipeline stages on CPU.

The demo spawns its own processes (no torchrun, no GPU, no download): by
default 2 pipeline stages, one thread each, over gloo on loopback. It trains
the GPT of :mod:`stagewise.models.gpt` on the text that ships with Python
(:mod:`stagewise.data`), shows a progress bar with the loss, tokens/s and the
measured pipeline bubble, evaluates the validation loss before and after,
prints a generated sample, writes a loss-curve PNG and the timeline PNG of a
real training step, saves a checkpoint, and ends with one summary line::

    demo: validation loss A -> B in N steps, T s

Run it::

    stagewise demo                       # 2 stages, 1F1B
    stagewise demo --stages 4 --schedule zb-h1
    stagewise demo --stages 2 --data-parallel 2
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DemoOptions", "demo_main", "run_demo"]

logger = logging.getLogger(__name__)

_CHUNKS = {"interleaved": (2, "loop"), "zbv": (2, "v")}
_COMPUTE = ("F", "B", "I", "W")


@dataclass(frozen=True)
class DemoOptions:
    """What ``stagewise demo`` runs (the command-line flags)."""

    # Pipeline stages (processes per pipeline).
    stages: int = 2
    # Data-parallel pipelines (total processes = stages x data_parallel).
    data_parallel: int = 1
    # The training schedule: 1f1b, gpipe, interleaved, zb-h1 or zbv.
    schedule: str = "1f1b"
    # Optimizer steps; None takes the tuned default.
    steps: int | None = None
    # Where the pictures and the checkpoint go.
    out_dir: str = "runs/demo"
    # A tiny model and a few steps (for tests).
    tiny: bool = False
    # Show the progress bar.
    progress: bool = True
    # Seconds any rank may wait on another before failing.
    timeout_s: float = 120.0


def _settings(options: DemoOptions) -> tuple[Any, Any]:
    from stagewise.models.gpt import DEMO_CONFIG, DEMO_TRAINING

    config, training = DEMO_CONFIG, DEMO_TRAINING
    if options.tiny:
        config = replace(config, n_layer=max(2, options.stages), n_embd=32, n_head=2, block_size=32)
        training = replace(training, micro_batch_size=4, micro_batches=2, steps=4, val_batches=2)
    if options.steps is not None:
        training = replace(training, steps=options.steps)
    if config.n_layer + 3 < options.stages * _CHUNKS.get(options.schedule, (1, ""))[0]:
        config = replace(config, n_layer=options.stages * 2)
    return config, training


def _busy_seconds(events: list[Any]) -> float:
    return sum(e.end - e.start for e in events if e.name[:1] in _COMPUTE and e.name[1:2].isdigit())


def _worker(rank: int, world_size: int, port: int, options: DemoOptions, results: Any) -> None:
    """One rank: join the group, train, send ``(rank, summary, error)`` down ``results``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        summary = _train(rank, options)
        results.send((rank, summary, ""))
    except BaseException as exc:  # reported by the parent, which exits non-zero
        import traceback

        results.send((rank, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        results.close()
        os._exit(0)


def _train(rank: int, options: DemoOptions) -> dict[str, Any] | None:
    import stagewise
    from stagewise.data import load_corpus
    from stagewise.models.gpt import generate, gpt_layer_specs, gpt_loss
    from stagewise.models.reference import build_reference

    config, training = _settings(options)
    corpus = load_corpus()
    config = replace(config, vocab_size=corpus.vocab_size)
    chunks, placement = _CHUNKS.get(options.schedule, (1, "loop"))
    specs = gpt_layer_specs(config)
    model = stagewise.PipelineModule(
        layers=specs,
        num_stages=options.stages,
        loss_fn=gpt_loss,
        seed_layers=True,
        partition_method="parameters",
        virtual_stages=chunks,
        placement=placement,
    )
    engine, _, _, _ = stagewise.initialize(
        model=model,
        config={
            "train_micro_batch_size_per_gpu": training.micro_batch_size,
            "gradient_accumulation_steps": training.micro_batches,
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": training.lr,
                    "betas": list(training.betas),
                    "weight_decay": training.weight_decay,
                },
            },
            "gradient_clipping": training.gradient_clipping,
            "steps_per_print": 10**9,
            "pipeline": {
                "schedule": options.schedule,
                "timeout_s": options.timeout_s,
                "record_timeline": True,
            },
        },
    )
    grid = engine.grid
    dp_rank, dp_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()
    seq = config.block_size
    train_iter = corpus.train_batches(
        training.micro_batch_size, seq, seed=training.data_seed, rank=dp_rank, world_size=dp_size
    )
    val = corpus.val_batches(training.micro_batch_size, seq, training.val_batches)

    def val_loss() -> float:
        return float(engine.eval_batch(iter(val), num_micro_batches=len(val)))

    lead = rank == 0
    start_loss = val_loss()
    tokens_per_step = training.micro_batch_size * training.micro_batches * seq * dp_size
    bar: Any = None
    if lead and options.progress:
        import threading

        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # no multiprocessing lock left behind at os._exit
        bar = tqdm(
            total=training.steps,
            desc=f"{options.schedule} x{options.stages} stages",
            unit="step",
            dynamic_ncols=True,
        )
    losses: list[float] = []
    pipe_group = grid.get_pipe_parallel_group()
    t0 = time.perf_counter()
    for _step in range(training.steps):
        step_start = time.perf_counter()
        loss = float(engine.train_batch(train_iter))
        wall = time.perf_counter() - step_start
        busy = torch.tensor([_busy_seconds(engine.timeline or [])], dtype=torch.float64)
        if options.stages > 1:
            dist.all_reduce(busy, group=pipe_group)
        bubble = max(0.0, 1.0 - float(busy) / (options.stages * wall))
        losses.append(loss)
        if bar is not None:
            bar.set_postfix(
                loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / wall:,.0f}", bubble=f"{bubble:.0%}"
            )
            bar.update(1)
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    end_loss = val_loss()

    out = Path(options.out_dir)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.write_timeline(
        png=out / "timeline.png",
        trace=out / "timeline.json",
        title=f"a real {options.schedule} step, {options.stages} stages",
    )
    checkpoint = _save_checkpoint(engine, out / "checkpoints")

    # Gather the weights on rank 0 for a sample from the whole model in one process.
    states: list[Any] | None = [None] * dist.get_world_size() if lead else None
    dist.gather_object(model.state_dict(), states, dst=0)
    if not lead or states is None:
        return None
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for name, value in state.items():
            merged.setdefault(name, value)
    full = build_reference(specs)
    full.load_state_dict(merged)
    prompt = torch.tensor([corpus.tokenizer.encode("The ")], dtype=torch.long)
    sample_ids = generate(
        full,
        prompt,
        max_new_tokens=160,
        temperature=0.8,
        top_k=20,
        block_size=config.block_size,
        generator=torch.Generator().manual_seed(0),
    )
    _plot_losses(losses, start_loss, end_loss, out / "loss.png")
    return {
        "start": start_loss,
        "end": end_loss,
        "steps": training.steps,
        "train_seconds": train_seconds,
        "sample": corpus.tokenizer.decode(sample_ids[0].tolist()),
        "out": str(out),
        "checkpoint": checkpoint,
    }


def _save_checkpoint(engine: Any, path: Path) -> str | None:
    try:
        import stagewise.checkpoint  # noqa: F401
    except ImportError:
        return None
    engine.save_checkpoint(path)
    return str(path)


def _plot_losses(losses: list[float], start: float, end: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, label="training loss (per batch)", color="#4878cf", linewidth=1)
    ax.scatter([0, len(losses)], [start, end], color="#d65f5f", zorder=3, label="validation loss")
    ax.annotate(f"{start:.2f}", (0, start), textcoords="offset points", xytext=(6, 4))
    ax.annotate(f"{end:.2f}", (len(losses), end), textcoords="offset points", xytext=(-30, 8))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title("stagewise demo: GPT trained over pipeline stages")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Spawn the processes, train, and return rank 0's summary.

    Raises:
        RuntimeError: when any rank fails (its error is in the message).
    """
    world_size = options.stages * options.data_parallel
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    readers, procs = [], []
    for rank in range(world_size):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker, args=(rank, world_size, store.port, options, writer), daemon=True
        )
        proc.start()
        writer.close()
        readers.append(reader)
        procs.append(proc)
    summary: dict[str, Any] | None = None
    errors: list[str] = []
    waiting = list(readers)
    while waiting:
        for ready in wait(waiting, timeout=1.0):
            reader = readers[readers.index(ready)]  # type: ignore[arg-type]
            waiting.remove(reader)
            try:
                rank, value, error = reader.recv()
            except EOFError:
                errors.append(f"rank {readers.index(reader)} died without a word")
                continue
            if error:
                errors.append(f"rank {rank}: {error}")
            if rank == 0:
                summary = value
        if errors:
            break
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    if errors or summary is None:
        raise RuntimeError("stagewise demo failed:\n" + "\n".join(errors))
    return summary


def demo_main(argv: list[str] | None = None) -> int:
    """The ``stagewise demo`` command."""
    parser = argparse.ArgumentParser(
        prog="stagewise demo",
        description="Train a character-level GPT over pipeline stages on CPU.",
    )
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument("--data-parallel", type=int, default=1, help="pipelines (default 1)")
    parser.add_argument(
        "--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved", "zb-h1", "zbv"]
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, a few steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.stages < 1 or args.data_parallel < 1:
        parser.error("--stages and --data-parallel must be >= 1")
    if args.stages * args.data_parallel > 8:
        parser.error("the demo runs at most 8 processes on one machine")
    options = DemoOptions(
        stages=args.stages,
        data_parallel=args.data_parallel,
        schedule=args.schedule,
        steps=args.steps,
        out_dir=args.out,
        tiny=args.tiny,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    print(
        f"stagewise demo: {options.stages} stage(s) x {options.data_parallel} pipeline(s), "
        f"schedule {options.schedule}, CPU, one thread per process",
        flush=True,
    )
    summary = run_demo(options)
    seconds = time.perf_counter() - start
    print("\nsample:\n" + summary["sample"].rstrip() + "\n")
    print(f"loss curve: {summary['out']}/loss.png")
    print(
        f"timeline of a real step: {summary['out']}/timeline.png "
        f"(Chrome trace: {summary['out']}/timeline.json)"
    )
    if summary["checkpoint"]:
        print(f"checkpoint: {summary['checkpoint']}")
    if not math.isfinite(summary["end"]):
        print("demo: the loss diverged")
        return 1
    print(
        f"demo: validation loss {summary['start']:.3f} -> {summary['end']:.3f} "
        f"in {summary['steps']} steps, {seconds:.0f} s",
        flush=True,
    )
    return 0
