"""The workloads of ``benchmarks/peers.py``: the same model for every contender.

* ``mlp``: 8 ``Linear(1024, 1024)`` with a ReLU between each pair (15 layers),
  MSE against fixed random targets, 8 micro-batches of 16 rows.
* ``gpt``: the demo's GPT shape at benchmark size: a tied token embedding (and
  position embedding), 4 pre-LayerNorm blocks of causal self-attention and a
  GELU MLP (``n_embd`` 256, 4 heads), a final LayerNorm and the tied output
  head, ``T`` = 64 tokens, vocabulary 512, 8 micro-batches of 4 sequences.

Either in fp32 or under bf16 autocast, with or without activation checkpointing
(every layer with parameters, non-reentrant). Every contender builds the same
layers with the same seeds; the pipelines cut them at the same boundaries.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stagewise.models.gpt import (
    GPTConfig,
    gpt_head,
    gpt_layer_specs,
    gpt_loss,
)
from stagewise.models.reference import build_reference

__all__ = ["WORKLOADS", "Workload"]

WIDTH = 1024
LINEARS = 8
GPT = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256)


def _mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs.float(), labels)


def _gpt_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return gpt_loss(logits.float(), labels)


class _Checkpointed(nn.Module):
    """A layer run under torch's non-reentrant activation checkpointing."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Any:
        return checkpoint(self.inner, x, use_reentrant=False)


def _has_params(func: Any) -> bool:
    owner = func.args[0] if isinstance(func, functools.partial) else func
    return isinstance(owner, nn.Module) and any(True for _ in owner.parameters())


def _checkpointed(func: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return functools.partial(checkpoint, func, use_reentrant=False)


class _Autocast(nn.Module):
    """A stage module run under bf16 autocast (torch.distributed.pipelining has no option)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


class _Head(nn.Module):
    """The tied output head as a module: logits from an embedding's ``wte``."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gpt_head(self.embedding, x)


@dataclass(frozen=True)
class Workload:
    """One model and its data, as every contender builds it."""

    name: str
    bf16: bool = False
    ckpt: bool = False

    @property
    def micro_batches(self) -> int:
        return 8

    @property
    def micro_batch_size(self) -> int:
        return 16 if self.name == "mlp" else 4

    @property
    def label(self) -> str:
        extras = [e for e, on in (("bf16 autocast", self.bf16), ("checkpointing", self.ckpt)) if on]
        return f"{self.name} ({', '.join(['fp32'] if not extras else extras)})"

    def describe(self) -> str:
        if self.name == "mlp":
            shape = "8 x Linear(1024, 1024) + ReLU, MSE, 8 micro-batches of 16"
        else:
            c = GPT
            shape = (
                f"GPT {c.n_layer} blocks x {c.n_embd} ({c.n_head} heads), T={c.block_size}, "
                f"vocab {c.vocab_size}, tied embedding, 8 micro-batches of 4"
            )
        return f"{self.label}: {shape}, 2 stages, 1 thread/process, gloo/CPU"

    # -- the layers -------------------------------------------------------------------
    def specs(self, spec_cls: Any, tied_spec_cls: Any = None) -> list[Any]:
        """The layers as specs of a pipeline library (DeepSpeed's or stagewise's)."""
        if self.name == "mlp":
            specs: list[Any] = []
            for index in range(LINEARS):
                if index:
                    specs.append(spec_cls(nn.ReLU))
                specs.append(spec_cls(nn.Linear, WIDTH, WIDTH))
            return specs
        ours = gpt_layer_specs(GPT)
        if tied_spec_cls is None:
            return list(ours)
        out: list[Any] = []
        for spec in ours:
            if hasattr(spec, "key"):
                out.append(
                    tied_spec_cls(
                        spec.key,
                        spec.typename,
                        *spec.module_args,
                        forward_fn=spec.forward_fn,
                        tied_weight_attr=spec.tied_weight_attr,
                    )
                )
            else:
                out.append(spec_cls(spec.typename, *spec.module_args))
        return out

    def stagewise_specs(self) -> list[Any]:
        from stagewise.spec import LayerSpec

        return self.specs(LayerSpec)

    @property
    def partition_method(self) -> str:
        return "uniform" if self.name == "mlp" else "type:Block"

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _mse if self.name == "mlp" else _gpt_loss

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    # -- one process --------------------------------------------------------------------
    def reference(self) -> nn.Module:
        """All layers in one process (seeded as the pipelines seed them)."""
        model = build_reference(self.stagewise_specs(), base_seed=1234, seed_layers=True)
        if self.ckpt:
            model.forward_funcs = [
                _checkpointed(func) if _has_params(func) else func for func in model.forward_funcs
            ]
        return model

    def data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed micro-batches, the same on every rank."""
        gen = torch.Generator().manual_seed(42)
        if self.name == "mlp":
            return [
                (
                    torch.randn(16, WIDTH, generator=gen),  # (16, 1024)
                    torch.randn(16, WIDTH, generator=gen),  # (16, 1024)
                )
                for _ in range(self.micro_batches)
            ]
        out = []
        for _ in range(self.micro_batches):
            tokens = torch.randint(0, GPT.vocab_size, (4, GPT.block_size + 1), generator=gen)
            out.append((tokens[:, :-1], tokens[:, 1:]))  # (4, 64) ids, (4, 64) next ids
        return out

    # -- torch.distributed.pipelining -------------------------------------------------
    def torch_stage_modules(
        self, boundaries: list[int], mine: list[int]
    ) -> tuple[dict[int, nn.Module], list[nn.Parameter]]:
        """The modules of this rank's virtual stages, cut at ``boundaries`` (stagewise's),
        and the parameters tied across ranks (their gradients are summed by hand)."""
        reference = build_reference(self.stagewise_specs(), base_seed=1234, seed_layers=True)
        layers: list[nn.Module] = []
        embedding: nn.Module | None = None
        for index in range(boundaries[-1]):
            if self.name == "gpt" and index == 0:
                embedding = reference.tied_modules["embed"]
                layers.append(embedding)
            elif self.name == "gpt" and index == boundaries[-1] - 1:
                layers.append(_Head(reference.tied_modules["embed"]))
            else:
                layers.append(getattr(reference, str(index)))
        modules: dict[int, nn.Module] = {}
        holds_embedding = holds_head = False
        for part in mine:
            start, stop = boundaries[part], boundaries[part + 1]
            chosen = []
            for index in range(start, stop):
                layer = layers[index]
                if self.ckpt and any(True for _ in layer.parameters()):
                    layer = _Checkpointed(layer)
                chosen.append(layer)
            holds_embedding |= start == 0
            holds_head |= stop == boundaries[-1]
            module: nn.Module = nn.Sequential(*chosen)
            modules[part] = _Autocast(module) if self.bf16 else module
        tied: list[nn.Parameter] = []
        if self.name == "gpt" and holds_embedding != holds_head and embedding is not None:
            tied = [embedding.wte.weight]  # one end of the tie on each rank
        return modules, tied


def iterate(data: list[Any]) -> Iterator[Any]:
    """The micro-batches, cycled."""
    while True:
        yield from data


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp"),
    "gpt": Workload("gpt"),
    "gpt-bf16": Workload("gpt", bf16=True),
    "gpt-ckpt": Workload("gpt", ckpt=True),
    "gpt-bf16-ckpt": Workload("gpt", bf16=True, ckpt=True),
}
