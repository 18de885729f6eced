"""Layer specs: how to build one layer, kept apart from building it.

A :class:`PipelineModule` receives specs rather than built layers so that each
rank builds only the layers of its own stage. Constructing a spec touches no
process group and allocates no parameters.

>>> import torch.nn as nn
>>> spec = LayerSpec(nn.Linear, 4, 2, bias=False)
>>> spec
LayerSpec(Linear(4, 2, bias=False))
>>> spec.build().weight.shape
torch.Size([2, 4])
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec", "call_to_str", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch with ``seed`` (DeepSpeed's ``set_random_seed``).

    ``PipelineModule(seed_layers=True)`` calls it with ``base_seed + i`` right before
    building layer ``i``, so each layer's weights depend on its index alone.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed % (2**63))


def call_to_str(name: str, *args: Any, **kwargs: Any) -> str:
    """Render a call as text: ``call_to_str("f", 1, x=2) == "f(1, x=2)"``."""
    parts = [repr(arg) for arg in args] + [f"{key}={value!r}" for key, value in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class LayerSpec:
    """How to build one ``nn.Module``: its class and constructor arguments.

    Args:
        typename: a subclass of ``torch.nn.Module``.
        *module_args, **module_kwargs: passed to ``typename`` by :meth:`build`.

    Raises:
        TypeError: when ``typename`` is not an ``nn.Module`` subclass.
    """

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any) -> None:
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(
                f"LayerSpec needs a subclass of torch.nn.Module, got {typename!r}; "
                "pass the class itself (e.g. LayerSpec(nn.Linear, 4, 4)), or put a built "
                "module or a plain callable straight into the layer list"
            )
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        """Build the module. ``log`` is accepted for DeepSpeed compatibility."""
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        call = call_to_str(self.typename.__name__, *self.module_args, **self.module_kwargs)
        return f"{type(self).__name__}({call})"


class TiedLayerSpec(LayerSpec):
    """A layer whose weights are shared by every spec with the same ``key``.

    Args:
        key: specs with equal keys share one module (built once per rank).
        typename, *module_args, **module_kwargs: as for :class:`LayerSpec`.
        forward_fn: when given, ``forward_fn(module, x)`` runs in place of
            ``module(x)``, e.g. to reuse an embedding as the output head.
        tied_weight_attr: the attribute name(s) of the shared parameters; a
            string or a sequence of strings, dotted paths allowed
            (``"transformer.wte.weight"``).
    """

    def __init__(
        self,
        key: str,
        typename: type[nn.Module],
        *module_args: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        tied_weight_attr: str | Sequence[str] = ("weight",),
        **module_kwargs: Any,
    ) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        if isinstance(tied_weight_attr, str):
            attrs = [tied_weight_attr]
        else:
            attrs = list(tied_weight_attr)
        if not attrs or not all(isinstance(attr, str) and attr for attr in attrs):
            raise TypeError(
                f"TiedLayerSpec {key!r}: tied_weight_attr must be a non-empty string or a "
                f"list of non-empty strings, got {tied_weight_attr!r}"
            )
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = attrs

    def __repr__(self) -> str:
        call = call_to_str(self.typename.__name__, *self.module_args, **self.module_kwargs)
        return f"TiedLayerSpec(key={self.key!r}, {call})"


def get_attr_path(module: nn.Module, path: str) -> Any:
    """``module.a.b.c`` for ``path == "a.b.c"``, with an error naming the missing part."""
    obj: Any = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"{type(module).__name__} has no attribute {path!r} (missing {part!r}); "
                "check tied_weight_attr"
            )
        obj = getattr(obj, part)
    return obj
