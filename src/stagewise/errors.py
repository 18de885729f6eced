"""The exceptions stagewise raises for problems a user can fix."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InstructionError",
    "NonFiniteError",
    "PeerError",
    "PipelineError",
    "PlanError",
]


class PipelineError(RuntimeError):
    """Base class of stagewise's run-time errors."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class PlanError(ValueError):
    """The planner cannot plan: a budget nothing fits, costs of another model, no devices.

    The message names the values and what to change.
    """


class PeerError(PipelineError):
    """Another rank died, closed its connection or did not answer in time."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, torn or does not fit the model being loaded."""


class NonFiniteError(PipelineError):
    """A loss or the gradient norm became NaN or infinite (``pipeline.nonfinite="error"``).

    The message names the step, the stage and (for a loss) the micro-batch.
    """


class InstructionError(PipelineError):
    """An instruction of a schedule failed on some rank.

    The message names the rank, the stage, the step and the instruction, and shows
    the schedule's grid with the instruction marked; the original exception is
    ``original`` (and ``__cause__``).
    """

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original
