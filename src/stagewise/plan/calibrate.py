"""What a step costs outside the layers, measured once on this machine (spawned processes).

* :func:`measure_link`: two processes over gloo (loopback here) send tensors of
  several sizes back and forth; half a round trip is fitted as
  ``latency + bytes / bandwidth``.
* :func:`measure_engine`: the real engine (1F1B) on a model whose layers cost
  almost nothing (``Linear(1, 1)`` twice), at two micro-batch counts: in one
  process, the difference per micro-batch, halved, is the engine's work per
  compute pass (a forward, a backward), and what is left at zero micro-batches
  its work per step; on two data-parallel processes, what the step's collectives
  add per step; on two pipeline stages, what one transfer costs through the engine;
* :func:`measure_link` also times a 2-process gradient reduction as the engine runs
  it (flatten, all-reduce, average, copy back), and a small computation (half
  matmuls that fit the caches, half a product streaming 16 MiB of weights)
  alone and while the other process runs it too: on a CPU the "devices" share
  cores' caches and memory bus, and the ratio (``concurrency``) scales the
  profiled pass times of candidates that keep several devices busy;
* :func:`measure_concurrency`: the same ratio for a model's own layers (two
  processes running its forward and backward, alone and at once), which replaces
  the generic one for that model. These are constants fitted on this machine, not per model:
  :class:`~stagewise.plan.costs.EngineCosts` records them with the model's costs.

Both run at one torch thread per process, as the pipeline does here.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

from stagewise.dist_utils import free_port
from stagewise.plan.costs import EngineCosts, Linear

__all__ = ["measure_concurrency", "measure_engine", "measure_link"]

_LINK_SIZES = (8, 1 << 16, 1 << 20, 1 << 22)
_REDUCE_SIZES = (1 << 20, 1 << 24)


def _join(rank: int, world: int, port: int) -> Any:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    return dist


def _link_worker(rank: int, port: int, repeats: int, out: Any) -> None:
    import torch

    dist = _join(rank, 2, port)
    result = []
    for size in _LINK_SIZES:
        buf = torch.zeros(max(1, size // 4))
        times = []
        for index in range(repeats + 2):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if index >= 2:
                times.append((time.perf_counter() - start) / 2)
        result.append(statistics.median(times))
    for size in _REDUCE_SIZES:
        grads = [torch.ones(size // 16) for _ in range(4)]
        times = []
        for index in range(max(3, repeats // 4) + 1):
            dist.barrier()
            start = time.perf_counter()
            # as the engine reduces data-parallel gradients: flatten, all-reduce, average,
            # copy back
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= 2
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            if index:
                times.append(time.perf_counter() - start)
        result.append(statistics.median(times))
    ratios = []
    for _ in range(5):
        dist.barrier()
        both = _busy_loop(repeats)  # both processes computing at once
        dist.barrier()
        if rank == 0:  # rank 0 alone; rank 1 sleeps (a barrier's wait may spin)
            ratios.append(both / _busy_loop(repeats))
        else:
            time.sleep(2.0 * both * repeats / 4)
        dist.barrier()
    result.append(statistics.median(ratios) if rank == 0 else 1.0)
    if rank == 0:
        out.send(result)
    dist.destroy_process_group()


def _busy_loop(repeats: int) -> float:
    """Median seconds of a small training-like computation (matmuls, their gradients)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, generator=gen, requires_grad=True)
    x = torch.randn(64, 512, generator=gen)
    big = torch.randn(2048, 2048, generator=gen, requires_grad=True)  # 16 MiB: past the caches
    rows = torch.randn(8, 2048, generator=gen)
    times = []
    for _ in range(max(1, repeats // 4)):
        start = time.perf_counter()
        for _ in range(4):
            (torch.relu(x @ weight) @ weight).sum().backward()  # bound by arithmetic
            (rows @ big).sum().backward()  # bound by memory bandwidth
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _engine_worker(
    rank: int, world: int, stages: int, port: int, counts: tuple[int, int], steps: int, out: Any
) -> None:
    import torch
    from torch import nn

    import stagewise
    from stagewise.spec import LayerSpec

    dist = _join(rank, world, port)
    times = []
    for count in counts:
        model = stagewise.PipelineModule(
            layers=[LayerSpec(nn.Linear, 1, 1), LayerSpec(nn.Linear, 1, 1)],
            num_stages=stages,
            loss_fn=lambda a, b: ((a - b) ** 2).mean(),
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        engine, _, _, _ = stagewise.initialize(
            model=model,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": count,
                "gradient_clipping": 0.0,
                "steps_per_print": 10**9,
            },
        )
        batch = (torch.ones(1, 1), torch.ones(1, 1))

        def data(batch: Any = batch) -> Any:
            while True:
                yield batch

        it = data()
        for _ in range(3):
            engine.train_batch(it)
        samples = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            engine.train_batch(it)
            samples.append(time.perf_counter() - start)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, samples)  # a step is the slowest rank's
        times.append(
            statistics.median(map(max, *gathered)) if world > 1 else statistics.median(samples)
        )
    if rank == 0:
        out.send(times)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(target: Any, args_of: list[tuple[Any, ...]], timeout_s: float) -> Any:
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=target, args=(*args, writer)) for args in args_of]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not reader.poll(0.2):
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a calibration process failed (exit code {dead[0]})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"calibration did not answer within {timeout_s:.0f} s")
        return reader.recv()
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def measure_link(repeats: int = 20, timeout_s: float = 120.0) -> dict[str, float]:
    """Two processes over gloo on this machine: the link and how they share the cores.

    Returns ``latency`` (s per message), ``bandwidth`` (bytes/s, point to point),
    ``reduce_bandwidth`` (gradient bytes per second of a 2-process data-parallel
    reduction as the engine runs it: flatten, all-reduce, average, copy back) and
    ``concurrency`` (how much slower a computation runs while the other process
    computes too, >= 1).
    """
    port = free_port()
    times = _spawn(_link_worker, [(0, port, repeats), (1, port, repeats)], timeout_s)
    count = len(_LINK_SIZES)
    line = Linear.fit(list(_LINK_SIZES), times[:count])
    reduce = Linear.fit(list(_REDUCE_SIZES), times[count : count + len(_REDUCE_SIZES)])
    return {
        "latency": max(0.0, line.intercept),
        "bandwidth": 1.0 / line.slope if line.slope > 0 else 1e12,
        "reduce_bandwidth": 1.0 / reduce.slope if reduce.slope > 0 else 1e12,
        "concurrency": max(1.0, times[-1]),
    }


