"""Time stagewise's pipeline schedules beside DeepSpeed's engine and torch's, in one run.

Run from the repository root (DeepSpeed is optional; without it that row is skipped):

    .venv/bin/python benchmarks/peers.py              # the MLP: 7 rounds of 8 timed steps
    .venv/bin/python benchmarks/peers.py --workloads gpt,gpt-bf16-ckpt
    .venv/bin/python benchmarks/peers.py --workloads all --quick   # a smoke test of each
    .venv/bin/python benchmarks/peers.py --timeline-dir /tmp/tl   # + stagewise timelines

The workloads (``benchmarks/workloads.py``): ``mlp`` (8 ``Linear(1024, 1024)``
with ReLU between, MSE, 8 micro-batches of 16 rows) and ``gpt`` (4 attention
blocks of width 256, tied embedding, T=64, 8 micro-batches of 4), the GPT also
as ``gpt-bf16`` (bf16 autocast), ``gpt-ckpt`` (activation checkpointing) and
``gpt-bf16-ckpt``; SGD, 2 stages, one thread per process, gloo on the CPU, run by

1. DeepSpeed's pipeline engine (``deepspeed.pipe.PipelineModule`` +
   ``deepspeed.initialize``, ``gradient_clipping`` 0; not under bf16 autocast,
   which DeepSpeed's engine does not offer: its ``bf16`` casts the model),
2. ``torch.distributed.pipelining``: ``Schedule1F1B``, ``ScheduleInterleaved1F1B``
   (2 stages per rank) and ``ScheduleZBVZeroBubble`` (2 stages per rank in a V),
3. every stagewise schedule (``stagewise.schedule.registry.schedule_names()``),
4. one process without a pipeline (the same layers, gradient accumulation).

This script spawns ONE ``torchrun`` job of 2 processes that builds every
contender once and then runs them in turn for ``--rounds`` rounds (start-up and
the first steps are never timed). Each round gives a contender the median of
its ``--steps`` step times; the table shows the median over rounds, the ratio to
DeepSpeed and to the best torch schedule, and the pipeline efficiency
``one-process time / (stages * step time)`` (1.0 = a perfect 2x speed-up).

The machine's load average is printed before and after: on a busy machine
the numbers are noise; compare ratios from one run, never across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER = Path(__file__).resolve().parent / "peers_worker.py"
STAGES = 2
# (vs DeepSpeed, vs the best torch schedule, efficiency) goals of the best stagewise schedule
GOALS: dict[str, tuple[float | None, float | None, float | None]] = {
    "mlp": (0.75, 0.90, 0.85),
    "gpt": (0.80, 0.90, None),
    "gpt-bf16": (None, 0.90, None),
    "gpt-ckpt": (None, 0.90, None),
    "gpt-bf16-ckpt": (None, 0.90, None),
}
# (contender, its reference, goal): contender's time over the reference's
PAIR_GOALS: dict[str, list[tuple[str, str, float]]] = {
    "gpt-bf16-ckpt": [("stagewise-zb-h1", "stagewise-1f1b", 0.92)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time stagewise beside DeepSpeed and torch.distributed.pipelining."
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all contenders")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round's")
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 4 steps (1 warm-up): a smoke test"
    )
    parser.add_argument(
        "--contenders",
        help="comma-separated subset, e.g. single,deepspeed,torch-zbv,stagewise-zbv (default: all)",
    )
    parser.add_argument(
        "--timeline-dir", help="also write each stagewise schedule's real timeline (PNG + JSON)"
    )
    parser.add_argument("--json", help="also save the raw per-round results here")
    parser.add_argument(
        "--workloads",
        default="mlp",
        help=f"comma-separated, or 'all' ({', '.join(GOALS)}); default: mlp",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 4, 1
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    args.workloads = list(GOALS) if args.workloads == "all" else args.workloads.split(",")
    unknown = sorted(set(args.workloads) - set(GOALS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(GOALS)}")
    return args


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unavailable"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min; {os.cpu_count()} CPUs)"


def run_worker(
    args: argparse.Namespace, workload: str, out: Path, with_deepspeed: bool
) -> dict[str, Any]:
    """Run the torchrun job of one workload; return the worker's JSON."""
    from peers_worker import all_contenders

    names = args.contenders.split(",") if args.contenders else list(all_contenders())
    if not with_deepspeed:
        names = [n for n in names if n != "deepspeed"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(STAGES),
        str(WORKER),
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--contenders",
        ",".join(names),
        "--workload",
        workload,
        "--out",
        str(out),
    ]
    if args.timeline_dir:
        command += ["--timeline-dir", str(Path(args.timeline_dir).resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise SystemExit(f"the benchmark job failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _summary(values: dict[str, float]) -> dict[str, float | None]:
    """References out of per-contender times: DeepSpeed, the best torch schedule, one process."""
    torch_times = [t for n, t in values.items() if n.startswith("torch-")]
    return {
        "deepspeed": values.get("deepspeed"),
        "torch": min(torch_times) if torch_times else None,
        "single": values.get("single"),
    }


def goal_lines(values: dict[str, float], label: str, workload: str) -> list[str]:
    """Whether the best stagewise schedule meets the workload's goals, on one estimator."""
    ours = {n: t for n, t in values.items() if n.startswith("stagewise-")}
    if not ours:
        return [f"{label}: no stagewise schedule measured"]
    ref = _summary(values)
    best_name = min(ours, key=ours.__getitem__)
    best = ours[best_name]
    lines = [f"{label}: best stagewise schedule {best_name} ({best * 1e3:.1f} ms)"]
    deepspeed, torch_best, single = ref["deepspeed"], ref["torch"], ref["single"]
    vs_ds, vs_torch, efficiency = GOALS[workload]
    goals: list[tuple[str, float | None, float | None, str]] = [
        ("vs DeepSpeed", best / deepspeed if deepspeed else None, vs_ds, "<="),
        ("vs best torch", best / torch_best if torch_best else None, vs_torch, "<="),
        ("efficiency", single / (STAGES * best) if single else None, efficiency, ">="),
    ]
    for name, reference, goal in PAIR_GOALS.get(workload, []):
        if name in values and reference in values:
            goals.append((f"{name} / {reference}", values[name] / values[reference], goal, "<="))
    for name, value, goal, sense in goals:
        if value is None:
            lines.append(f"  {name:<14} not measured (its reference did not run)")
            continue
        if goal is None:
            lines.append(f"  {name:<14} {value:5.2f}")
            continue
        met = value <= goal if sense == "<=" else value >= goal
        lines.append(
            f"  {name:<14} {value:5.2f}  (goal {sense} {goal:.2f}): {'met' if met else 'MISSED'}"
        )
    return lines


def report(results: dict[str, list[float]], workload: str) -> list[str]:
    """The table and the goals, as lines (times in seconds per step, one per round)."""
    rounds = {name: values for name, values in results.items() if values}
    median = {name: statistics.median(values) for name, values in rounds.items()}
    best = {name: min(values) for name, values in rounds.items()}
    ref = _summary(median)
    header = (
        f"{'contender':<22} {'median ms':>9} {'best round':>10} {'/deepspeed':>10} "
        f"{'/best torch':>11} {'efficiency':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, t in median.items():
        if name == "single":
            eff = "(1 proc)"
        elif name == "single-x2" and ref["single"]:
            eff = f"ceil {ref['single'] / t:.2f}"
        else:
            eff = f"{ref['single'] / (STAGES * t):.2f}" if ref["single"] else "-"
        vs_ds = t / ref["deepspeed"] if ref["deepspeed"] else None
        vs_torch = t / ref["torch"] if ref["torch"] else None
        lines.append(
            f"{name:<22} {t * 1e3:9.1f} {best[name] * 1e3:10.1f} {_fmt_ratio(vs_ds):>10} "
            f"{_fmt_ratio(vs_torch):>11} {eff:>10}"
        )
    lines += [
        "",
        "efficiency = single / (2 x step); 'ceil' = single / single-x2, the most 2 processes",
        "can get from this machine now. Ratios use the medians over rounds.",
        "",
        *goal_lines(median, "goals on medians over rounds", workload),
        *goal_lines(
            best, "goals on each contender's best round (less sensitive to load)", workload
        ),
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(WORKER.parent))
    with_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if not with_deepspeed:
        print("DeepSpeed is not installed: its row is skipped (pip install deepspeed==0.19.8)")
    for workload in args.workloads:
        before = load_average()
        print(f"\n== {workload} ==\nload average before: {before}")
        print(
            f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up) per "
            "contender",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            data = run_worker(args, workload, Path(tmp) / "peers.json", with_deepspeed)
        after = load_average()
        if args.json:
            path = Path(args.json)
            path = path.with_name(f"{path.stem}-{workload}{path.suffix}")
            record = {**data, "load_before": before, "load_after": after}
            path.write_text(json.dumps(record))
        print(data["meta"]["describe"])
        print()
        print("\n".join(report(data["results"], workload)))
        print()
        print(f"load average after:  {after}")
        print(f"torch {data['meta']['torch']}, {data['meta']['threads']} thread per process")
    if args.timeline_dir:
        print(f"stagewise timelines written to {args.timeline_dir}")


if __name__ == "__main__":
    main()
