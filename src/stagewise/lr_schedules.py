"""Learning-rate schedules by name: DeepSpeed's warm-up schedules and torch's own.

DeepSpeed's schedules set an absolute learning rate (``warmup_min_lr`` to
``warmup_max_lr``), independent of the optimizer's ``lr``, and take their first
step when built; these do the same so a DeepSpeed config gives the same rates.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stagewise.errors import ConfigError

__all__ = ["WarmupDecayLR", "WarmupLR", "build_lr_scheduler"]


class WarmupLR:
    """Warm up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``.

    ``warmup_type`` is ``"log"`` (DeepSpeed's default) or ``"linear"``; afterwards the
    rate stays at ``warmup_max_lr``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        if warmup_type not in ("log", "linear"):
            raise ConfigError(
                f"scheduler.params.warmup_type must be 'log' or 'linear', got {warmup_type!r}"
            )
        self.optimizer = optimizer
        self.min_lr = float(warmup_min_lr)
        self.delta_lr = float(warmup_max_lr) - self.min_lr
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr: list[float] = []
        if last_batch_iteration == -1:
            self.step()

    def _gamma(self) -> float:
        step = self.last_batch_iteration
        if step < self.warmup_num_steps:
            if self.warmup_type == "log":
                return self.inverse_log_warm_up * math.log(step + 1)
            return step / self.warmup_num_steps
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.optimizer.param_groups]
        gamma = self._gamma()
        return [self.min_lr + self.delta_lr * gamma for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


class WarmupDecayLR(WarmupLR):
    """:class:`WarmupLR`, then a linear decay to 0 at ``total_num_steps``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: float = 0.0,
        warmup_max_lr: float = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        if self.total_num_steps < max(2, int(warmup_num_steps)):
            raise ConfigError(
                f"scheduler.params.total_num_steps={total_num_steps} must be at least "
                f"warmup_num_steps={warmup_num_steps}"
            )
        super().__init__(
            optimizer,
            warmup_min_lr,
            warmup_max_lr,
            warmup_num_steps,
            warmup_type,
            last_batch_iteration,
        )

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        remaining = self.total_num_steps - self.last_batch_iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


_DEEPSPEED = {"warmuplr": WarmupLR, "warmupdecaylr": WarmupDecayLR}


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> Any:
    """A scheduler by DeepSpeed name (WarmupLR, WarmupDecayLR) or ``torch.optim.lr_scheduler`` name."""
    cls: Any = _DEEPSPEED.get(name.lower())
    if cls is None:
        cls = getattr(torch.optim.lr_scheduler, name, None)
    if cls is None or not callable(cls):
        torch_names = sorted(
            n for n in dir(torch.optim.lr_scheduler) if n.endswith("LR") and n[0].isupper()
        )
        raise ConfigError(
            f"unknown scheduler.type {name!r}; use WarmupLR, WarmupDecayLR or a "
            f"torch.optim.lr_scheduler class ({', '.join(torch_names)})"
        )
    try:
        return cls(optimizer, **params)
    except TypeError as exc:
        raise ConfigError(f"scheduler {name!r} rejected its params {params}: {exc}") from None
