"""The validated configuration, with DeepSpeed's key names.

``Config.from_dict`` (or ``from_any`` for a dict or a JSON path) checks every
key. A DeepSpeed config loads as it is: a key DeepSpeed reads that stagewise
does not implement is named in one warning, and an unknown key is a warning
that names it and the closest known key (``Config.notices``, logged on rank 0
by ``initialize``); ``"strict_config": true`` makes them a
:class:`~stagewise.errors.ConfigError`. A value of the wrong type or
inconsistent batch sizes are always errors. Batch sizes follow DeepSpeed:
``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* data_parallel``, and any two of the three fix the third.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from stagewise.config.batch import resolve_batch
from stagewise.config.checkpointing import CheckpointConfig
from stagewise.config.keys import STRICT_KEY, check_booleans, check_keys, reports_keys, typed
from stagewise.config.sections import (
    FP16Config,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
)
from stagewise.config.zero import ZeroConfig
from stagewise.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "Config",
    "FP16Config",
    "OptimizerConfig",
    "PipelineConfig",
    "SchedulerConfig",
    "ZeroConfig",
]


@dataclass
class Config:
    """The whole configuration (DeepSpeed's key names)."""

    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    # Clip the global gradient norm (over all stages) to this; 0 disables. DeepSpeed
    # 0.19.8's default is 1.0, and so is ours (but ours is the norm of every stage).
    gradient_clipping: float = 1.0
    bf16_enabled: bool = False
    fp16: FP16Config = field(default_factory=FP16Config)
    # Log the loss every this many steps (rank 0).
    steps_per_print: int = 10
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    wall_clock_breakdown: bool = False
    # zero_optimization (stage 1: optimizer state sharded over data-parallel replicas).
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    # Periodic, rotating, asynchronous checkpoints and automatic resume.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Make every key that stagewise does not act on an error (default: a warning).
    strict_config: bool = False
    # The warnings about keys stagewise does not act on (filled by from_dict).
    notices: list[str] = field(default_factory=list, repr=False, compare=False)

    _KNOWN = (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "optimizer",
        "scheduler",
        "gradient_clipping",
        "bf16",
        "bfloat16",
        "fp16",
        "steps_per_print",
        "pipeline",
        "wall_clock_breakdown",
        "zero_optimization",
        "zero_allow_untested_optimizer",
        "dump_state",
        "prescale_gradients",
        "gradient_predivide_factor",
        "checkpoint",
        STRICT_KEY,
    )

    @classmethod
    def from_any(cls, config: dict[str, Any] | str | os.PathLike[str] | None) -> Config:
        """A config from a dict, a path to a JSON file, or None (all defaults)."""
        if config is None:
            return cls.from_dict({})
        if isinstance(config, (str, os.PathLike)):
            try:
                with open(config) as handle:
                    data = json.load(handle)
            except FileNotFoundError:
                raise ConfigError(f"config file {os.fspath(config)!r} does not exist") from None
            except json.JSONDecodeError as exc:
                raise ConfigError(f"config file {os.fspath(config)!r} is not JSON: {exc}") from None
            return cls.from_dict(data)
        if not isinstance(config, dict):
            raise ConfigError(
                f"config must be a dict or a path to a JSON file, got {type(config).__name__}"
            )
        return cls.from_dict(config)

    @classmethod
    @reports_keys
    def from_dict(cls, data: dict[str, Any]) -> Config:
        check_keys("", data, list(cls._KNOWN))
        out = cls(strict_config=bool(data.get(STRICT_KEY, False)))
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        ):
            if data.get(key) is not None:
                value = typed("", key, data[key], int)
                if value < 1:
                    raise ConfigError(f"config key {key} must be >= 1, got {value}")
                setattr(out, key, value)
        if "optimizer" in data and data["optimizer"] is not None:
            section = data["optimizer"]
            check_keys("optimizer", section, ["type", "params"])
            if "type" not in section:
                raise ConfigError('config key optimizer.type is missing (e.g. "Adam", "SGD")')
            out.optimizer = OptimizerConfig(
                type=typed("optimizer.", "type", section["type"], str),
                params=dict(section.get("params", {})),
            )
        if "scheduler" in data and data["scheduler"] is not None:
            section = data["scheduler"]
            check_keys("scheduler", section, ["type", "params"])
            if "type" not in section:
                raise ConfigError('config key scheduler.type is missing (e.g. "WarmupLR")')
            out.scheduler = SchedulerConfig(
                type=typed("scheduler.", "type", section["type"], str),
                params=dict(section.get("params", {})),
            )
        if "gradient_clipping" in data:
            out.gradient_clipping = float(
                typed("", "gradient_clipping", data["gradient_clipping"], (int, float))
            )
            if out.gradient_clipping < 0:
                raise ConfigError(f"gradient_clipping must be >= 0, got {out.gradient_clipping}")
        for key in ("bf16", "bfloat16"):
            if key in data:
                bf16 = check_keys(key, data[key], ["enabled"])
                out.bf16_enabled = typed(f"{key}.", "enabled", bf16.get("enabled", False), bool)
        if "fp16" in data:
            out.fp16 = FP16Config(
                **check_keys("fp16", data["fp16"], [f.name for f in fields(FP16Config)])
            )
            check_booleans("fp16.", out.fp16)
        if out.fp16.enabled and out.bf16_enabled:
            raise ConfigError("bf16.enabled and fp16.enabled are both true; choose one")
        if "steps_per_print" in data:
            out.steps_per_print = typed("", "steps_per_print", data["steps_per_print"], int)
        if "pipeline" in data:
            out.pipeline = PipelineConfig.from_dict(data["pipeline"])
        if "wall_clock_breakdown" in data:
            out.wall_clock_breakdown = typed(
                "", "wall_clock_breakdown", data["wall_clock_breakdown"], bool
            )
        for key in ("zero_allow_untested_optimizer", "dump_state", "prescale_gradients"):
            if key in data:
                typed("", key, data[key], bool)
        if "checkpoint" in data:
            out.checkpoint = CheckpointConfig.from_dict(data["checkpoint"])
        out.zero = ZeroConfig.from_dict(
            data.get("zero_optimization"), data.get("zero_allow_untested_optimizer", False)
        )
        return out

    def resolve_batch(self, dp_world_size: int) -> tuple[int, int, int]:
        """``(train_batch_size, micro_batch_size, gradient_accumulation_steps)``.

        Raises:
            ConfigError: when the given sizes are inconsistent or too few are given.
        """
        return resolve_batch(
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
            dp_world_size,
        )
