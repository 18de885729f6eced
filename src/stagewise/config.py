"""The validated configuration, with DeepSpeed's key names.

``Config.from_dict`` (or ``from_any`` for a dict or a JSON path) checks every
key: an unknown one is a :class:`~stagewise.errors.ConfigError` naming it (and
the closest known key), as is a value of the wrong type or inconsistent batch
sizes. Batch sizes follow DeepSpeed: ``train_batch_size =
train_micro_batch_size_per_gpu * gradient_accumulation_steps * data_parallel``,
and any two of the three fix the third.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["Config", "FP16Config", "OptimizerConfig", "PipelineConfig", "SchedulerConfig"]


def _check_keys(section: str, given: dict[str, Any], known: list[str]) -> None:
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{section}." if section else ""
            raise ConfigError(
                f"unknown config key {where}{key!r}{hint} (known keys of "
                f"{section or 'the config'}: {', '.join(sorted(known))})"
            )


def _typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"config key {section}{key} must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(
            f"config key {section}{key} must be {names}, got {value!r} ({type(value).__name__})"
        )
    return value


@dataclass
class PipelineConfig:
    """The ``pipeline`` section."""

    # Which schedule trains: "1f1b" (DeepSpeed's TrainSchedule), "gpipe",
    # "interleaved", "zb-h1" or "zbv".
    schedule: str = "1f1b"
    # Model chunks per stage for "interleaved" (default 2); "zbv" always runs 2.
    virtual_stages: int | None = None
    # Checkpoint activations every this many layers (overrides the module's when set).
    activation_checkpoint_interval: int | None = None
    # Must agree with the PipelineModule's (which already partitioned the layers).
    partition_method: str | None = None
    # Must agree with the PipelineModule's (which already built its layers).
    seed_layers: bool | None = None
    # The longest any wait on another rank may take before it is reported as dead.
    timeout_s: float = 300.0
    # Record every instruction's start and end (for timelines and Chrome traces).
    record_timeline: bool = False
    # How point-to-point messages are matched: "order" (by issue order alone, as NCCL
    # does; the default everywhere) or "tags" (gloo's tags too, a debugging aid).
    p2p_match: str = "order"
    # DeepSpeed's keys, accepted for compatibility and unused here.
    stages: Any = "auto"
    partition: Any = "best"
    pipe_partitioned: bool = True
    grad_partitioned: bool = True
    use_reentrant: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        _check_keys("pipeline", data, [f.name for f in fields(cls)])
        out = cls(**data)
        p = "pipeline."
        _typed(p, "schedule", out.schedule, str)
        _typed(p, "timeout_s", out.timeout_s, (int, float))
        if out.virtual_stages is not None and (
            _typed(p, "virtual_stages", out.virtual_stages, int) < 1
        ):
            raise ConfigError(f"pipeline.virtual_stages must be >= 1, got {out.virtual_stages}")
        if _typed(p, "p2p_match", out.p2p_match, str) not in ("order", "tags"):
            raise ConfigError(
                f"pipeline.p2p_match must be 'order' or 'tags', got {out.p2p_match!r}"
            )
        if out.timeout_s <= 0:
            raise ConfigError(f"pipeline.timeout_s must be > 0, got {out.timeout_s}")
        if out.activation_checkpoint_interval is not None:
            _typed(p, "activation_checkpoint_interval", out.activation_checkpoint_interval, int)
        return out


@dataclass
class OptimizerConfig:
    """The ``optimizer`` section: a ``torch.optim`` class by name and its arguments."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """The ``scheduler`` section: a DeepSpeed or ``torch.optim.lr_scheduler`` name."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FP16Config:
    """The ``fp16`` section: half precision with dynamic loss scaling."""

    enabled: bool = False
    # 0 means dynamic loss scaling; any other value is a fixed scale.
    loss_scale: float = 0.0
    # The dynamic scale starts at 2**initial_scale_power.
    initial_scale_power: int = 16
    # Steps without overflow before the scale doubles.
    loss_scale_window: int = 1000
    # Overflows tolerated before the scale halves.
    hysteresis: int = 2
    # The scale never drops below this.
    min_loss_scale: float = 1.0
    auto_cast: bool = True


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
    def from_dict(cls, data: dict[str, Any]) -> Config:
        _check_keys("", data, list(cls._KNOWN))
        out = cls()
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
        ):
            if data.get(key) is not None:
                value = _typed("", key, data[key], int)
                if value < 1:
                    raise ConfigError(f"config key {key} must be >= 1, got {value}")
                setattr(out, key, value)
        if "optimizer" in data and data["optimizer"] is not None:
            section = data["optimizer"]
            _check_keys("optimizer", section, ["type", "params"])
            if "type" not in section:
                raise ConfigError('config key optimizer.type is missing (e.g. "Adam", "SGD")')
            out.optimizer = OptimizerConfig(
                type=_typed("optimizer.", "type", section["type"], str),
                params=dict(section.get("params", {})),
            )
        if "scheduler" in data and data["scheduler"] is not None:
            section = data["scheduler"]
            _check_keys("scheduler", section, ["type", "params"])
            if "type" not in section:
                raise ConfigError('config key scheduler.type is missing (e.g. "WarmupLR")')
            out.scheduler = SchedulerConfig(
                type=_typed("scheduler.", "type", section["type"], str),
                params=dict(section.get("params", {})),
            )
        if "gradient_clipping" in data:
            out.gradient_clipping = float(
                _typed("", "gradient_clipping", data["gradient_clipping"], (int, float))
            )
            if out.gradient_clipping < 0:
                raise ConfigError(f"gradient_clipping must be >= 0, got {out.gradient_clipping}")
        for key in ("bf16", "bfloat16"):
            if key in data:
                _check_keys(key, data[key], ["enabled", "immediate_grad_update"])
                out.bf16_enabled = bool(data[key].get("enabled", False))
        if "fp16" in data:
            _check_keys("fp16", data["fp16"], [f.name for f in fields(FP16Config)])
            out.fp16 = FP16Config(**data["fp16"])
        if out.fp16.enabled and out.bf16_enabled:
            raise ConfigError("bf16.enabled and fp16.enabled are both true; choose one")
        if "steps_per_print" in data:
            out.steps_per_print = _typed("", "steps_per_print", data["steps_per_print"], int)
        if "pipeline" in data:
            out.pipeline = PipelineConfig.from_dict(dict(data["pipeline"]))
        if "wall_clock_breakdown" in data:
            out.wall_clock_breakdown = bool(data["wall_clock_breakdown"])
        zero = data.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        if stage:
            raise ConfigError(
                f"zero_optimization.stage={stage} is not supported by stagewise's pipeline "
                "engine (DeepSpeed's pipeline engine supports only stages 0 and 1); remove it "
                "or set it to 0"
            )
        return out

    def resolve_batch(self, dp_world_size: int) -> tuple[int, int, int]:
        """``(train_batch_size, micro_batch_size, gradient_accumulation_steps)``.

        Raises:
            ConfigError: when the given sizes are inconsistent or too few are given.
        """
        train, micro, gas = (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        shown = (
            f"train_batch_size={train}, train_micro_batch_size_per_gpu={micro}, "
            f"gradient_accumulation_steps={gas}, data-parallel size={dp_world_size}"
        )
        if train is not None and micro is not None and gas is not None:
            if train != micro * gas * dp_world_size:
                raise ConfigError(
                    f"inconsistent batch sizes: {shown}; train_batch_size must equal "
                    f"micro x accumulation x data-parallel = {micro * gas * dp_world_size}"
                )
        elif train is not None and micro is not None:
            gas, rest = divmod(train, micro * dp_world_size)
            if rest or gas < 1:
                raise ConfigError(
                    f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                    f"of micro x data-parallel = {micro * dp_world_size}"
                )
        elif train is not None and gas is not None:
            micro, rest = divmod(train, gas * dp_world_size)
            if rest or micro < 1:
                raise ConfigError(
                    f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                    f"of accumulation x data-parallel = {gas * dp_world_size}"
                )
        elif micro is not None:
            gas = gas or 1
            train = micro * gas * dp_world_size
        elif train is not None:
            gas = 1
            micro, rest = divmod(train, dp_world_size)
            if rest or micro < 1:
                raise ConfigError(
                    f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                    f"of the data-parallel size {dp_world_size}"
                )
        else:
            raise ConfigError(
                f"give at least train_batch_size or train_micro_batch_size_per_gpu ({shown})"
            )
        train = micro * gas * dp_world_size
        return train, micro, gas
