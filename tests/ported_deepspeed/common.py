"""``DistributedTest``: DeepSpeed's multi-process test base, over ``tests/distributed.py``.

DeepSpeed's pipeline tests are classes with a ``world_size`` whose ``test*``
methods run on every rank of a fresh process group. Here each such method is
wrapped when the class is defined: pytest resolves its fixtures in the test
process, then :func:`distributed.run_distributed` runs the original method on
``world_size`` gloo ranks (one thread each, bounded in time) and re-raises any
rank's failure.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from distributed import run_distributed

__all__ = ["DistributedTest"]

TIMEOUT_S = 300.0


def _run_method(rank: int, world_size: int, cls: type, name: str, kwargs: dict[str, Any]) -> None:
    getattr(cls(), f"_original_{name}")(**kwargs)


def _distributed(cls: type, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, **kwargs: Any) -> None:
        run_distributed(
            _run_method, cls.world_size, type(self), name, kwargs, timeout=cls.timeout_s
        )

    wrapper.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return wrapper


class DistributedTest:
    """Subclass it, set ``world_size``; every ``test*`` method runs on that many ranks."""

    world_size: ClassVar[int] = 2
    timeout_s: ClassVar[float] = TIMEOUT_S

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, method in list(vars(cls).items()):
            if name.startswith("test") and callable(method):
                setattr(cls, f"_original_{name}", method)
                setattr(cls, name, _distributed(cls, name, method))
