"""What a plan prints and writes: the table, the winner's config and module arguments."""

from __future__ import annotations

from typing import Any

from stagewise.plan.search import MIB, Plan, SearchResult

__all__ = ["module_arguments", "plan_config", "plan_table"]


def plan_table(result: SearchResult, top: int = 10) -> str:
    """The ``top`` best plans that fit, then the over-budget ones closest to fitting."""
    head = (
        f"{'#':>3}  {'schedule':<10} {'S':>2} {'dp':>2} {'micro':>9} {'ckpt':<4} "
        f"{'step ms':>9} {'bubble':>7} {'peak MiB/stage':<22} {'samples/s':>10}  note"
    )
    lines = [head, "-" * len(head)]
    fitting = result.fitting[:top]
    over = sorted((p for p in result.plans if not p.fits), key=lambda p: p.over_by)[
        : max(3, top // 3)
    ]
    for rank, plan in enumerate([*fitting, *over], start=1):
        c, e = plan.candidate, plan.estimate
        peaks = "/".join(f"{m / MIB:.1f}" for m in e.peak_memory)
        note = "" if plan.fits else f"over by {plan.over_by / MIB:.1f} MiB"
        lines.append(
            f"{rank if plan.fits else '-':>3}  {c.schedule:<10} {c.stages:>2} {c.data_parallel:>2} "
            f"{f'{c.micro_batches}x{c.micro_batch_size}':>9} {'yes' if c.checkpointing else 'no':<4} "
            f"{e.step_time * 1e3:>9.2f} {e.bubble:>7.3f} {peaks:<22} "
            f"{e.samples_per_second:>10.1f}  {note}"
        )
    total = len(result.plans)
    lines.append(
        f"{total} candidates, {len(result.fitting)} fit"
        + (
            ""
            if result.budget is None
            else f" the budget of {result.budget / MIB:.1f} MiB per device"
        )
    )
    return "\n".join(lines)


def _checkpoint_interval(plan: Plan) -> int:
    """Layers per checkpointed segment: a whole chunk (its input is all it keeps)."""
    if not plan.candidate.checkpointing:
        return 0
    b = plan.estimate.boundaries
    return max(b[i + 1] - b[i] for i in range(len(b) - 1))


def plan_config(plan: Plan, global_batch: int) -> dict[str, Any]:
    """The winner as a stagewise (DeepSpeed-style) config."""
    c = plan.candidate
    pipeline: dict[str, Any] = {"schedule": c.schedule}
    if c.chunks > 1:
        pipeline["virtual_stages"] = c.chunks
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": c.micro_batch_size,
        "gradient_accumulation_steps": c.micro_batches,
        "pipeline": pipeline,
    }


def module_arguments(plan: Plan) -> dict[str, Any]:
    """``PipelineModule(layers=..., loss_fn=..., **module_arguments(plan))``."""
    c = plan.candidate
    return {
        "num_stages": c.stages,
        "partition_method": list(plan.estimate.boundaries),
        "activation_checkpoint_interval": _checkpoint_interval(plan),
        "virtual_stages": c.chunks,
        "placement": c.placement,
    }
