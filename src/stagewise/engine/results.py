"""A batch's results: the mean loss shared with every stage, evaluation outputs reduced.

The last virtual stage holds the micro-batches' losses. ``train_batch`` returns
their mean, averaged over data-parallel replicas, on every rank (a broadcast
over the pipe group). ``eval_batch`` averages outputs (a tensor or a tuple of
tensors) over micro-batches and replicas, and shares them on request.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from stagewise.collectives import Collectives
from stagewise.engine.state import BatchState
from stagewise.errors import PipelineError
from stagewise.grid import PipelineParallelGrid

__all__ = ["Results", "log_progress"]

logger = logging.getLogger("stagewise.engine")


class Results:
    """Loss and output sharing of one rank.

    Args:
        grid: the process groups.
        collectives: bounded collectives of this rank.
        device: where shared tensors live.
        loss_rank: the global rank of the stage that holds the loss, in this pipeline.
        holds_loss: whether this rank is that stage.
    """

    def __init__(
        self,
        grid: PipelineParallelGrid,
        collectives: Collectives,
        device: torch.device,
        loss_rank: int,
        holds_loss: bool,
    ) -> None:
        self.grid = grid
        self.collectives = collectives
        self.device = device
        self.loss_rank = loss_rank
        self.holds_loss = holds_loss

    def mean_loss(self, losses: list[Any], reduce_dp: bool) -> torch.Tensor:
        """The mean of the micro-batch losses, on every stage (and replica, with ``reduce_dp``)."""
        value = torch.zeros(1, dtype=torch.float32, device=self.device)
        dp_size = self.grid.get_data_parallel_world_size()
        if self.holds_loss:
            value[0] = torch.stack([loss.float().reshape(()) for loss in losses]).mean()
            if reduce_dp and dp_size > 1:
                self.collectives.all_reduce(
                    value, "averaging the loss", self.grid.get_data_parallel_group()
                )
                value /= dp_size
        if self.grid.get_pipe_parallel_world_size() > 1:
            self.collectives.broadcast(
                value,
                self.loss_rank,
                "sharing the loss from the last stage",
                self.grid.get_pipe_parallel_group(),
            )
        return value[0].clone()

    def evaluation(
        self,
        batch: BatchState,
        micro_batches: int,
        reduce: bool,
        share: bool,
        return_logits: bool,
    ) -> Any:
        """What ``eval_batch`` returns: the outputs (averaged when ``reduce``), shared with
        every stage when ``share`` (and reduced), with the logits when ``return_logits``."""
        result: Any = None
        if self.holds_loss:
            result = self.reduce_outputs(batch.losses, micro_batches) if reduce else batch.losses
        if share and reduce:
            result = self.share(result)
        if return_logits:
            return result, (batch.logits if self.holds_loss else None)
        return result

    def reduce_outputs(self, outputs: list[Any], micro_batches: int) -> Any:
        """Outputs averaged over micro-batches and data-parallel replicas."""
        dp_size = self.grid.get_data_parallel_world_size()
        group = self.grid.get_data_parallel_group()
        if isinstance(outputs[0], torch.Tensor):
            reduced: Any = sum(o.float() for o in outputs) / micro_batches
            if dp_size > 1:
                reduced = reduced.clone()
                self.collectives.all_reduce(reduced, "averaging outputs", group)
                reduced /= dp_size
            return reduced
        parts = [sum(o[i].float() for o in outputs) / micro_batches for i in range(len(outputs[0]))]
        if dp_size > 1:
            for part in parts:
                self.collectives.all_reduce(part, "averaging outputs", group)
                part /= dp_size
        return parts

    def share(self, result: Any) -> Any:
        """The loss stage's tensor (or list of tensors), on every stage of the pipeline."""
        if self.grid.get_pipe_parallel_world_size() == 1:
            return result
        mine = self.holds_loss
        if mine and isinstance(result, list):
            count = torch.tensor([len(result)], dtype=torch.int64, device=self.device)
        else:
            count = torch.tensor([-1], dtype=torch.int64, device=self.device)
        self._broadcast(count, "sharing the evaluation result")
        if int(count.item()) < 0:
            return self._share_tensor(result if mine else None)
        return [self._share_tensor(result[i] if mine else None) for i in range(int(count.item()))]

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self.collectives.broadcast(
            tensor, self.loss_rank, what, self.grid.get_pipe_parallel_group()
        )

    def _share_tensor(self, value: torch.Tensor | None) -> torch.Tensor:
        header = torch.zeros(9, dtype=torch.int64, device=self.device)
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device).contiguous()
            if value.dim() > 8:
                raise PipelineError(f"cannot share an evaluation output of {value.dim()} dims")
            header[0] = value.dim()
            header[1 : 1 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
        self._broadcast(header, "sharing the evaluation result's shape")
        shape = tuple(int(v) for v in header[1 : 1 + int(header[0])].tolist())
        if value is None:
            value = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._broadcast(value, "sharing the evaluation result")
        return value


def log_progress(
    every: int,
    steps: int,
    rank: int,
    loss: torch.Tensor | None,
    batch_size: int,
    since: float,
) -> float:
    """Log DeepSpeed's progress line every ``every`` steps on rank 0; the new time mark."""
    if not every or steps % every or rank != 0:
        return since
    now = time.perf_counter()
    elapsed = (now - since) / every
    logger.info(
        "steps: %d loss: %.4f iter time (s): %.3f samples/sec: %.1f",
        steps,
        float(loss) if loss is not None else float("nan"),
        elapsed,
        batch_size / elapsed if elapsed > 0 else float("nan"),
    )
    return now
