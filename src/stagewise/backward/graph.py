"""Where a backward splits: the autograd graph read between the stage's outputs and inputs.

A stage's backward has two jobs: the gradient of the stage's *inputs*, which
the previous stage waits for, and the gradients of its *parameters*, which
only the optimizer needs. In the graph autograd recorded (nodes are
``grad_fn`` objects, edges their ``next_functions``), the nodes that lead to
an input form the *input path*; everything else leads only to parameters.

The input-gradient pass (``I``) runs the input path alone (autograd prunes
what does not lead to the requested inputs, and the nodes on the path compute
only the outputs that do). Where a node of the input path also feeds a
parameter-only branch, it is a *split node*: ``I`` records the gradient that
reaches it, and the weight-gradient pass (``W``) runs it again from that
gradient towards its parameters alone. Outputs of the stage that do not depend
on an input at all are parameter-only from the start; ``W`` runs them whole.

This is the same for every layer type (linear, convolution, embedding, norm,
attention or any custom module with parameters), under autocast and under
activation checkpointing, because it reads the graph, not the modules.

:func:`plan_split` finds the split nodes and, for each, the parameters ``W``
reaches from it. When two of those sets overlap (a parameter used twice, on
both sides of a split), running them apart would count some of its gradient
twice; the plan then says ``splittable=False`` and the caller runs the whole
backward in ``I``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["SplitPlan", "plan_split"]

Node = Any  # a torch.autograd.graph.Node (grad_fn or AccumulateGrad)


@dataclass
class SplitPlan:
    """Where one micro-batch's backward splits.

    Attributes:
        splittable: whether the parameter-only branches are disjoint (else run the
            backward whole).
        split_nodes: nodes of the input path that feed parameter-only branches.
        split_params: per split node, the parameters its branches reach.
        weight_roots: indices of the roots that do not depend on an input.
        root_params: per such root, the parameters it reaches.
    """

    splittable: bool = True
    split_nodes: list[Node] = field(default_factory=list)
    split_params: list[list[torch.Tensor]] = field(default_factory=list)
    weight_roots: list[int] = field(default_factory=list)
    root_params: list[list[torch.Tensor]] = field(default_factory=list)


def _children(node: Node) -> Iterable[Node]:
    return (child for child, _ in node.next_functions if child is not None)


def _leaf(node: Node) -> Any:
    """The tensor an ``AccumulateGrad`` node accumulates into (None for other nodes)."""
    return getattr(node, "variable", None)


def plan_split(
    roots: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor | GradientEdge],
    param_ids: AbstractSet[int],
    self_handled: frozenset[type] = frozenset(),
) -> SplitPlan:
    """Find the split nodes between ``roots`` and ``inputs`` (see the module doc).

    Args:
        roots: the tensors the backward starts from (each with a ``grad_fn``).
        inputs: the stage inputs whose gradients ``I`` computes (tensors, leaves or not,
            or the :class:`~torch.autograd.graph.GradientEdge` where each one's gradient
            arrives).
        param_ids: ``id()`` of the parameters whose gradients ``W`` computes.
        self_handled: classes of autograd Functions (``fn._forward_cls``) that defer
            their own weight gradients; their parameter edges are not split.
    """
    input_nodes = set()
    for item in inputs:
        edge = item if isinstance(item, GradientEdge) else get_gradient_edge(item)
        input_nodes.add(edge.node)
    reaches_input: dict[Node, bool] = {}
    # an iterative post-order walk: the graph of a deep stage outgrows Python's recursion
    stack: list[tuple[Node, bool]] = [(r.grad_fn, False) for r in roots if r.grad_fn is not None]
    while stack:
        node, expanded = stack.pop()
        if node in reaches_input and not expanded:
            continue
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if child not in reaches_input)
            continue
        reaches_input[node] = node in input_nodes or any(
            reaches_input.get(child, False) for child in _children(node)
        )

    params_of: dict[Node, frozenset[int]] = {}
    tensors: dict[int, torch.Tensor] = {}

    def reached_params(start: Node) -> frozenset[int]:
        """The parameters below a node off the input path (memoised, iterative)."""
        todo: list[tuple[Node, bool]] = [(start, False)]
        while todo:
            node, expanded = todo.pop()
            if node in params_of:
                continue
            if not expanded:
                todo.append((node, True))
                todo.extend((c, False) for c in _children(node) if c not in params_of)
                continue
            leaf = _leaf(node)
            found: set[int] = set()
            if leaf is not None and id(leaf) in param_ids:
                found.add(id(leaf))
                tensors[id(leaf)] = leaf
            for child in _children(node):
                found |= params_of.get(child, frozenset())
            params_of[node] = frozenset(found)
        return params_of[start]

    plan = SplitPlan()
    claimed: set[int] = set()

    def claim(ids: frozenset[int]) -> list[torch.Tensor]:
        if claimed & ids:
            plan.splittable = False
        claimed.update(ids)
        return [tensors[i] for i in sorted(ids)]

    for index, root in enumerate(roots):
        node = root.grad_fn
        if node is not None and not reaches_input.get(node, False):
            below = reached_params(node)
            if below:
                plan.weight_roots.append(index)
                plan.root_params.append(claim(below))
    for node, on_path in reaches_input.items():
        if not on_path or getattr(node, "_forward_cls", None) in self_handled:
            continue
        ids: frozenset[int] = frozenset()
        for child in _children(node):
            if not reaches_input.get(child, False):
                ids |= reached_params(child)
        if ids:
            plan.split_nodes.append(node)
            plan.split_params.append(claim(ids))
    return plan
