"""The ranks' layer lists compared when a ``PipelineModule`` is built.

Every rank builds only its own stage, so a rank whose layer list differs (a
layer more, another width) would otherwise train silently on a model that no
other rank agrees with. :func:`layer_text` writes a layer as stable text (the
class, the arguments as values, never object addresses), :func:`layer_digests`
hashes each layer, and :func:`check_same_layers` compares the lists of every
rank with one small all-reduce (and, only when they differ, a second one that
finds the first layer that differs).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagewise.collectives import Collectives
from stagewise.spec import LayerSpec, TiedLayerSpec

__all__ = ["check_same_layers", "layer_digests", "layer_text"]

_MASK = (1 << 62) - 1


def _name(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f"partial({_name(obj.func)}, {_value(list(obj.args))}, {_value(obj.keywords)})"
    module = getattr(obj, "__module__", None) or ""
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)


def _value(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float, str, complex)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(_value(v) for v in value)}]"
    if isinstance(value, dict):
        items = sorted((str(k), _value(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{value.dtype}"
    if isinstance(value, nn.Module):
        return layer_text(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(
            f"{f.name}={_value(getattr(value, f.name))}" for f in dataclasses.fields(value)
        )
        return f"{_name(type(value))}({fields})"
    if callable(value):
        return _name(value)
    return type(value).__qualname__  # an object: its type, never its address


def layer_text(layer: Any) -> str:
    """A layer as text that is the same on every rank for the same layer."""
    if isinstance(layer, LayerSpec):
        args = ", ".join(
            [_value(a) for a in layer.module_args]
            + [f"{k}={_value(v)}" for k, v in sorted(layer.module_kwargs.items())]
        )
        call = f"{_name(layer.typename)}({args})"
        if isinstance(layer, TiedLayerSpec):
            forward = _name(layer.forward_fn) if layer.forward_fn is not None else None
            return f"TiedLayerSpec({layer.key!r}, {call}, {layer.tied_weight_attr}, {forward})"
        return f"LayerSpec({call})"
    if isinstance(layer, nn.Module):
        params = ", ".join(f"{n}{tuple(p.shape)}" for n, p in layer.named_parameters())
        return f"{_name(type(layer))}[{params}]"
    return _name(layer)


def layer_digests(layers: Sequence[Any]) -> list[int]:
    """One 62-bit hash per layer of :func:`layer_text`."""
    return [
        int.from_bytes(hashlib.sha256(layer_text(layer).encode()).digest()[:8], "big") & _MASK
        for layer in layers
    ]


def check_same_layers(layers: Sequence[Any], timeout_s: float = 300.0) -> None:
    """Raise on every rank when the ranks' layer lists differ (all ranks must call it).

    Raises:
        ValueError: naming the ranks whose lists differ, their lengths, and the first
            layer that differs with this rank's version of it.
    """
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    collectives = Collectives(timeout_s, f"rank {rank}")
    digests = layer_digests(layers)
    whole = int.from_bytes(hashlib.sha256(str(digests).encode()).digest()[:8], "big") & _MASK
    table = torch.zeros(world, 2, dtype=torch.int64)
    table[rank] = torch.tensor([whole, len(layers)])
    collectives.all_reduce(table, "comparing the ranks' layer lists")
    rows = table.tolist()
    if all(row == rows[0] for row in rows):
        return
    longest = max(row[1] for row in rows)
    each = torch.zeros(world, longest + 1, dtype=torch.int64)
    each[rank, : len(digests)] = torch.tensor(digests, dtype=torch.int64)
    collectives.all_reduce(each, "finding the first layer that differs")
    per_rank = each.tolist()
    first = next(i for i in range(longest + 1) if any(r[i] != per_rank[0][i] for r in per_rank))
    groups: dict[tuple[int, int], list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault((row[0], row[1]), []).append(r)
    summary = "; ".join(
        f"rank(s) {ranks} have {length} layers (digest {digest:016x})"
        for (digest, length), ranks in groups.items()
    )
    mine = layer_text(layers[first]) if first < len(layers) else "no layer"
    raise ValueError(
        f"the ranks build PipelineModule from different layer lists: {summary}. The first "
        f"difference is at layer {first} (rank {rank} has {mine}). Every rank must pass the "
        "same layers (same classes, arguments and order)"
    )
