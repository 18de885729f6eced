"""Time stagewise's pure core (topology, partitioning, schedules) beside DeepSpeed's, in one run.

Run from the repository root (DeepSpeed is optional; without it only our side prints):

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/pure_core.py

What it measures:

1. Building a 65,536-rank ``PipeModelDataParallelTopology(64, 32, 32)`` and asking
   every rank's coordinate. DeepSpeed scans its whole mapping per ``get_coord``
   (quadratic: over a minute at this size), so by default it is timed on
   ``--deepspeed-ranks`` ranks (4,096) and ours beside it on the same topology;
   ``--full-deepspeed-topology`` times it at 65,536 too, and
   ``--skip-deepspeed-topology`` leaves it out.
2. ``partition_balanced`` of 2,048 seeded random weights into 128 parts: time and
   heaviest part / lower bound, where the lower bound is
   ``max(max weight, total / parts)`` (no split can beat it).
3. The same for 256 weights into 32 parts, ours beside DeepSpeed's (DeepSpeed's
   dynamic programme is O(n² · parts) in Python, too slow for 2,048).
4. Schedules: 1F1B and ZB-H1 on 256 stages × 2048 micro-batches, generated
   (``schedule_program``: every stage's instructions as arrays), checked
   (``check_program``: every rule, deadlock freedom included) and simulated
   (``simulate`` under the default costs), each phase timed, then the total; the
   goal is under 2 s in all. ``--schedules-only`` runs just this part (a quiet
   machine matters: ``cat /proc/loadavg`` first; CPU seconds are printed beside
   the wall ones). DeepSpeed has no checker or simulator to compare with; the
   previous stagewise, which built one instruction object per instruction, took
   9.1 s for 1F1B and 12.1 s for ZB-H1 on the 2-core development machine (load
   average 0.6), of which generating the objects alone was 5.7 s and 9.0 s.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

from stagewise.partition import part_weights, partition_balanced
from stagewise.schedule import (
    TrainSchedule,
    ZeroBubbleH1Schedule,
    check_program,
    schedule_program,
    simulate,
)
from stagewise.topology import PipeModelDataParallelTopology


def _deepspeed() -> tuple[Any, Any] | None:
    """DeepSpeed's topology and utils modules, or None when it is not installed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.runtime import utils as ds_utils
        from deepspeed.runtime.pipe import topology as ds_topology
    except ImportError:
        return None
    return ds_topology, ds_utils


