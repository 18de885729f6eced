"""``stagewise simulate``: a schedule's timeline under a cost model, without processes.

Usage::

    stagewise simulate --schedule zbv --stages 4 --micro-batches 8
    stagewise simulate --schedule interleaved --virtual-stages 2 --stages 4 \\
        --micro-batches 8 --png interleaved.png
    stagewise simulate --schedule 1f1b --stages 8 --micro-batches 32 --json

It prints the makespan, the bubble fraction and each stage's peak activations (a
table, or one JSON object with ``--json``), and on request draws the timeline as a
PNG (``--png``, needs matplotlib) or writes it as a Chrome trace (``--trace``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from stagewise.schedule.build import schedule_program
from stagewise.schedule.check import ScheduleError, check_program
from stagewise.schedule.registry import schedule_factory, schedule_names
from stagewise.schedule.simulate import Costs, SimResult, simulate

__all__ = ["build_parser", "simulate_main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    # whole numbers stay integers, so the default costs give exact fractions
    return int(value) if value.is_integer() else value


def _cost(text: str) -> float | tuple[float, ...]:
    """A number, or comma-separated numbers (one per virtual stage, or per boundary)."""
    if "," in text:
        return tuple(_number(part) for part in text.split(","))
    return _number(text)


def build_parser(prog: str = "stagewise simulate") -> argparse.ArgumentParser:
    """The argument parser of ``stagewise simulate``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Simulate one batch of a pipeline schedule on every stage: makespan, bubble "
            "fraction and peak activations per stage, and optionally the timeline."
        ),
    )
    parser.add_argument(
        "--schedule",
        default="1f1b",
        metavar="NAME",
        help=f"the schedule: {', '.join(schedule_names())} (default: 1f1b)",
    )
    parser.add_argument("--stages", type=_positive_int, required=True, help="pipeline stages")
    parser.add_argument(
        "--micro-batches", type=_positive_int, required=True, help="micro-batches per batch"
    )
    parser.add_argument(
        "--virtual-stages",
        type=_positive_int,
        default=None,
        help="model chunks per stage for 'interleaved' (default 2)",
    )
    costs = parser.add_argument_group(
        "cost model",
        "times for one micro-batch through one stage's share of the model; a "
        "comma-separated list gives one per virtual stage (for --cost-send: one per "
        "boundary between virtual stages)",
    )
    costs.add_argument("--cost-forward", type=_cost, default=1, help="a forward (default 1)")
    costs.add_argument(
        "--cost-backward-input",
        type=_cost,
        default=1,
        help="the input-gradient half of a backward (default 1)",
    )
    costs.add_argument(
        "--cost-backward-weight",
        type=_cost,
        default=1,
        help="the weight-gradient half of a backward (default 1)",
    )
    costs.add_argument(
        "--cost-send", type=_cost, default=0, help="one transfer between stages (default 0)"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead")
    out.add_argument("--png", metavar="FILE", help="draw the timeline to FILE (needs matplotlib)")
    out.add_argument("--trace", metavar="FILE", help="write the timeline as Chrome trace JSON")
    out.add_argument(
        "--check",
        action="store_true",
        help="also check the schedule (send/receive matching, deadlock freedom, order)",
    )
    return parser


def _table(result: SimResult, header: str) -> str:
    """The human-readable report."""
    lines = [
        header,
        f"makespan          {_show(result.makespan)}",
        f"bubble fraction   {result.bubble_fraction:.4f} ({100 * result.bubble_fraction:.1f}%)",
        "",
        "stage  busy      idle      peak activations",
    ]
    for stage in range(result.stages):
        busy = result.busy[stage]
        peak = result.peak_activations[stage]
        if result.chunks > 1:
            memory = f"{peak} chunk(s) = {_show(result.peak_memory[stage])} stage(s)"
        else:
            memory = str(peak)
        lines.append(f"{stage:<6} {_show(busy):<9} {_show(result.makespan - busy):<9} {memory}")
    return "\n".join(lines)


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def simulate_main(argv: Sequence[str] | None = None) -> int:
    """Run ``stagewise simulate`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 2 for arguments the schedule rejects.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        factory = schedule_factory(args.schedule, args.virtual_stages)
        costs = Costs(
            forward=args.cost_forward,
            backward_input=args.cost_backward_input,
            backward_weight=args.cost_backward_weight,
            send=args.cost_send,
        )
        program = schedule_program(factory, args.micro_batches, args.stages)
        if args.check:
            check_program(program)
        result = simulate(program, costs)
    except ScheduleError as error:
        print(f"stagewise simulate: the schedule is broken: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        print(f"stagewise simulate: {error}", file=sys.stderr)
        return 2

    name = args.schedule.strip().lower()
    chunks = program.chunks
    title = f"{name}: {args.stages} stage(s), {args.micro_batches} micro-batch(es)"
    if chunks > 1:
        title += f", {chunks} chunks per stage"
    if args.png:
        from stagewise.schedule.render import render_timeline

        try:
            render_timeline(result.events, args.png, stages=args.stages, title=title)
        except ImportError as error:
            print(f"stagewise simulate: {error}", file=sys.stderr)
            return 2
    if args.trace:
        from stagewise.schedule.render import write_chrome_trace

        # one cost unit shows as one millisecond
        write_chrome_trace(result.events, args.trace, unit_us=1000)

    if args.json:
        report: dict[str, Any] = {
            "schedule": name,
            "stages": args.stages,
            "micro_batches": args.micro_batches,
            "chunks": chunks,
            **result.to_dict(),
        }
        print(json.dumps(report))
    else:
        print(_table(result, title))
        if args.png:
            print(f"\ntimeline drawn to {args.png}")
        if args.trace:
            print(f"Chrome trace written to {args.trace}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(simulate_main())
