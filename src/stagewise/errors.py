"""The exceptions stagewise raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "PeerError", "PipelineError"]


class PipelineError(RuntimeError):
    """Base class of stagewise's run-time errors."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class PeerError(PipelineError):
    """Another rank died, closed its connection or did not answer in time."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, torn or does not fit the model being loaded."""