def _best_of(repeats: int, func: Callable[[], Any]) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``func()``, in seconds."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def _shape(ranks: int) -> tuple[int, int, int]:
    """(num_pp, num_mp, num_dp) with ``num_pp * num_mp * num_dp == ranks`` (a power of 2)."""
    exponent = ranks.bit_length() - 1
    if ranks != 1 << exponent:
        raise SystemExit(f"--deepspeed-ranks must be a power of 2, got {ranks}")
    pp = exponent - 2 * (exponent // 3)
    return 1 << pp, 1 << (exponent // 3), 1 << (exponent // 3)


def _all_coords(cls: Any, shape: tuple[int, int, int]) -> None:
    topo = cls(*shape)
    for rank in range(topo.world_size()):
        topo.get_coord(rank)


def bench_topology(ds: tuple[Any, Any] | None, args: argparse.Namespace) -> None:
    full = (64, 32, 32)
    print("1. topology: build + get_coord of every rank")
    ours_full = _best_of(3, lambda: _all_coords(PipeModelDataParallelTopology, full))
    print(f"   stagewise  65,536 ranks {full}: {ours_full * 1e3:9.1f} ms")
    if ds is None or args.skip_deepspeed_topology:
        print("   deepspeed  skipped" + (" (not installed)" if ds is None else ""))
        return
    ds_cls = ds[0].PipeModelDataParallelTopology
    if args.full_deepspeed_topology:
        theirs = _best_of(1, lambda: _all_coords(ds_cls, full))
        print(f"   deepspeed  65,536 ranks {full}: {theirs * 1e3:9.1f} ms")
        print(f"   ratio deepspeed / stagewise at 65,536 ranks: {theirs / ours_full:,.0f}x")
        return
    shape = _shape(args.deepspeed_ranks)
    ours = _best_of(3, lambda: _all_coords(PipeModelDataParallelTopology, shape))
    theirs = _best_of(1, lambda: _all_coords(ds_cls, shape))
    ranks = args.deepspeed_ranks
    print(f"   stagewise  {ranks:6,} ranks {shape}: {ours * 1e3:9.1f} ms")
    print(f"   deepspeed  {ranks:6,} ranks {shape}: {theirs * 1e3:9.1f} ms")
    print(f"   ratio deepspeed / stagewise at {ranks:,} ranks: {theirs / ours:,.0f}x")
    scaled = theirs * (65536 / ranks) ** 2
    print(
        f"   (deepspeed at 65,536 ranks not run; its get_coord scans, so about "
        f"{scaled:,.0f} s by quadratic scaling; --full-deepspeed-topology runs it)"
    )


def _ratio(weights: list[float], boundaries: list[int], parts: int) -> float:
    """Heaviest part over the lower bound ``max(max weight, total / parts)``."""
    bound = max(max(weights), math.fsum(weights) / parts)
    return max(part_weights(weights, [int(b) for b in boundaries])) / bound


def bench_partition(ds: tuple[Any, Any] | None, seed: int) -> None:
    rng = random.Random(seed)
    n, parts = 2048, 128
    weights = [rng.random() for _ in range(n)]
    result: list[int] = []
    seconds = _best_of(3, lambda: result.extend(partition_balanced(weights, parts)))
    boundaries = result[-(parts + 1) :]
    print(f"2. partition_balanced, {n} random weights into {parts} parts")
    print(
        f"   stagewise  {seconds * 1e3:9.1f} ms   heaviest / lower bound = "
        f"{_ratio(weights, boundaries, parts):.4f}"
    )

    n, parts = 256, 32
    weights = [rng.random() for _ in range(n)]
    ours: list[int] = []
    ours_s = _best_of(3, lambda: ours.extend(partition_balanced(weights, parts)))
    ours = ours[-(parts + 1) :]
    print(f"3. partition_balanced, {n} random weights into {parts} parts")
    print(
        f"   stagewise  {ours_s * 1e3:9.1f} ms   heaviest / lower bound = "
        f"{_ratio(weights, ours, parts):.4f}"
    )
    if ds is None:
        print("   deepspeed  skipped (not installed)")
        return
    theirs: list[int] = []
    theirs_s = _best_of(1, lambda: theirs.extend(ds[1].partition_balanced(weights, parts)))
    print(
        f"   deepspeed  {theirs_s * 1e3:9.1f} ms   heaviest / lower bound = "
        f"{_ratio(weights, theirs, parts):.4f}"
    )
    heavy_ours = max(part_weights(weights, ours))
    heavy_theirs = max(part_weights(weights, [int(b) for b in theirs]))
    print(
        f"   ratio deepspeed / stagewise: time {theirs_s / ours_s:,.0f}x, "
        f"heaviest part {heavy_theirs / heavy_ours:.4f}"
    )


def bench_schedules(stages: int, micro_batches: int) -> None:
    """Generate, check and simulate 1F1B and ZB-H1 on a large pipeline, phase by phase.

    Prints wall seconds (the goal: under 2 s in all) and, in brackets, this
    process's CPU seconds, which a busy machine inflates less.
    """
    print(
        f"4. schedules, {stages} stages × {micro_batches} micro-batches: generate, check, "
        f"simulate; wall s [CPU s] (load average {os.getloadavg()[0]:.2f})"
    )
    for name, cls in (("1f1b", TrainSchedule), ("zb-h1", ZeroBubbleH1Schedule)):
        marks = [(time.perf_counter(), time.process_time())]
        program = schedule_program(cls, micro_batches, stages)
        marks.append((time.perf_counter(), time.process_time()))
        check_program(program)
        marks.append((time.perf_counter(), time.process_time()))
        result = simulate(program, record_events=False)
        marks.append((time.perf_counter(), time.process_time()))
        spans = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks)]
        spans.append((marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]))
        cells = [
            f"{label} {wall:6.3f} [{cpu:5.3f}]"
            for label, (wall, cpu) in zip(
                ("generate", "check", "simulate", "total"), spans, strict=True
            )
        ]
        instructions = sum(len(stage) for stage in program.stages)
        print(
            f"   {name:<6} {'  '.join(cells)}   ({instructions:,} instructions, bubble "
            f"{result.bubble_fraction:.4f})"
        )
        del program, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--skip-deepspeed-topology",
        action="store_true",
        help="do not time DeepSpeed's topology at all",
    )
    parser.add_argument(
        "--full-deepspeed-topology",
        action="store_true",
        help="time DeepSpeed's topology at 65,536 ranks (over a minute)",
    )
    parser.add_argument(
        "--deepspeed-ranks",
        type=int,
        default=4096,
        help="ranks of the smaller topology DeepSpeed is timed on (a power of 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--schedules-only", action="store_true", help="time only the schedules (part 4)"
    )
    parser.add_argument("--stages", type=int, default=256, help="pipeline stages of part 4")
    parser.add_argument("--micro-batches", type=int, default=2048, help="micro-batches of part 4")
    args = parser.parse_args()
    if not args.schedules_only:
        ds = _deepspeed()
        bench_topology(ds, args)
        bench_partition(ds, args.seed)
    bench_schedules(args.stages, args.micro_batches)


if __name__ == "__main__":
    main()
