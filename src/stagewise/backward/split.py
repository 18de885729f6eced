"""The split backward: input gradients now (``I``), parameter gradients later (``W``).

:func:`input_pass` differentiates a micro-batch's stage outputs towards the
stage's inputs only, recording at each split node (:mod:`stagewise.backward.graph`)
the gradient that reached it, and returns the input gradients and a
:class:`WeightPass` holding what is left. :meth:`WeightPass.run` then runs each
split node again from its recorded gradient towards its own parameters (and the
outputs that depend on no input, whole), accumulating into ``.grad`` as a
whole backward would: the sum is the same gradient, only the order of the work
changes. The graph (and, under activation checkpointing, the recomputed
activations, see :mod:`stagewise.backward.recompute`) stays alive from ``I``
to ``W`` and is freed after it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.autograd.graph import GradientEdge

from stagewise.backward.graph import plan_split

__all__ = ["WeightPass", "input_pass"]

logger = logging.getLogger(__name__)
_warned = False


@dataclass
class WeightPass:
    """What ``W`` runs for one micro-batch: backward calls, each from edges to parameters."""

    calls: list[tuple[list[Any], list[torch.Tensor], list[torch.Tensor] | None]] = field(
        default_factory=list
    )

    def run(self) -> None:
        """Accumulate the deferred parameter gradients into ``.grad``; free the graph."""
        calls, self.calls = self.calls, []
        for edges, grads, params in calls:
            torch.autograd.backward(edges, grads, inputs=params)


def input_pass(
    roots: Sequence[torch.Tensor],
    root_grads: Sequence[torch.Tensor] | None,
    inputs: Sequence[torch.Tensor | GradientEdge],
    param_ids: AbstractSet[int],
    self_handled: frozenset[type] = frozenset(),
) -> tuple[list[torch.Tensor | None], WeightPass]:
    """Compute the gradients of ``inputs``; defer the parameters' to the returned pass.

    Args:
        roots: the tensors to differentiate (the loss, or the stage's outputs).
        root_grads: their incoming gradients (None for a scalar loss).
        inputs: the stage's inputs that want gradients, as tensors or as the
            :class:`~torch.autograd.graph.GradientEdge` where each one's gradient arrives
            (may be empty: then ``I`` has nothing to do and ``W`` is the whole backward).
        param_ids: ``id()`` of the parameters whose gradients may wait.
        self_handled: autograd Functions that defer their own weight gradients.

    Returns:
        One gradient (or None) per input, and the weight pass.
    """
    global _warned
    pending = WeightPass()
    grads = list(root_grads) if root_grads else [torch.ones_like(r) for r in roots]
    if not inputs:
        pending.calls.append((list(roots), grads, None))  # the whole backward, later
        return [], pending
    plan = plan_split(roots, inputs, param_ids, self_handled)
    if not plan.splittable:
        if not _warned:
            logger.warning(
                "a parameter is used on both sides of a split in one stage's backward "
                "(shared weights?): its weight pass runs back through the whole graph, "
                "doing the input-gradient work a second time"
            )
            _warned = True
        input_grads = torch.autograd.grad(
            list(roots),
            cast(Any, list(inputs)),
            grad_outputs=grads,
            retain_graph=True,
            allow_unused=True,
        )
        params = list(
            {id(p): p for group in plan.split_params + plan.root_params for p in group}.values()
        )
        if params:
            pending.calls.append((list(roots), grads, params))
        return list(input_grads), pending
    captured: list[tuple[torch.Tensor | None, ...] | None] = [None] * len(plan.split_nodes)
    handles = []
    for index, node in enumerate(plan.split_nodes):

        def keep(grad_outputs: tuple[torch.Tensor | None, ...], index: int = index) -> None:
            captured[index] = grad_outputs

        handles.append(node.register_prehook(keep))
    try:
        input_grads = torch.autograd.grad(
            list(roots),
            cast(Any, list(inputs)),
            grad_outputs=grads,
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for handle in handles:
            handle.remove()
    for node, params_of_node, grad_outputs in zip(
        plan.split_nodes, plan.split_params, captured, strict=True
    ):
        if grad_outputs is None:
            continue
        edges = [GradientEdge(node, k) for k, g in enumerate(grad_outputs) if g is not None]
        given = [g for g in grad_outputs if g is not None]
        if edges:
            pending.calls.append((edges, given, params_of_node))
    for index, params_of_root in zip(plan.weight_roots, plan.root_params, strict=True):
        pending.calls.append(([roots[index]], [grads[index]], params_of_root))
    return list(input_grads), pending
