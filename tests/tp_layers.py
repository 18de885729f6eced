"""Megatron-style tensor-parallel layers over a grid's slice group, and a model made of them.

``ColumnParallelLinear(in, out, mpu=grid)`` keeps rows ``r*out/tp : (r+1)*out/tp`` of
the weight and bias on slice ``r``: the input is whole (its gradient is summed over
the slices), the output is this slice's columns. ``RowParallelLinear(in, out,
mpu=grid)`` keeps columns ``r*in/tp : (r+1)*in/tp`` of the weight: the input is this
slice's columns, the partial products are summed over the slices, and the bias
(whole on every slice) is added after. Sharded parameters carry DeepSpeed's
``model_parallel = True`` (and Megatron's ``partition_dim``). With ``mpu=None`` a
layer is unsharded: the one-process reference.

The weights are cut from ``nn.Linear(in, out)`` built under the layer's seed, so
the tensor-parallel model starts from (and must train like) the unsharded one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import stagewise
from pipeline_cases import Tanh, batches_for, ds_config
from stagewise.models.reference import build_reference
from stagewise.spec import LayerSpec, TiedLayerSpec


def _slices(mpu: Any) -> tuple[int, int, Any]:
    """``(slice rank, number of slices, group)`` of ``mpu`` (one slice without it)."""
    if mpu is None:
        return 0, 1, None
    return (
        mpu.get_tensor_model_parallel_rank(),
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_group(),
    )


class _CopyToSlices(torch.autograd.Function):
    """Forward: the whole input to every slice. Backward: the slices' gradients summed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverSlices(torch.autograd.Function):
    """Forward: the slices' partial outputs summed. Backward: the gradient to every slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> nn.Parameter:
    if tensor.shape[dim] % size:
        raise ValueError(f"dimension {dim} of {tuple(tensor.shape)} does not split {size} ways")
    param = nn.Parameter(tensor.detach().chunk(size, dim=dim)[rank].clone())
    param.model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """``y[:, cols of this slice] = x @ W[rows of this slice].T + b[rows]``: (B, in) -> (B, out/tp)."""

    def __init__(self, in_features: int, out_features: int, mpu: Any = None) -> None:
        super().__init__()
        self.rank, self.size, self.group = _slices(mpu)
        full = nn.Linear(in_features, out_features)
        self.weight = _shard(full.weight, 0, self.rank, self.size)  # (out/tp, in)
        self.bias = _shard(full.bias, 0, self.rank, self.size)  # (out/tp,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            x = _CopyToSlices.apply(x, self.group)
        return F.linear(x, self.weight, self.bias)  # (B, out/tp)


class RowParallelLinear(nn.Module):
    """``y = sum over slices of x_slice @ W[:, cols of the slice].T, + b``: (B, in/tp) -> (B, out)."""

    def __init__(self, in_features: int, out_features: int, mpu: Any = None) -> None:
        super().__init__()
        self.rank, self.size, self.group = _slices(mpu)
        full = nn.Linear(in_features, out_features)
        self.weight = _shard(full.weight, 1, self.rank, self.size)  # (out, in/tp)
        self.bias = nn.Parameter(full.bias.detach().clone())  # (out,), whole on every slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # (B, out): this slice's share of the product
        if self.size > 1:
            partial = _SumOverSlices.apply(partial, self.group)
        return partial + self.bias


def tp_specs(mpu: Any = None) -> list[Any]:
    """8 layers: replicated in and out, two tensor-parallel pairs, the first column-parallel
    layer tied between the stages (weight and bias)."""
    tied = ["weight", "bias"]
    return [
        LayerSpec(nn.Linear, 4, 8),
        TiedLayerSpec("up", ColumnParallelLinear, 8, 16, mpu=mpu, tied_weight_attr=tied),
        nn.ReLU(),
        LayerSpec(RowParallelLinear, 16, 8, mpu=mpu),
        TiedLayerSpec("up", ColumnParallelLinear, 8, 16, mpu=mpu, tied_weight_attr=tied),
        LayerSpec(Tanh),
        LayerSpec(RowParallelLinear, 16, 8, mpu=mpu),
        LayerSpec(nn.Linear, 8, 3),
    ]


def tp_case(**overrides: Any) -> dict[str, Any]:
    case = {"model": "mlp", "stages": 2, "tp": 2, "micro_batches": 2, "mb_size": 3, "clip": 0.05}
    return {**case, **overrides}


def _build(case: dict[str, Any]) -> stagewise.PipelineEngine:
    topo = stagewise.PipeModelDataParallelTopology(
        num_pp=case["stages"], num_mp=case["tp"], num_dp=case.get("dp", 1)
    )
    mpu = stagewise.PipelineParallelGrid(topology=topo)  # the layers' groups, as Megatron's mpu
    module = stagewise.PipelineModule(
        layers=tp_specs(mpu),
        topology=topo,
        loss_fn=F.cross_entropy,
        seed_layers=True,
        base_seed=1234,
        partition_method="uniform",
    )
    engine, *_ = stagewise.initialize(model=module, config=ds_config(case))
    return engine


def _state(module: nn.Module) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Every weight with the dimension it is cut along (None: whole on every slice)."""
    return {
        name: (param.detach().clone(), getattr(param, "partition_dim", None))
        for name, param in module.named_parameters()
    }


