"""``stagewise plan``: stages, micro-batches, schedule and checkpointing chosen from measured costs.

1. :func:`profile` measures each layer on this machine (forward, input- and
   weight-gradient time, saved and sent bytes, fitted over the micro-batch size)
   into a :class:`ModelCosts`, saved and loaded as JSON (with the model's
   fingerprint); :func:`~stagewise.plan.calibrate.measure_engine` adds the
   engine's own work per pass and per step and the link's latency and bandwidth.
2. :func:`search` lists every candidate (:mod:`~stagewise.plan.candidates`),
   estimates each one (:mod:`~stagewise.plan.estimate`: the optimal partition by its
   costs, the schedule simulated with them, the memory per stage) and ranks those
   that fit the memory budget by step time.
3. :mod:`~stagewise.plan.report` prints the table and writes the winner's config
   and ``PipelineModule`` arguments; ``stagewise plan`` (:mod:`stagewise.cli.plan`)
   does all of it from a costs file.
"""

from __future__ import annotations

from stagewise.errors import PlanError
from stagewise.plan.candidates import Candidate, enumerate_candidates
from stagewise.plan.costs import EngineCosts, LayerCosts, Linear, ModelCosts
from stagewise.plan.estimate import Estimate, estimate
from stagewise.plan.profile import profile
from stagewise.plan.report import module_arguments, plan_config, plan_table
from stagewise.plan.search import Plan, SearchResult, parse_bytes, search

__all__ = [
    "Candidate",
    "EngineCosts",
    "Estimate",
    "LayerCosts",
    "Linear",
    "ModelCosts",
    "Plan",
    "PlanError",
    "SearchResult",
    "enumerate_candidates",
    "estimate",
    "module_arguments",
    "parse_bytes",
    "plan_config",
    "plan_table",
    "profile",
    "search",
]
