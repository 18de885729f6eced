"""Optimizer state by layer and parameter name, never by position.

A run saved with 4 stages resumes on 2 or 8 with its momentum and Adam moments:
each layer's file holds the state of that layer's parameters keyed by their
names inside the layer, and loading rebuilds the optimizer's position-keyed
state dict from whichever layers this rank holds now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from stagewise.checkpoint.files import cpu_copy, load_file
from stagewise.checkpoint.layout import FORMAT, FORMAT_VERSION, LayerTable, layer_file_name
from stagewise.errors import CheckpointError

__all__ = ["layer_optimizer_state", "load_optimizer_state", "parameter_names"]


def parameter_names(
    layers: Mapping[int, nn.Module], table: LayerTable
) -> dict[int, tuple[int, str]]:
    """``id(param) -> (owner layer index, name inside the layer module)`` for these layers."""
    where: dict[int, tuple[int, str]] = {}
    for idx in sorted(layers):
        owner = table.owner(idx)
        for name, param in layers[idx].named_parameters():
            where.setdefault(id(param), (owner, name))
    return where


def layer_optimizer_state(
    optimizer: Any, layer: nn.Module, optimizer_name: str | None = None
) -> dict[str, Any]:
    """The optimizer state of one layer's parameters, keyed by parameter name.

    ``optimizer`` has ``param_groups`` and ``state`` by parameter (a ``torch.optim``
    optimizer, or a sharded one's gathered state); ``optimizer_name`` is its class
    name (default: ``optimizer``'s).
    """
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    params: dict[str, Any] = {}
    groups: dict[int, Any] = {}
    for name, param in layer.named_parameters():
        g = group_of.get(id(param))
        if g is None:
            continue
        params[name] = {"group": g, "state": cpu_copy(dict(optimizer.state.get(param, {})))}
        groups[g] = {k: v for k, v in optimizer.param_groups[g].items() if k != "params"}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer": optimizer_name or type(optimizer).__name__,
        "params": params,
        "param_groups": cpu_copy(groups),
    }


def load_optimizer_state(
    optimizer: Any,
    layers: Mapping[int, nn.Module],
    table: LayerTable,
    tag_dir: str,
    rank_repr: str = "",
    optimizer_name: str | None = None,
) -> None:
    """Load ``optimizer``'s state from the layer files of ``tag_dir``.

    ``optimizer`` has ``param_groups`` and ``load_state_dict`` (a ``torch.optim``
    optimizer, or a sharded one's loader); ``optimizer_name`` is its class name
    (default: ``optimizer``'s), which the files must record.
    """
    cls_name = optimizer_name or type(optimizer).__name__
    where = parameter_names(layers, table)
    files: dict[int, dict[str, Any]] = {}
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    next_id = 0
    for group in optimizer.param_groups:
        ids: list[int] = []
        hyper: dict[str, Any] | None = None
        for param in group["params"]:
            if id(param) not in where:
                raise CheckpointError(
                    f"the optimizer holds a parameter of shape {tuple(param.shape)} that belongs "
                    "to no layer of this stage; optimizer state is stored per layer, so build "
                    "the optimizer over module.parameters() (or pass load_optimizer_states=False)"
                )
            owner, name = where[id(param)]
            if owner not in files:
                path = os.path.join(tag_dir, layer_file_name(owner, "optim", rank_repr))
                data = load_file(path, f"optimizer state of layer {owner}")
                saved_cls = data.get("optimizer")
                if saved_cls != cls_name:
                    raise CheckpointError(
                        f"{path} holds {saved_cls} state but the optimizer is "
                        f"{cls_name}; use the same optimizer or pass "
                        "load_optimizer_states=False"
                    )
                files[owner] = data
            entry = files[owner]["params"].get(name)
            if entry is None:
                raise CheckpointError(
                    f"{layer_file_name(owner, 'optim', rank_repr)} in {tag_dir} has no state for "
                    f"parameter {name!r} of layer {owner}; it was not optimized when saved: "
                    "pass load_optimizer_states=False"
                )
            if entry["state"]:
                state[next_id] = entry["state"]
            if hyper is None:
                hyper = files[owner]["param_groups"][entry["group"]]
            ids.append(next_id)
            next_id += 1
        merged = {k: v for k, v in group.items() if k != "params"}
        merged.update(hyper or {})
        merged["params"] = ids
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
