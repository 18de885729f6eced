"""Tied weights: one process group per tied key over the stages that hold a copy.

Every spec with the same :class:`~stagewise.spec.TiedLayerSpec` key shares one
module per rank. Where several stages hold a copy, they form a group (one per
data-parallel and model-parallel coordinate): the weights are broadcast from
the lowest rank at build, and their gradients are summed over the group every
step (``ReduceTiedGrads``). Copies past the first stage are marked
``ds_pipe_replicated`` (DeepSpeed's attribute), so global norms count a tied
weight once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from stagewise.spec import TiedLayerSpec, get_attr_path
from stagewise.topology import ProcessTopology

__all__ = ["check_tied_specs", "synchronize_tied_weights", "tied_groups"]


def check_tied_specs(specs: Sequence[Any]) -> None:
    """Specs sharing a key must tie the same attributes: every stage syncs the same list."""
    first: dict[str, tuple[int, list[str]]] = {}
    for idx, spec in enumerate(specs):
        if not isinstance(spec, TiedLayerSpec):
            continue
        if spec.key not in first:
            first[spec.key] = (idx, spec.tied_weight_attr)
        elif first[spec.key][1] != spec.tied_weight_attr:
            other, attrs = first[spec.key]
            raise ValueError(
                f"TiedLayerSpec {spec.key!r}: layer {other} ties {attrs} but layer {idx} "
                f"ties {spec.tied_weight_attr}; give every spec of one key the same "
                "tied_weight_attr (stages holding different layers must sync the same weights)"
            )


def tied_groups(
    owners: Mapping[str, Sequence[int]],
    topology: ProcessTopology,
    rank: int,
    modules: Mapping[str, nn.Module],
    attrs: Mapping[str, list[str]],
) -> dict[str, dict[str, Any]]:
    """The groups of the tied keys this rank holds, created collectively by every rank.

    Args:
        owners: per tied key, the stages holding a copy (sorted).
        topology: the process topology.
        rank: this rank.
        modules: this rank's tied modules by key.
        attrs: per key, the tied attribute paths.

    Returns:
        Per key held here and shared with another stage: ``ranks``, ``group``,
        ``weight_attr`` and ``module`` (DeepSpeed's ``tied_comms`` layout).
    """
    comms: dict[str, dict[str, Any]] = {}
    axes = topology.get_axis_names()
    for key in sorted(owners):
        stages = owners[key]
        if len(stages) < 2:
            continue
        for dp in range(max(topology.get_dim("data"), 1)):
            for mp in range(max(topology.get_dim("model"), 1)):
                coord: dict[str, int] = {}
                if "data" in axes:
                    coord["data"] = dp
                if "model" in axes:
                    coord["model"] = mp
                ranks = [topology.get_rank(pipe=s, **coord) for s in stages]
                group = dist.new_group(ranks=ranks)
                if rank not in ranks:
                    continue
                comms[key] = {
                    "ranks": ranks,
                    "group": group,
                    "weight_attr": attrs[key],
                    "module": modules[key],
                }
                if rank != ranks[0]:
                    for attr in attrs[key]:
                        get_attr_path(modules[key], attr).ds_pipe_replicated = True
    return comms


def synchronize_tied_weights(comms: Mapping[str, Mapping[str, Any]]) -> None:
    """Broadcast every tied weight from the lowest rank holding it."""
    for comm in comms.values():
        for attr in comm["weight_attr"]:
            weight = get_attr_path(comm["module"], attr)
            dist.broadcast(weight.data, src=min(comm["ranks"]), group=comm["group"])