def _engine_line(
    world: int, stages: int, counts: tuple[int, int], steps: int, timeout_s: float
) -> tuple[float, float]:
    """``(seconds per micro-batch, seconds per step at none)`` of the tiny model's steps."""
    port = free_port()
    args = [(rank, world, stages, port, counts, steps) for rank in range(world)]
    t_low, t_high = _spawn(_engine_worker, args, timeout_s)
    low, high = counts
    per_micro_batch = max(0.0, (t_high - t_low) / (high - low))
    return per_micro_batch, max(0.0, t_low - low * per_micro_batch)


def measure_engine(
    counts: tuple[int, int] = (4, 32),
    steps: int = 15,
    link: dict[str, float] | None = None,
    timeout_s: float = 180.0,
) -> EngineCosts:
    """The engine's own costs (see the module doc), and the link's.

    Three runs of the tiny model, each at two micro-batch counts: one process (the
    work per pass and per step), two data-parallel processes (what a step's
    collectives add: ``per_step_data_parallel``), and two pipeline stages under 1F1B,
    where a micro-batch's critical path is one round trip between the stages: half
    its extra time per micro-batch is what one transfer costs through the engine
    (``latency``, in place of the bare link's).
    """
    one_mb, one_step = _engine_line(1, 1, counts, steps, timeout_s)
    _, dp_step = _engine_line(2, 1, counts, steps, timeout_s)
    pp_mb, _ = _engine_line(2, 2, counts, steps, timeout_s)
    costs = dict(link or measure_link())
    costs["latency"] = max(costs["latency"], (pp_mb - one_mb) / 2)
    return EngineCosts(
        per_pass=one_mb / 2,
        per_step=one_step,
        per_step_data_parallel=max(0.0, dp_step - one_step),
        **costs,
    )


def _concurrency_worker(
    rank: int, layers: Any, batch: Any, loss_fn: Any, repeats: int, barrier: Any, out: Any
) -> None:
    import torch

    from stagewise.models.reference import build_reference

    torch.set_num_threads(1)
    model = build_reference(layers, base_seed=1234, seed_layers=True)
    inputs, labels = batch

    def step() -> float:
        start = time.perf_counter()
        output = model(inputs)
        loss = loss_fn(output, labels) if loss_fn is not None else output.float().sum()
        loss.backward()
        return time.perf_counter() - start

    for _ in range(3):
        step()
    alone: list[float] = []
    both: list[float] = []
    for _ in range(3):
        barrier.wait()
        if rank == 0:  # alone: the other process waits on the barrier (a blocking wait)
            alone += [step() for _ in range(repeats)]
        barrier.wait()
        both += [step() for _ in range(repeats)]
        barrier.wait()
    if rank == 0:
        out.send(statistics.median(both) / statistics.median(alone))


def measure_concurrency(
    layers: Any,
    sample_input: Any,
    sample_labels: Any = None,
    loss_fn: Any = None,
    repeats: int = 5,
    timeout_s: float = 300.0,
) -> float:
    """How much slower this model's forward and backward run while another process runs
    them too (>= 1): two processes, each the whole model on one micro-batch, alone and
    at once, three times in turn.

    On a CPU the "devices" share caches, memory bandwidth and whatever else the host
    shares; the ratio scales the profiled pass times of candidates that keep both
    devices busy (``EngineCosts.concurrency``). ``layers``, the tensors and
    ``loss_fn`` must pickle (they are sent to the spawned processes).
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    batch = (sample_input, sample_labels)
    ratio = _spawn(
        _concurrency_worker,
        [(rank, layers, batch, loss_fn, repeats, barrier) for rank in (0, 1)],
        timeout_s,
    )
    return max(1.0, float(ratio))
