"""Non-finite losses and gradients (fp32, bf16): stop, naming where, or skip the step everywhere.

Before the optimizer step, every rank reports its first non-finite micro-batch
loss (the stage holding the loss) and whether its gradients' norm is finite;
one all-reduce over every rank shares the reports, so every rank reaches the
same verdict. With ``pipeline.nonfinite = "error"`` (the default) every rank
raises :class:`~stagewise.errors.NonFiniteError` naming the step, the stage and
the micro-batch; with ``"skip"`` every rank skips that optimizer step and
counts it in ``skipped_steps``. fp16 training leaves it to the loss scaler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from stagewise.collectives import Collectives
from stagewise.errors import NonFiniteError

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger("stagewise.engine")

_KINDS = {1: "NaN", 2: "+inf", 3: "-inf"}


def _kind(value: torch.Tensor) -> int:
    """1 NaN, 2 +inf, 3 -inf, 0 finite."""
    if bool(torch.isnan(value)):
        return 1
    if bool(torch.isinf(value)):
        return 2 if float(value) > 0 else 3
    return 0


class NonFiniteGuard:
    """The non-finite check of one rank.

    Args:
        mode: ``"error"`` or ``"skip"`` (``pipeline.nonfinite``).
        collectives: bounded collectives over every rank.
        device: where the report's tensor lives.
        rank, world_size: this rank and the number of ranks.
        describe: names a rank (``"stage 1 (rank 3)"``).
    """

    def __init__(
        self,
        mode: str,
        collectives: Collectives,
        device: torch.device,
        rank: int,
        world_size: int,
        describe: Callable[[int], str],
    ) -> None:
        self.mode = mode
        self.collectives = collectives
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.describe = describe

    def _report(self, losses: Sequence[Any], grads: Sequence[torch.Tensor]) -> torch.Tensor:
        world = self.world_size
        report = torch.zeros(2 * world, dtype=torch.int64)
        for index, loss in enumerate(losses):
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                kind = _kind(loss.detach().float().reshape(()).cpu())
                if kind:
                    report[self.rank] = 4 * (index + 1) + kind
                    break
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            report[world + self.rank] = _kind(norm.detach().float().cpu())
        return report.to(self.device)

    def should_skip(self, batch: Any, grads: Sequence[torch.Tensor], step: int) -> bool:
        """Check step ``step``'s losses and gradients on every rank; True: skip the step.

        Raises:
            NonFiniteError: in ``"error"`` mode, on every rank alike.
        """
        losses = list(getattr(batch, "losses", []) or [])
        mode = getattr(batch, "mode", None)
        total = int(getattr(mode, "micro_batches", 0) or len(losses))
        report = self._report(losses, grads)
        self.collectives.all_reduce(report, "sharing the non-finite check", op=dist.ReduceOp.MAX)
        values = report.tolist()
        if not any(values):
            return False
        world = self.world_size
        found = []
        for rank in range(world):
            if values[rank]:
                micro, kind = divmod(values[rank], 4)
                found.append(
                    f"the loss of micro-batch {micro - 1} (of {total}) on {self.describe(rank)} "
                    f"is {_KINDS[kind]}"
                )
        bad_grads = [r for r in range(world) if values[world + r]]
        if bad_grads:
            names = ", ".join(
                f"{self.describe(r)} ({_KINDS[values[world + r]]})" for r in bad_grads
            )
            found.append(
                f"the gradient norm is not finite on {names} (gradients add up over the "
                "batch's micro-batches, so no single micro-batch is named)"
            )
        message = f"non-finite values at step {step}: " + "; ".join(found)
        if self.mode == "error":
            raise NonFiniteError(
                f"{message}. Training stops (pipeline.nonfinite='error'); check the data and "
                "the learning rate, or set pipeline.nonfinite='skip' to skip such steps"
            )
        if self.rank == 0:
            logger.warning("%s; the optimizer step is skipped on every rank", message)
        return True
