"""Reading config values: known keys (with "did you mean"), typed values.

:func:`check_keys` keeps the keys a section knows and reports the others to the
report that :func:`reports_keys` opens around ``Config.from_dict``: a key
DeepSpeed reads that stagewise does not act on is *not implemented*, any other
key is *unknown* (see :mod:`stagewise.config.deepspeed_keys`). The report turns
them into warnings (``Config.notices``; the engine logs them on rank 0), or,
with ``"strict_config": true``, into one :class:`~stagewise.errors.ConfigError`.
Without an open report (a section parsed on its own), an unknown key is an error.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from stagewise.config.deepspeed_keys import deepspeed_keys, is_harmless
from stagewise.errors import ConfigError

__all__ = ["STRICT_KEY", "KeyReport", "check_booleans", "check_keys", "reports_keys", "typed"]

#: The top-level key that makes every key stagewise does not act on an error.
STRICT_KEY = "strict_config"

_T = TypeVar("_T")


@dataclass
class KeyReport:
    """The keys one config carries that stagewise does not act on."""

    strict: bool = False
    unimplemented: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def notices(self) -> list[str]:
        """One warning for the DeepSpeed keys not implemented, one per unknown key."""
        out = []
        if self.unimplemented:
            out.append(
                "config keys that DeepSpeed reads but stagewise does not implement (ignored): "
                + ", ".join(sorted(self.unimplemented))
            )
        out += [f"{text} (ignored)" for text in self.unknown]
        return out

    def raise_if_strict(self) -> None:
        if not self.strict or not (self.unimplemented or self.unknown):
            return
        parts = list(self.unknown)
        if self.unimplemented:
            parts.append(
                "config keys that stagewise does not implement: "
                + ", ".join(sorted(self.unimplemented))
            )
        raise ConfigError(
            "; ".join(parts) + f' (an error because the config sets "{STRICT_KEY}": true)'
        )


_REPORT: contextvars.ContextVar[KeyReport | None] = contextvars.ContextVar(
    "stagewise_config_report", default=None
)


def _unknown_message(section: str, key: str, known: Iterable[str]) -> str:
    candidates = sorted(set(known) | deepspeed_keys(section))
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if not section:  # the top level's keys are too many to list
        return f"unknown config key {key!r}{hint}"
    return (
        f"unknown config key {section + '.' + key!r}{hint} (keys of {section}: "
        f"{', '.join(candidates)})"
    )


def check_keys(section: str, given: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """The entries of ``given`` whose keys ``section`` knows; the others are reported.

    Raises:
        ConfigError: ``given`` is not a dict, or (with no report open) a key is unknown.
    """
    if not isinstance(given, dict):
        where = section or "the config"
        raise ConfigError(f"config section {where} must be a JSON object, got {given!r}")
    known = list(known)
    report = _REPORT.get()
    kept = {}
    for key, value in given.items():
        if key in known:
            kept[key] = value
            continue
        if report is None:
            raise ConfigError(_unknown_message(section, key, known))
        if key in deepspeed_keys(section):
            if not is_harmless(section, key, value):
                report.unimplemented.append(f"{section}.{key}" if section else key)
        else:
            report.unknown.append(_unknown_message(section, key, known))
    return kept


def reports_keys(from_dict: Callable[..., _T]) -> Callable[..., _T]:
    """Open a :class:`KeyReport` around a ``from_dict(cls, data)``; set the result's notices.

    ``data[STRICT_KEY]`` (a bool) makes the report an error.
    """

    @functools.wraps(from_dict)
    def wrapper(cls: Any, data: dict[str, Any], *args: Any, **kwargs: Any) -> _T:
        strict = data.get(STRICT_KEY, False) if isinstance(data, dict) else False
        if not isinstance(strict, bool):
            raise ConfigError(f"config key {STRICT_KEY} must be true or false, got {strict!r}")
        report = KeyReport(strict=strict)
        token = _REPORT.set(report)
        try:
            out = from_dict(cls, data, *args, **kwargs)
        finally:
            _REPORT.reset(token)
        report.raise_if_strict()
        out.notices = report.notices()  # type: ignore[attr-defined]
        return out

    return wrapper


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
