"""The config's sections: ``pipeline``, ``optimizer``, ``scheduler``, ``fp16``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from stagewise.config.keys import check_booleans, check_keys, typed
from stagewise.errors import ConfigError
from stagewise.schedule.registry import ScheduleChoice

__all__ = ["FP16Config", "OptimizerConfig", "PipelineConfig", "SchedulerConfig"]


@dataclass
class PipelineConfig:
    """The ``pipeline`` section."""

    # Which schedule trains: "1f1b" (DeepSpeed's TrainSchedule), "gpipe",
    # "interleaved", "zb-h1", "zb-h2", "zbv" or "dualpipev" (the registry's names;
    # checked and read as a ScheduleChoice, `choice`).
    schedule: str = "1f1b"
    # Model chunks per stage for "interleaved" (default 2); "zbv" and "dualpipev" run 2.
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
    # A non-finite loss or gradient norm (fp32, bf16): "error" raises, naming the step,
    # the stage and the micro-batch; "skip" skips that optimizer step on every rank
    # alike and counts it in skipped_steps. fp16's loss scaler does its own.
    nonfinite: str = "error"
    # DeepSpeed splits activations (gradients) over tensor-parallel slices between
    # stages; here they travel whole. True with a model axis is an error; absent
    # (DeepSpeed's default, true) or false: whole, with the same results.
    pipe_partitioned: bool | None = None
    grad_partitioned: bool | None = None
    # DeepSpeed's other pipeline keys (stages, partition, use_reentrant) are accepted
    # and reported: config/deepspeed_keys.py.

    @property
    def choice(self) -> ScheduleChoice:
        """The training schedule and its chunk count, as a value."""
        return ScheduleChoice.parse(self.schedule, self.virtual_stages)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        out = cls(**check_keys("pipeline", data, [f.name for f in fields(cls)]))
        p = "pipeline."
        check_booleans(p, out)
        if typed(p, "nonfinite", out.nonfinite, str) not in ("error", "skip"):
            raise ConfigError(
                f"pipeline.nonfinite must be 'error' or 'skip', got {out.nonfinite!r}"
            )
        typed(p, "schedule", out.schedule, str)
        if out.virtual_stages is not None:
            typed(p, "virtual_stages", out.virtual_stages, int)
        try:
            out.schedule = ScheduleChoice.parse(out.schedule, out.virtual_stages).name
        except ValueError as exc:
            raise ConfigError(f"pipeline.schedule / pipeline.virtual_stages: {exc}") from None
        typed(p, "timeout_s", out.timeout_s, (int, float))
        if out.virtual_stages is not None and (
            typed(p, "virtual_stages", out.virtual_stages, int) < 1
        ):
            raise ConfigError(f"pipeline.virtual_stages must be >= 1, got {out.virtual_stages}")
        if typed(p, "p2p_match", out.p2p_match, str) not in ("order", "tags"):
            raise ConfigError(
                f"pipeline.p2p_match must be 'order' or 'tags', got {out.p2p_match!r}"
            )
        if out.timeout_s <= 0:
            raise ConfigError(f"pipeline.timeout_s must be > 0, got {out.timeout_s}")
        if out.activation_checkpoint_interval is not None:
            typed(p, "activation_checkpoint_interval", out.activation_checkpoint_interval, int)
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
