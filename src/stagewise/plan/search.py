"""The planner's search: every candidate estimated, ranked by step time under a memory budget.

>>> from stagewise.plan.costs import LayerCosts, Linear, ModelCosts
>>> layer = LayerCosts("Linear", "0", Linear(0, 1e-3), Linear(0, 1e-3), Linear(0, 1e-3),
...                    Linear(0, 4096), Linear(0, 4096), param_bytes=4 << 20)
>>> costs = ModelCosts((layer,) * 8, input_bytes=Linear(0, 4096))
>>> best = search(costs, devices=2, global_batch=64, schedules=["1f1b"]).best
>>> best.candidate.stages
2
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stagewise.errors import PlanError
from stagewise.plan.candidates import Candidate, enumerate_candidates
from stagewise.plan.costs import ModelCosts
from stagewise.plan.estimate import Estimate, estimate

__all__ = ["MIB", "Plan", "SearchResult", "parse_bytes", "search"]

logger = logging.getLogger(__name__)

MIB = float(1 << 20)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "tb": 1e12}  # fmt: skip


def parse_bytes(text: str) -> float:
    """``"2GiB"``, ``"512MiB"``, ``"1.5e9"``... as bytes.

    Raises:
        PlanError: not a size (the message shows the forms accepted).
    """
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _UNITS or not amount > 0:
        raise PlanError(f"not a memory size: {text!r}; write e.g. 2GiB, 512MiB or 4e9 (bytes)")
    return amount * _UNITS[unit]


@dataclass(frozen=True)
class Plan:
    """A candidate with its estimate, and whether it fits the budget.

    Attributes:
        candidate: what runs.
        estimate: its simulated step time, bubble, memory, partition.
        budget: the memory budget per device (bytes; None: unlimited).
    """

    candidate: Candidate
    estimate: Estimate
    budget: float | None = None

    @property
    def peak(self) -> float:
        """The heaviest stage's peak memory (bytes)."""
        return max(self.estimate.peak_memory)

    @property
    def over_by(self) -> float:
        """Bytes the heaviest stage is over the budget (0 when it fits)."""
        return 0.0 if self.budget is None else max(0.0, self.peak - self.budget)

    @property
    def fits(self) -> bool:
        return self.over_by == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        c, e = self.candidate, self.estimate
        return {
            "schedule": c.schedule,
            "stages": c.stages,
            "data_parallel": c.data_parallel,
            "virtual_stages": c.chunks,
            "placement": c.placement,
            "micro_batch_size": c.micro_batch_size,
            "micro_batches": c.micro_batches,
            "checkpointing": c.checkpointing,
            "step_time_s": e.step_time,
            "makespan_s": e.makespan,
            "bubble": e.bubble,
            "peak_memory_bytes": list(e.peak_memory),
            "samples_per_second": e.samples_per_second,
            "boundaries": list(e.boundaries),
            "fits": self.fits,
            "over_by_bytes": self.over_by,
        }


@dataclass(frozen=True)
class SearchResult:
    """Every candidate estimated: ``plans`` ranked (those that fit first, by step time)."""

    plans: list[Plan]
    global_batch: int
    devices: int
    budget: float | None

    @property
    def fitting(self) -> list[Plan]:
        return [p for p in self.plans if p.fits]

    @property
    def best(self) -> Plan:
        """The fastest plan that fits the budget."""
        return self.fitting[0]


def search(
    costs: ModelCosts,
    devices: int,
    global_batch: int,
    *,
    memory: float | None = None,
    schedules: Sequence[str] | None = None,
    micro_batch_sizes: Iterable[int] | None = None,
    checkpointing: Sequence[bool] = (False, True),
    stages: Iterable[int] | None = None,
    layers: Sequence[Any] | None = None,
) -> SearchResult:
    """Estimate every candidate and rank them (see :mod:`stagewise.plan`).

    Args:
        costs: the model's measured costs (scaled to the target devices, if need be).
        devices: devices in all.
        global_batch: rows per training step over all data-parallel replicas.
        memory: the budget per device in bytes (None: unlimited).
        schedules, micro_batch_sizes, checkpointing, stages: narrow the search
            (defaults: everything that can run).
        layers: the model's layers; when given, the costs must have been measured on them.

    Raises:
        PlanError: zero devices, costs of another model, a budget nothing fits (the
            message names the candidate closest to fitting and by how much), or no
            candidate that can run at all.
    """
    if layers is not None:
        costs.check_layers(layers)
    if memory is not None and not memory > 0:
        raise PlanError(f"the memory budget must be > 0 bytes per device, got {memory!r}")
    found = enumerate_candidates(
        costs.num_layers, devices, global_batch, schedules=schedules,
        micro_batch_sizes=micro_batch_sizes, checkpointing=checkpointing, stages=stages,
    )  # fmt: skip
    plans = [Plan(c, estimate(costs, c, global_batch=global_batch), memory) for c in found]
    plans.sort(key=lambda p: (not p.fits, p.estimate.step_time if p.fits else p.over_by))
    if not plans[0].fits:
        closest = min(plans, key=lambda p: p.peak)
        raise PlanError(
            f"no candidate fits the memory budget of {_mib(memory)} per device: the "
            f"smallest peak is {_mib(closest.peak)} ({closest.candidate.label}), over by "
            f"{_mib(closest.over_by)}. Give at least {_mib(closest.peak)} per device, "
            "more devices, or a smaller micro-batch size"
        )
    logger.info("planned %d candidates, %d fit", len(plans), sum(p.fits for p in plans))
    return SearchResult(plans, global_batch, devices, memory)


def _mib(value: float | None) -> str:
    return "unlimited" if value is None else f"{value / MIB:.1f} MiB"