def run_tp(rank: int, world_size: int, case: dict[str, Any], actions: list[Any]) -> dict[str, Any]:
    """One rank: ``("train", n)``, ``("save", dir)``, ``("load", dir)`` in order; the losses of
    every trained batch, this rank's weights and its place."""
    engine = _build(case)
    dp_rank = engine.grid.get_data_parallel_rank()
    losses: list[float] = []
    for action in actions:
        if action[0] == "train":
            for _ in range(action[1]):
                data = batches_for(case, engine.global_steps, dp_rank)
                losses.append(float(engine.train_batch(iter(data))))
        elif action[0] == "save":
            engine.save_checkpoint(action[1])
        elif action[0] == "load":
            engine.load_checkpoint(action[1])
        else:
            raise ValueError(f"unknown action {action!r}")
    return {
        "losses": losses,
        "state": _state(engine.module),
        "slice": engine.grid.get_slice_parallel_rank(),
    }


def merge_slices(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The unsharded weights from every rank's: shards joined in slice order, copies checked."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for result in results:
        for name, (value, dim) in result["state"].items():
            dims[name] = dim
            have = pieces.setdefault(name, {})
            key = result["slice"] if dim is not None else 0
            if key in have:
                torch.testing.assert_close(value, have[key], msg=f"copies of {name} differ")
            else:
                have[key] = value
    merged = {}
    for name, by_slice in pieces.items():
        dim = dims[name]
        ordered = [by_slice[k] for k in sorted(by_slice)]
        merged[name] = torch.cat(ordered, dim=dim) if dim is not None else ordered[0]
    return merged


def train_tp_reference(case: dict[str, Any], steps: int) -> dict[str, Any]:
    """The unsharded model in one process: same seeds, data (every replica's), SGD, clipping."""
    torch.set_num_threads(1)
    model = build_reference(tp_specs(None), base_seed=1234, seed_layers=True)
    config = ds_config(case)["optimizer"]["params"]
    opt = torch.optim.SGD(model.parameters(), **config)
    m, dp = case["micro_batches"], case.get("dp", 1)
    losses = []
    for step in range(steps):
        total = 0.0
        for d in range(dp):
            for x, y in batches_for(case, step, d):
                loss = F.cross_entropy(model(x), y)
                (loss / (m * dp)).backward()
                total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        opt.step()
        opt.zero_grad()
        losses.append(total / (m * dp))
    state = {k: v.detach().clone() for k, v in copy.deepcopy(model).named_parameters()}
    return {"losses": losses, "state": state, "last_norm": float(norm)}
