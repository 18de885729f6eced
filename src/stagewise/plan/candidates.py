"""The candidates a plan chooses from: stages, data parallelism, micro-batches, schedule,
checkpointing.

:func:`enumerate_candidates` lists every :class:`Candidate` that can run: the
stages divide the devices (the rest is data parallelism), the micro-batch size
divides each replica's share of the global batch, the schedule's virtual stages
(``stages × chunks``) are no more than the layers, and the schedule builds for
that many micro-batches (``dualpipev`` needs ``2 × stages``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stagewise.errors import PlanError
from stagewise.schedule.build import schedule_program
from stagewise.schedule.check import check_program
from stagewise.schedule.program import Program
from stagewise.schedule.registry import schedule_factory, schedule_layout, schedule_names

__all__ = ["Candidate", "checked_program", "divisors", "enumerate_candidates", "layout_name"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One way to run a training step.

    Attributes:
        stages: pipeline stages.
        data_parallel: pipelines side by side (``stages × data_parallel`` devices).
        schedule: the schedule's name (:data:`~stagewise.schedule.registry.SCHEDULES`).
        chunks: model chunks per stage.
        placement: ``"loop"`` or ``"v"``.
        micro_batch_size: rows per micro-batch.
        micro_batches: micro-batches per step on each pipeline.
        checkpointing: activation checkpointing (each chunk keeps only its input).
    """

    stages: int
    data_parallel: int
    schedule: str
    chunks: int
    placement: str
    micro_batch_size: int
    micro_batches: int
    checkpointing: bool

    @property
    def virtual_stages(self) -> int:
        return self.stages * self.chunks

    @property
    def label(self) -> str:
        ckpt = " ckpt" if self.checkpointing else ""
        return (
            f"{self.schedule} S={self.stages} dp={self.data_parallel} "
            f"{self.micro_batches}x{self.micro_batch_size}{ckpt}"
        )


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` >= 1, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.lru_cache(maxsize=256)
def checked_program(schedule: str, micro_batches: int, stages: int) -> Program:
    """The schedule's program for these sizes, built and checked once (cached).

    Raises:
        ValueError: the schedule does not build for these sizes.
        ScheduleError: the checker found the program broken.
    """
    program = schedule_program(schedule_factory(schedule), micro_batches, stages)
    check_program(program)
    return program


def _builds(schedule: str, micro_batches: int, stages: int) -> str | None:
    """None when the schedule builds for these sizes, else why not."""
    try:
        checked_program(layout_name(schedule), micro_batches, stages)
    except ValueError as error:
        return str(error)
    return None


def enumerate_candidates(
    num_layers: int,
    devices: int,
    global_batch: int,
    *,
    schedules: Sequence[str] | None = None,
    micro_batch_sizes: Iterable[int] | None = None,
    checkpointing: Sequence[bool] = (False, True),
    stages: Iterable[int] | None = None,
) -> list[Candidate]:
    """Every candidate that can run (see the module doc).

    Args:
        num_layers: the model's layers.
        devices: devices in all (>= 1).
        global_batch: rows per training step over all replicas.
        schedules: schedule names to consider (default: every one shipped).
        micro_batch_sizes: sizes to consider (default: every divisor of a replica's rows).
        checkpointing: the settings of activation checkpointing to consider.
        stages: stage counts to consider (default: every divisor of ``devices``).

    Raises:
        PlanError: ``devices`` or ``global_batch`` below 1, or nothing can run (the
            message says why and what to change).
    """
    if not isinstance(devices, int) or devices < 1:
        raise PlanError(
            f"devices must be an integer >= 1, got {devices!r}: give the number of devices "
            "(GPUs, or processes on a CPU) the step runs on"
        )
    if not isinstance(global_batch, int) or global_batch < 1:
        raise PlanError(
            f"the global batch must be an integer >= 1 (rows per step), got {global_batch!r}"
        )
    names = list(schedules) if schedules is not None else schedule_names()
    stage_counts = sorted(set(stages)) if stages is not None else divisors(devices)
    sizes = sorted(set(micro_batch_sizes)) if micro_batch_sizes is not None else None
    out: list[Candidate] = []
    reasons: list[str] = []
    for count in stage_counts:
        if devices % count:
            reasons.append(f"{count} stages do not divide {devices} devices")
            continue
        if count > num_layers:
            reasons.append(f"{count} stages are more than the model's {num_layers} layers")
            continue
        dp = devices // count
        if global_batch % dp:
            reasons.append(f"a global batch of {global_batch} does not split over {dp} replicas")
            continue
        rows = global_batch // dp
        for size in divisors(rows) if sizes is None else [s for s in sizes if rows % s == 0]:
            micro = rows // size
            for name in names:
                layout = schedule_layout(name, None, count)
                if count * layout.chunks > num_layers:
                    reasons.append(f"{name} on {count} stages needs {count * layout.chunks} layers")
                    continue
                why = _builds(name, micro, count)
                if why is not None:
                    reasons.append(f"{name}, {count} stages, {micro} micro-batches: {why}")
                    continue
                for ckpt in checkpointing:
                    out.append(
                        Candidate(
                            count,
                            dp,
                            layout_name(name),
                            layout.chunks,
                            layout.kind.value,
                            size,
                            micro,
                            bool(ckpt),
                        )
                    )
    if not out:
        shown = "; ".join(dict.fromkeys(reasons)) or "no sizes given"
        raise PlanError(
            f"no candidate can run on {devices} device(s) with a global batch of "
            f"{global_batch}: {shown}. Change the devices, the global batch or the "
            "micro-batch sizes"
        )
    for reason in dict.fromkeys(reasons):
        logger.debug("skipped: %s", reason)
    return out


def layout_name(name: str) -> str:
    """A schedule name in its canonical form (lower case, ``-``)."""
    return name.strip().lower().replace("_", "-")
