"""The optimizer step: the optimizer and scheduler by name, fp16 loss scaling, the step itself.

``OptimizerStep`` runs :meth:`Stepper.step`: with fp16, an overflow check over
every rank (a skipped step halves the loss scale); in fp32 and bf16, the
non-finite check (:mod:`~stagewise.engine.nonfinite`); unscaling, clipping by
the global norm, the optimizer's step, the scheduler's step, and the counters.
``global_steps`` counts every batch's step, taken or skipped (as DeepSpeed
counts it), so it is also the number of batches a resumed script has trained.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stagewise.backward.linear import WeightGradStore
from stagewise.checkpoint import TrainingCounters
from stagewise.collectives import Collectives
from stagewise.config import Config
from stagewise.engine.grad_step import GradientReducer
from stagewise.engine.nonfinite import NonFiniteGuard
from stagewise.errors import ConfigError
from stagewise.lr_schedules import build_lr_scheduler

__all__ = ["LossScaler", "Stepper", "build_lr_scheduler_for", "optimizer_from_config"]

logger = logging.getLogger(__name__)


#: DeepSpeed's optimizer names that need a kernel or package stagewise does not mirror.
_NOT_MIRRORED = {
    "lamb": "DeepSpeed's FusedLamb is a CUDA kernel and torch has no LAMB",
    "lion": "DeepSpeed's FusedLion is a CUDA kernel and torch has no Lion",
    "muon": "DeepSpeed's Muon (Muon for matrices, Adam for the rest) is not torch.optim.Muon",
    "muadam": "DeepSpeed's MuAdam comes from the mup package",
    "muadamw": "DeepSpeed's MuAdamW comes from the mup package",
    "musgd": "DeepSpeed's MuSGD comes from the mup package",
}


def _adam(name: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """DeepSpeed's ``Adam``/``AdamW``: the torch class and its arguments, DeepSpeed's defaults.

    ``AdamW`` always decouples weight decay; ``Adam`` does unless ``adam_w_mode`` is
    false (then the decay is an L2 term in the gradient, torch's ``Adam``). Without
    ``torch_adam`` DeepSpeed runs its FusedAdam, whose ``weight_decay`` defaults to 0
    (torch's ``AdamW`` to 0.01); with ``torch_adam: true`` it runs torch's class with
    torch's defaults.
    """
    decoupled = bool(kwargs.pop("adam_w_mode", True)) or name == "adamw"
    kwargs.pop("fp32_optimizer_states", None)  # CPU Adam's state precision: fp32 here anyway
    cls: Any = torch.optim.AdamW if decoupled else torch.optim.Adam
    if kwargs.pop("torch_adam", False):
        return cls, kwargs
    if not kwargs.pop("bias_correction", True):
        raise ConfigError(
            f"optimizer {name!r}: bias_correction=false (DeepSpeed's FusedAdam) is not "
            "supported: torch's Adam always corrects the bias; remove the key"
        )
    kwargs.pop("set_grad_none", None)  # the engine always sets gradients to None
    kwargs.setdefault("weight_decay", 0.0)
    return cls, kwargs


def optimizer_from_config(name: str, params: dict[str, Any], model_params: Any) -> Any:
    """The optimizer a config's ``optimizer`` section names, as DeepSpeed builds it.

    ``Adam`` and ``AdamW`` follow DeepSpeed key by key (:func:`_adam`: the meaning of
    each name, ``adam_w_mode``, ``torch_adam``, ``weight_decay`` 0 by default);
    ``Adagrad`` and every other name are ``torch.optim``'s class of that name
    (case-insensitive). DeepSpeed's ``Lamb``, ``Lion``, ``Muon`` and the ``mup``
    optimizers are not mirrored: an error says to pass the optimizer to ``initialize``.

    Raises:
        ConfigError: an unknown or unmirrored name, ``max_grad_norm`` in the params,
            or params the optimizer rejects.
    """
    kwargs = dict(params)
    lowered = name.lower()
    if "max_grad_norm" in kwargs:
        raise ConfigError(
            f"optimizer {name!r}: max_grad_norm is not an optimizer parameter; set the "
            'config\'s "gradient_clipping" instead'
        )
    if lowered in _NOT_MIRRORED:
        raise ConfigError(
            f"optimizer.type {name!r} is not available in stagewise ({_NOT_MIRRORED[lowered]}); "
            "build the optimizer yourself and pass it as stagewise.initialize(optimizer=...)"
        )
    if lowered in ("adam", "adamw"):
        cls, kwargs = _adam(lowered, kwargs)
    else:
        by_lower = {
            n.lower(): getattr(torch.optim, n)
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"
        }
        cls = by_lower.get(lowered)
        if cls is None:
            raise ConfigError(
                f"unknown optimizer.type {name!r}; use Adam, AdamW or one of torch.optim's "
                f"optimizers ({', '.join(sorted(c.__name__ for c in by_lower.values()))})"
            )
    try:
        return cls(model_params, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer {name!r} rejected its params {params}: {exc}") from None


class LossScaler:
    """Dynamic loss scaling for fp16 (DeepSpeed's defaults)."""

    def __init__(self, cfg: Any) -> None:
        self.dynamic = cfg.loss_scale == 0
        self.scale = float(2**cfg.initial_scale_power) if self.dynamic else float(cfg.loss_scale)
        self.window = cfg.loss_scale_window
        self.min_scale = cfg.min_loss_scale
        self.hysteresis = cfg.hysteresis
        self._hysteresis_left = cfg.hysteresis
        self._good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The dynamic part of the scaler (its settings come from the config)."""
        return {
            "scale": self.scale,
            "good_steps": self._good_steps,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self._good_steps = 0
            if self._hysteresis_left <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self._hysteresis_left -= 1
            return
        self._good_steps += 1
        if self._good_steps % self.window == 0:
            self.scale *= 2
            self._hysteresis_left = self.hysteresis


def build_lr_scheduler_for(config: Config, optimizer: Any, lr_scheduler: Any) -> Any:
    """The scheduler given to ``initialize``, or built from the config's ``scheduler``.

    A callable that is not a scheduler is called with the optimizer (DeepSpeed's
    ``lr_scheduler=lambda opt: ...``).
    """
    if lr_scheduler is None and config.scheduler is not None:
        if optimizer is None:
            raise ConfigError("a scheduler is configured but there is no optimizer")
        return build_lr_scheduler(config.scheduler.type, optimizer, config.scheduler.params)
    if lr_scheduler is not None and not hasattr(lr_scheduler, "step") and callable(lr_scheduler):
        return lr_scheduler(optimizer)
    return lr_scheduler


@dataclass
class Stepper:
    """What one ``OptimizerStep`` needs.

    Attributes:
        optimizer: the optimizer over this rank's parameters (with ZeRO-1, the
            :class:`~stagewise.engine.zero.ZeroOptimizer` around it: anything with
            ``step()`` and ``zero_grad(set_to_none=...)``).
        lr_scheduler: stepped after every optimizer step (or None).
        loss_scaler: fp16's dynamic loss scale (or None).
        reducer: the gradient collectives (clipping by the global norm).
        clipping: the global norm to clip to; 0 disables.
        counters: the step counters, advanced here.
        collectives: for the overflow vote over every rank.
        device: where the vote's tensor lives.
        weight_store: keeps the linear weight-gradient buffers for the next step.
        linear_weights: the weights whose gradient buffers are kept.
        nonfinite: the non-finite check of fp32 and bf16 steps (None: no check).
    """

    optimizer: Any
    lr_scheduler: Any
    loss_scaler: LossScaler | None
    reducer: GradientReducer
    clipping: float
    counters: TrainingCounters
    collectives: Collectives
    device: torch.device
    weight_store: WeightGradStore
    linear_weights: list[torch.Tensor]
    nonfinite: NonFiniteGuard | None = None

    def _skip(self) -> None:
        """This batch's optimizer step is skipped on every rank (counted, as DeepSpeed does)."""
        self.counters.skipped_steps += 1
        self.counters.global_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _overflowed(self, grads: list[torch.Tensor]) -> bool:
        flag = torch.tensor(
            [0.0 if all(bool(torch.isfinite(g).all()) for g in grads) else 1.0],
            device=self.device,
        )
        self.collectives.all_reduce(flag, "checking fp16 overflow", op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def step(self, _instr: Any = None, batch: Any = None) -> None:
        """Unscale and clip the gradients, step the optimizer and the scheduler."""
        grads = self.reducer.gradients()
        scaler = self.loss_scaler
        if scaler is not None:
            overflow = self._overflowed(grads)
            scaler.update(overflow)
            if overflow:
                self._skip()
                logger.info("fp16 overflow: step skipped, loss scale now %g", scaler.scale)
                return
            for grad in grads:
                grad.div_(scaler.scale)
        norm = self.reducer.global_norm() if self.clipping > 0 else None
        # The non-finite check of fp32 and bf16 (fp16's is the loss scaler's). With clipping,
        # the global norm (the same on every rank) is the check: a non-finite loss or gradient
        # makes it non-finite, and only then does the guard's report (another pass over the
        # gradients, an all-reduce over every rank) run, to name where and decide.
        guard = self.nonfinite if scaler is None else None
        if guard is not None and (norm is None or not math.isfinite(norm)):
            if guard.should_skip(batch, grads, self.counters.global_steps + 1):
                self._skip()
                return
        if norm is not None:
            self.reducer.clip(self.clipping, norm)
        self.optimizer.step()
        if self.weight_store.enabled:
            self.weight_store.keep_buffers(self.linear_weights)
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.counters.global_steps += 1
