"""The ``checkpoint`` section: periodic, rotating, optionally asynchronous saves; automatic resume.

stagewise's keys::

    "checkpoint": {
        "save_dir": "ckpt",       # where periodic checkpoints go (and resume looks)
        "every_steps": 100,       # save every this many optimizer steps (0: never)
        "keep_last": 3,           # keep the newest 3 complete periodic checkpoints (0: all)
        "async": true,            # copy to host memory, write and commit in the background
        "resume": "auto"          # initialize() loads the newest complete checkpoint
    }

DeepSpeed's own keys under ``checkpoint`` are accepted. ``tag_validation``
(``"Warn"``, ``"Ignore"``, ``"Fail"``) and ``parallel_write``
(``{"pipeline_stage": bool}``) are read and checked: stagewise always checks that
every rank saves the same tag (a mismatch fails), and always writes every stage's
files in parallel. ``load_universal`` and ``use_node_local_storage`` at their
default (false) and ``checkpoint_serialization`` at its (true) ask for nothing
stagewise lacks; otherwise they, and ``writer``, are reported as not implemented
(one warning on rank 0, an error with ``"strict_config": true``;
:mod:`stagewise.config.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    "parallel_write",
]
# DeepSpeed's keys whose default asks for what stagewise does anyway
_DEFAULTS = {
    "load_universal": False,
    "use_node_local_storage": False,
    "checkpoint_serialization": True,
}


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

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointConfig:
        if isinstance(data, dict):  # defaults that ask for nothing are not reported
            data = {k: v for k, v in data.items() if not (k in _DEFAULTS and v is _DEFAULTS[k])}
        data = check_keys("checkpoint", data, _KEYS)
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
        if "parallel_write" in data:
            section = check_keys(
                "checkpoint.parallel_write", data["parallel_write"], ["pipeline_stage"]
            )
            typed(
                f"{p}parallel_write.", "pipeline_stage", section.get("pipeline_stage", False), bool
            )
