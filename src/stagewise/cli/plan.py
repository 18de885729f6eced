"""``stagewise plan``: the best pipeline plans for a model, from its costs file.

Usage::

    stagewise plan --costs gpt.json --devices 2 --global-batch 64 --memory 2GiB
    stagewise plan --costs gpt.json --devices 8 --global-batch 512 --memory 40GiB \\
        --speed 50 --bandwidth 25e9 --latency 5e-6 --config-out plan.json --png plan.png

The costs file comes from :func:`stagewise.plan.profile` (``ModelCosts.save``),
measured on one device; ``--speed`` (how many times faster the target device is),
``--bandwidth`` and ``--latency`` plan for others. It prints the best candidates
(step time, bubble, peak memory per stage, throughput; over-budget ones say by how
much), writes the winner's config and ``PipelineModule`` arguments
(``--config-out``), and draws its simulated timeline (``--png``, needs matplotlib).
``--layers MODULE:FUNCTION`` names a function returning the model's layers: the
costs file must then be of that model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stagewise.errors import PlanError
from stagewise.plan import (
    ModelCosts,
    module_arguments,
    parse_bytes,
    plan_config,
    plan_table,
    search,
)
from stagewise.schedule.registry import schedule_names

__all__ = ["build_parser", "plan_main"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser(prog: str = "stagewise plan") -> argparse.ArgumentParser:
    """The argument parser of ``stagewise plan``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--costs", required=True, metavar="FILE", help="the model's costs file (JSON)"
    )
    parser.add_argument("--devices", type=_int, required=True, help="devices in all")
    parser.add_argument("--global-batch", type=_int, required=True, help="rows per training step")
    parser.add_argument(
        "--memory", metavar="SIZE", help="budget per device, e.g. 2GiB (default: none)"
    )
    parser.add_argument(
        "--schedules", help=f"comma-separated subset of {', '.join(schedule_names())}"
    )
    parser.add_argument(
        "--micro-batch-sizes", help="comma-separated sizes (default: every divisor)"
    )
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="never checkpoint activations"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="target device speed / profiled one"
    )
    parser.add_argument("--bandwidth", type=float, help="link bytes/s between devices")
    parser.add_argument("--latency", type=float, help="link seconds per message")
    parser.add_argument(
        "--layers", metavar="MODULE:FUNCTION", help="check the costs are of this model"
    )
    parser.add_argument("--top", type=_int, default=10, help="rows of the table (default 10)")
    parser.add_argument(
        "--config-out", metavar="FILE", help="write the winner's config and module arguments"
    )
    parser.add_argument("--png", metavar="FILE", help="draw the winner's simulated timeline")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def _layers(spec: str) -> Sequence[Any]:
    module, _, name = spec.partition(":")
    if not name:
        raise PlanError(f"--layers needs MODULE:FUNCTION, got {spec!r}")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise PlanError(f"--layers {spec!r}: {error}") from None
    return list(func())


def plan_main(argv: Sequence[str] | None = None) -> int:
    """Run ``stagewise plan``; 0 on success, 2 for inputs that cannot be planned."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        layers = _layers(args.layers) if args.layers else None
        costs = ModelCosts.load(args.costs, layers).scaled(args.speed, args.bandwidth, args.latency)
        result = search(
            costs,
            args.devices,
            args.global_batch,
            memory=parse_bytes(args.memory) if args.memory else None,
            schedules=args.schedules.split(",") if args.schedules else None,
            micro_batch_sizes=[_int(s) for s in args.micro_batch_sizes.split(",")]
            if args.micro_batch_sizes
            else None,
            checkpointing=(False,) if args.no_checkpointing else (False, True),
        )
    except (PlanError, ValueError, argparse.ArgumentTypeError) as error:
        print(f"stagewise plan: {error}", file=sys.stderr)
        return 2
    best = result.best
    winner = {
        "config": plan_config(best, args.global_batch),
        "pipeline_module": module_arguments(best),
    }
    if args.config_out:
        Path(args.config_out).write_text(json.dumps(winner, indent=1) + "\n")
    if args.png:
        from stagewise.schedule.render import render_timeline

        try:
            render_timeline(
                best.estimate.sim.events, args.png, stages=best.candidate.stages,
                title=f"planned: {best.candidate.label}",
            )  # fmt: skip
        except ImportError as error:
            print(f"stagewise plan: {error}", file=sys.stderr)
            return 2
    if args.json:
        print(
            json.dumps({"plans": [p.to_dict() for p in result.plans[: args.top]], "winner": winner})
        )
        return 0
    print(plan_table(result, args.top))
    print(f"\nwinner: {best.candidate.label}")
    print(f"config: {json.dumps(winner['config'])}")
    print(f"PipelineModule(layers=..., loss_fn=..., **{winner['pipeline_module']})")
    if args.config_out:
        print(f"written to {args.config_out}")
    if args.png:
        print(f"timeline drawn to {args.png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main())
