"""How a stagewise process ends: cleanly after success, at once after a failure.

Two problems at exit, both seen under torchrun:

* A script that never calls ``destroy_process_group`` sometimes aborts after a
  successful run with "terminate called without an active exception". Cause: a
  gloo worker thread still holds the last collective's work object; when it lets
  go during interpreter shutdown it releases a tensor whose Python object needs
  the GIL, Python ends a thread that asks for the GIL while finalizing
  (``pthread_exit``), and the forced unwind through gloo's C++ frame calls
  ``std::terminate``. Destroying the process group while the interpreter is
  still whole (an ``atexit`` hook) joins those threads first.
* After a failure, tearing the group down can wait forever: a collective
  whose peer died or was stopped never drains from gloo's queue, and the
  destructor waits for it. A process that raised must exit on its own.

:func:`install` (called by :func:`~stagewise.init_distributed` and by every
engine) registers both fixes: after an uncaught exception the process flushes
its output and leaves with ``os._exit(1)`` without touching the group;
otherwise the group is destroyed, under a watchdog that ends the process if
that does not finish within ``grace_s`` seconds (exit code 1 when stagewise
reported a peer's failure in this process, else 0).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import Any

import torch.distributed as dist

__all__ = ["failed", "install", "is_failing", "note_failure"]

_state: dict[str, Any] = {
    "installed": False,
    "uncaught": False,
    "failure": None,
    "grace_s": 10.0,
    "linger_s": 0.0,
}


def note_failure(reason: str) -> None:
    """Record that this process saw the group fail (a peer died or stopped answering)."""
    if _state["failure"] is None:
        _state["failure"] = reason


def failed() -> str | None:
    """Why the group failed in this process, or None."""
    failure: str | None = _state["failure"]
    return failure


def is_failing() -> bool:
    """Whether the process is ending because of an uncaught exception or a failed group."""
    return _uncaught() or _state["failure"] is not None


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    _state["uncaught"] = True
    _state["previous_hook"](kind, value, tb)


def _flush() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing left to flush
            pass


def _uncaught() -> bool:
    """Whether an uncaught exception ends this script (our hook saw it, or Python recorded
    it in ``sys.last_value`` before the exit hooks, where another hook replaced ours)."""
    if _state["uncaught"]:
        return True
    interactive = bool(sys.flags.interactive) or "IPython" in sys.modules
    return not interactive and getattr(sys, "last_value", None) is not None


def _at_exit() -> None:
    if not dist.is_initialized():
        return
    if _uncaught():
        _flush()
        time.sleep(_state["linger_s"])  # the store's host: let the others read it a moment
        os._exit(1)
    code = 0 if _state["failure"] is None else 1

    def give_up() -> None:
        print(
            f"stagewise: destroying the process group took over {_state['grace_s']:g} s; "
            f"exiting without it (exit code {code})",
            file=sys.stderr,
        )
        _flush()
        os._exit(code)

    watchdog = threading.Timer(_state["grace_s"], give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        dist.destroy_process_group()
    except Exception:  # already torn down, or broken: the process ends either way
        pass
    finally:
        watchdog.cancel()


def install(grace_s: float | None = None, linger_s: float | None = None) -> None:
    """Register the exit hooks once per process (later calls only update the settings).

    Args:
        grace_s: the longest a clean teardown may take before the process just exits.
        linger_s: how long a failing process waits before it exits: the one hosting
            the job's store gives the others a moment to read the heartbeats.
    """
    if grace_s is not None:
        _state["grace_s"] = float(grace_s)
    if linger_s is not None:
        _state["linger_s"] = float(linger_s)
    if _state["installed"]:
        return
    _state["installed"] = True
    _state["previous_hook"] = sys.excepthook
    sys.excepthook = _excepthook
    atexit.register(_at_exit)
