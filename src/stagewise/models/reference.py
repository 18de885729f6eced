"""Run a list of layer specs in one process: the reference a pipeline is checked against.

:class:`ReferenceModel` builds every layer of a spec list in order, exactly as
a :class:`~stagewise.PipelineModule` spread over any number of stages builds
its own share of them, and runs them one after another. With
``seed_layers=True`` layer ``i`` is built right after seeding Python, NumPy and
torch with ``base_seed + i``, so each layer gets the weights the pipeline (and
DeepSpeed) gives it. Specs that share a :class:`~stagewise.TiedLayerSpec` key
share one module, built at its first occurrence, and its ``forward_fn`` runs
in place of ``module(x)`` where given.

Names follow DeepSpeed's ``PipelineModule``: a built layer ``i`` is the
attribute ``str(i)`` and tied modules live in ``tied_modules[key]``, so the
state dict keys read the same as a one-stage pipeline's.

>>> import torch
>>> from torch import nn
>>> from stagewise.spec import LayerSpec
>>> model = build_reference([LayerSpec(nn.Linear, 4, 8), nn.ReLU(), LayerSpec(nn.Linear, 8, 2)])
>>> model(torch.zeros(3, 4)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from stagewise.spec import LayerSpec, TiedLayerSpec, seed_everything

__all__ = ["ReferenceModel", "build_reference", "seed_everything"]


class ReferenceModel(nn.Module):
    """All layers of a spec list in one ``nn.Module``, run in sequence.

    Args:
        layers: ``LayerSpec``, ``TiedLayerSpec``, built ``nn.Module`` and plain
            callables, as ``PipelineModule`` takes them.
        loss_fn: kept as ``self.loss_fn`` (``loss_fn(outputs, labels)``) for
            callers that compute the loss the pipeline would.
        seed_layers: seed before building each layer, as ``PipelineModule`` does.
        seed_fn: the seeding function (default :func:`seed_everything`).
        base_seed: layer ``i`` is built after ``seed_fn(base_seed + i)``.

    Building with ``seed_layers=True`` leaves the global RNGs seeded with the
    last layer's seed, as the pipeline does.
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec | nn.Module | Callable[..., Any]],
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        seed_layers: bool = True,
        seed_fn: Callable[[int], None] | None = None,
        base_seed: int = 1234,
    ) -> None:
        super().__init__()
        if isinstance(layers, (LayerSpec, nn.Module)) or not isinstance(layers, Sequence):
            raise TypeError(
                f"ReferenceModel needs a list of layers, got {type(layers).__name__}; "
                "wrap a single layer in a list"
            )
        self.loss_fn = loss_fn
        self.tied_modules = nn.ModuleDict()
        self.forward_funcs: list[Callable[..., Any]] = []
        seed = seed_fn or seed_everything
        for index, layer in enumerate(layers):
            if seed_layers:
                seed(base_seed + index)
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                module = self.tied_modules[layer.key]
                if layer.forward_fn is None:
                    self.forward_funcs.append(module)
                else:
                    self.forward_funcs.append(partial(layer.forward_fn, module))
            elif isinstance(layer, LayerSpec):
                module = layer.build()
                self.add_module(str(index), module)
                self.forward_funcs.append(module)
            elif isinstance(layer, nn.Module):
                self.add_module(str(index), layer)
                self.forward_funcs.append(layer)
            elif callable(layer):
                self.forward_funcs.append(layer)
            else:
                raise TypeError(
                    f"layer {index} is a {type(layer).__name__}, which is neither a LayerSpec, "
                    "an nn.Module nor a callable; pass one of those"
                )

    def forward(self, x: Any) -> Any:
        """Run every layer in order; each one's output is the next one's input."""
        for func in self.forward_funcs:
            x = func(x)
        return x

    def __len__(self) -> int:
        return len(self.forward_funcs)


def build_reference(
    specs: Sequence[LayerSpec | nn.Module | Callable[..., Any]],
    base_seed: int = 1234,
    seed_layers: bool = True,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    seed_fn: Callable[[int], None] | None = None,
) -> ReferenceModel:
    """Build ``specs`` into one :class:`ReferenceModel` with the pipeline's seeding."""
    return ReferenceModel(
        specs, loss_fn=loss_fn, seed_layers=seed_layers, seed_fn=seed_fn, base_seed=base_seed
    )
