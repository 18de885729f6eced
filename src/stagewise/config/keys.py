"""Reading config values: known keys (with "did you mean"), typed values."""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["check_booleans", "check_keys", "typed"]


def check_keys(section: str, given: Any, known: list[str]) -> None:
    if not isinstance(given, dict):
        what = f"config section {section!r}" if section else "the config"
        raise ConfigError(
            f"{what} must be a JSON object of its keys ({{...}}), got {given!r} "
            f"({type(given).__name__})"
        )
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"{section}." if section else ""
            raise ConfigError(
                f"unknown config key {where}{key!r}{hint} (known keys of "
                f"{section or 'the config'}: {', '.join(sorted(known))})"
            )


def typed(section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"config key {section}{key} must be a number, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(
            f"config key {section}{key} must be true or false (a JSON boolean), got {value!r} "
            f"({type(value).__name__})"
        )
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(
            f"config key {section}{key} must be {names}, got {value!r} ({type(value).__name__})"
        )
    return value


def check_booleans(section: str, obj: Any) -> None:
    """Every field of the dataclass ``obj`` annotated ``bool`` holds a bool (None where the
    annotation allows it): ``"false"`` is an error, never read as true."""
    for f in fields(obj):
        kind = str(f.type).replace(" ", "")
        if kind in ("bool", "bool|None", "None|bool"):
            value = getattr(obj, f.name)
            if value is None and kind != "bool":
                continue
            typed(section, f.name, value, bool)
