"""Gradient reduction: tied weights summed, data-parallel replicas averaged, the global norm.

* ``ReduceTiedGrads``: the gradients of a tied weight are summed over the stages
  that share it (every copy then holds the whole gradient);
* ``ReduceGrads``: data-parallel gradients are averaged (one flat all-reduce per dtype,
  or per bucket of ``zero_optimization.reduce_bucket_size`` elements with ZeRO-1);
* the global norm is taken over every stage and tensor-parallel slice of one
  replica: tied weights counted once (only the lowest stage's copy counts), a
  parameter sharded over the slices (``model_parallel`` or
  ``tensor_model_parallel`` true, as Megatron and DeepSpeed mark it) counted on
  every slice, any other parameter (identical on every slice) only on slice 0;
  clipping scales every gradient by the same factor, which
  :func:`torch.nn.utils.clip_grad_norm_` gives in one process on the unsharded model;
* replicas start from the same weights (:meth:`GradientReducer.broadcast_replicas`).
"""

from __future__ import annotations

from typing import Any

import torch

from stagewise.collectives import Collectives
from stagewise.grid import PipelineParallelGrid
from stagewise.module import PipelineModule

__all__ = ["GradientReducer", "is_model_parallel"]


def is_model_parallel(param: torch.Tensor) -> bool:
    """Whether ``param`` is a tensor-parallel shard (DeepSpeed's and Megatron's attributes)."""
    return bool(getattr(param, "model_parallel", False)) or bool(
        getattr(param, "tensor_model_parallel", False)
    )


class GradientReducer:
    """The collectives over gradients of one rank.

    Args:
        module: this rank's layers.
        grid: the process groups.
        collectives: bounded collectives of this rank.
        device: where reduction scratch tensors live.
        bucket_elems: the most elements of one data-parallel all-reduce (None: one per
            dtype); a larger gradient is reduced alone.
    """

    def __init__(
        self,
        module: PipelineModule,
        grid: PipelineParallelGrid,
        collectives: Collectives,
        device: torch.device,
        bucket_elems: int | None = None,
    ) -> None:
        self.module = module
        self.grid = grid
        self.collectives = collectives
        self.device = device
        self.bucket_elems = bucket_elems

    def reduce_tied(self, *_: Any) -> None:
        """Sum tied weights' gradients over the stages that share them."""
        for weight, group, _ranks in self.module.tied_weights():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            self.collectives.all_reduce(weight.grad, "summing tied-weight gradients", group)

    def broadcast_replicas(self) -> None:
        """Give every data-parallel replica of this stage the first replica's weights.

        DeepSpeed's ``initialize`` does the same, so that replicas built from
        differently seeded random states still train one model.
        """
        if self.grid.get_data_parallel_world_size() == 1:
            return
        src = min(self.grid.get_data_parallel_group_ranks())
        group = self.grid.get_data_parallel_group()
        with torch.no_grad():
            for p in self.module.parameters():
                self.collectives.broadcast(
                    p.data, src, "sharing the first replica's weights", group
                )

    def reduce_data_parallel(self, *_: Any) -> None:
        """Average gradients over the data-parallel replicas of this stage."""
        dp_size = self.grid.get_data_parallel_world_size()
        if dp_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        group = self.grid.get_data_parallel_group()
        for grads in by_dtype.values():
            for bucket in self._buckets(grads):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                self.collectives.all_reduce(flat, "averaging data-parallel gradients", group)
                flat /= dp_size
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _buckets(self, grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``grads`` in order, cut where a bucket would pass ``bucket_elems`` elements."""
        if self.bucket_elems is None:
            return [grads]
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for grad in grads:
            if buckets[-1] and size + grad.numel() > self.bucket_elems:
                buckets.append([])
                size = 0
            buckets[-1].append(grad)
            size += grad.numel()
        return buckets

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient of this rank."""
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def _counted_grads(self) -> list[torch.Tensor]:
        """This rank's gradients that the global norm counts (see the module doc)."""
        first_slice = self.grid.get_slice_parallel_rank() == 0
        return [
            p.grad
            for p in self.module.parameters()
            if p.grad is not None
            and not getattr(p, "ds_pipe_replicated", False)
            and (first_slice or is_model_parallel(p))
        ]

    def global_norm(self) -> float:
        """The L2 norm of the whole model's gradients (every stage and slice, each once)."""
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for grad in self._counted_grads():
            local += grad.detach().double().pow(2).sum()
        grid = self.grid
        if grid.get_pipe_parallel_world_size() > 1 or grid.get_slice_parallel_world_size() > 1:
            self.collectives.all_reduce(
                local, "summing gradient norms", grid.get_model_parallel_group()
            )
        return float(local.sqrt().item())

    def clip(self, max_norm: float, total: float | None = None) -> float:
        """Scale every gradient so that the global norm is at most ``max_norm``; the norm.

        ``total`` is the global norm when the caller has it already.
        """
        total = self.global_norm() if total is None else total
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for grad in self.gradients():
                grad.mul_(coef)
        return total
