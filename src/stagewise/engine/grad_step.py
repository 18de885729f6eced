"""Gradient reduction: tied weights summed, data-parallel replicas averaged, the global norm.

* ``ReduceTiedGrads``: the gradients of a tied weight are summed over the stages
  that share it (every copy then holds the whole gradient);
* ``ReduceGrads``: data-parallel gradients are averaged (one flat all-reduce per dtype);
* the global norm is taken over every stage, tied weights counted once (only the
  lowest stage's copy counts), and clipping scales every gradient by the same
  factor, which :func:`torch.nn.utils.clip_grad_norm_` gives in one process.
"""

from __future__ import annotations

from typing import Any

import torch

from stagewise.collectives import Collectives
from stagewise.grid import PipelineParallelGrid
from stagewise.module import PipelineModule

__all__ = ["GradientReducer"]


class GradientReducer:
    """The collectives over gradients of one rank.

    Args:
        module: this rank's layers.
        grid: the process groups.
        collectives: bounded collectives of this rank.
        device: where reduction scratch tensors live.
    """

    def __init__(
        self,
        module: PipelineModule,
        grid: PipelineParallelGrid,
        collectives: Collectives,
        device: torch.device,
    ) -> None:
        self.module = module
        self.grid = grid
        self.collectives = collectives
        self.device = device

    def reduce_tied(self, *_: Any) -> None:
        """Sum tied weights' gradients over the stages that share them."""
        for weight, group, _ranks in self.module.tied_weights():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            self.collectives.all_reduce(weight.grad, "summing tied-weight gradients", group)

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
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.collectives.all_reduce(flat, "averaging data-parallel gradients", group)
            flat /= dp_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient of this rank."""
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def _counted_grads(self) -> list[torch.Tensor]:
        """This rank's gradients, tied copies past the first stage excluded (counted once)."""
        return [
            p.grad
            for p in self.module.parameters()
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
        ]

    def global_norm(self) -> float:
        """The L2 norm of the gradients of the whole model (every stage, tied weights once)."""
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for grad in self._counted_grads():
            local += grad.detach().double().pow(2).sum()
        grid = self.grid
        if grid.get_pipe_parallel_world_size() > 1 or grid.get_slice_parallel_world_size() > 1:
            self.collectives.all_reduce(
                local, "summing gradient norms", grid.get_model_parallel_group()
            )
        return float(local.sqrt().item())

    def clip(self, max_norm: float) -> float:
        """Scale every gradient so that the global norm is at most ``max_norm``; the norm."""
        total = self.global_norm()
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for grad in self.gradients():
                grad.mul_(coef)
        return total
