"""The ``checkpoint`` section: periodic, rotating, optionally asynchronous saves; automatic resume.

stagewise's keys::

    "checkpoint": {
        "save_dir": "ckpt",       # where periodic checkpoints go (and resume looks)
        "every_steps": 100,       # save every this many optimizer steps (0: never)
        "keep_last": 3,           # keep the newest 3 complete periodic checkpoints (0: all)
        "async": true,            # copy to host memory, write and commit in the background
        "resume": "auto"          # initialize() loads the newest complete checkpoint
    }

DeepSpeed's own keys under ``checkpoint`` are accepted: ``tag_validation``
(``"Warn"``, ``"Ignore"``, ``"Fail"``; stagewise always checks that every rank
saves the same tag and fails on a mismatch), ``load_universal``,
``use_node_local_storage``, ``parallel_write`` (``{"pipeline_stage": bool}``;
stagewise always writes every stage's files in parallel) and ``writer``.
Those stagewise does not implement leave a warning in
:attr:`CheckpointConfig.warnings`, which the engine logs on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stagewise.config.keys import check_keys, typed
from stagewise.errors import ConfigError

__all__ = ["RESUME_MODES", "CheckpointConfig"]

RESUME_MODES = ("auto", "never")
_TAG_VALIDATION = ("WARN", "IGNORE", "FAIL")
_KEYS = [
    "save_dir",
    "every_steps",
    "keep_last",
    "async",
    "resume",
    "tag_validation",
    "load_universal",
    "use_node_local_storage",
    "parallel_write",
    "writer",
]


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` section (see the module doc for the keys)."""

    # Where periodic checkpoints are written and where "resume": "auto" looks.
    save_dir: str | None = None
    # Save every this many optimizer steps (0: no periodic saves).
    every_steps: int = 0
    # Keep the newest this many complete periodic checkpoints (global_step<N>) under
    # save_dir; older ones are deleted only after a newer one is committed. 0 keeps all.
    keep_last: int = 0
    # The config key "async": the saving step copies the state to host memory and
    # returns; a background thread writes and commits the files.
    async_save: bool = False
    # "auto": initialize() loads the newest complete checkpoint under save_dir, if any;
    # "never": start afresh (load_checkpoint still works).
    resume: str = "never"
    # DeepSpeed's; stagewise always fails when the ranks' tags differ.
    tag_validation: str = "Warn"
    # Messages about DeepSpeed keys that are accepted but not implemented.
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointConfig:
        check_keys("checkpoint", data, _KEYS)
        p = "checkpoint."
        out = cls()
        if data.get("save_dir") is not None:
            out.save_dir = typed(p, "save_dir", data["save_dir"], str)
            if not out.save_dir:
                raise ConfigError("config key checkpoint.save_dir must be a non-empty path")
        for key in ("every_steps", "keep_last"):
            if key in data:
                value = typed(p, key, data[key], int)
                if value < 0:
                    raise ConfigError(f"config key checkpoint.{key} must be >= 0, got {value}")
                setattr(out, key, value)
        out.async_save = typed(p, "async", data.get("async", False), bool)
        out.resume = typed(p, "resume", data.get("resume", "never"), str)
        if out.resume not in RESUME_MODES:
            raise ConfigError(
                f"config key checkpoint.resume must be one of {RESUME_MODES}, got {out.resume!r}"
            )
        for key, wanted in (("every_steps", out.every_steps > 0), ("resume", out.resume == "auto")):
            if wanted and out.save_dir is None:
                raise ConfigError(
                    f"config key checkpoint.{key}={data[key]!r} needs checkpoint.save_dir (the "
                    "directory to save into and resume from)"
                )
        out._read_deepspeed_keys(data)
        return out

    def _read_deepspeed_keys(self, data: dict[str, Any]) -> None:
        p = "checkpoint."
        mode = typed(p, "tag_validation", data.get("tag_validation", "Warn"), str)
        if mode.upper() not in _TAG_VALIDATION:
            raise ConfigError(
                f"config key checkpoint.tag_validation must be one of Warn, Ignore, Fail, got "
                f"{mode!r}"
            )
        self.tag_validation = mode
        if typed(p, "load_universal", data.get("load_universal", False), bool):
            self.warnings.append(
                "checkpoint.load_universal=true is not implemented: stagewise does not read "
                "DeepSpeed's universal checkpoints; its own checkpoints load on any number of "
                "stages without a conversion"
            )
        if typed(p, "use_node_local_storage", data.get("use_node_local_storage", False), bool):
            self.warnings.append(
                "checkpoint.use_node_local_storage=true is not implemented: every rank writes "
                "into save_dir, which every rank must see (one machine or a shared file system)"
            )
        if "parallel_write" in data:
            section = data["parallel_write"]
            check_keys("checkpoint.parallel_write", section, ["pipeline_stage"])
            typed(
                f"{p}parallel_write.", "pipeline_stage", section.get("pipeline_stage", False), bool
            )
        if "writer" in data:
            writer = data["writer"]
            check_keys(
                "checkpoint.writer", writer, list(writer) if isinstance(writer, dict) else []
            )
            self.warnings.append(
                "checkpoint.writer is not implemented and was ignored: use "
                '"checkpoint": {"async": true} for writes in the background'
            )
