"""Reading config values: known keys (with "did you mean"), typed values."""

from __future__ import annotations

import difflib
from typing import Any

from stagewise.errors import ConfigError

__all__ = ["check_keys", "typed"]


def check_keys(section: str, given: dict[str, Any], known: list[str]) -> None:
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
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(
            f"config key {section}{key} must be {names}, got {value!r} ({type(value).__name__})"
        )
    return value
