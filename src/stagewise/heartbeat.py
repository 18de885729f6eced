"""Heartbeats in the job's store: which ranks still answer, known when a wait fails.

A rank that died closes its sockets, but a rank that was stopped (SIGSTOP) or
hangs keeps them open: only a timeout catches it, and the timeout alone does not
say who is to blame. So every rank of an engine runs a small daemon thread that,
every ``interval_s`` seconds, bumps its own counter in the job's key-value store
(the one ``init_process_group`` used) and reads everyone's (two round trips),
noting when each counter last moved. When a wait on other ranks fails,
:func:`silent_ranks` names the ranks whose counter has not moved for three
beats, at once (the store may be gone by then: its host may be the rank that
failed); when none has been still that long yet (a peer that died a moment
ago), it watches five more beats. A large job beats less often
(``world_size / 200`` s), so the store serves about 400 reads a second. The
thread is stopped and joined at exit, before the interpreter finalizes: a daemon
thread coming back from a store call then would abort the process.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Heartbeat", "Silence", "active", "describe_rank", "silent_ranks", "start"]


@dataclass
class Silence:
    """What a probe found.

    Attributes:
        ranks: the ranks whose heartbeat stopped (this rank excluded).
        window_s: how long the stillest of them has been still.
        store_silent: the store itself stopped answering (no rank could be named).
    """

    ranks: list[int] = field(default_factory=list)
    window_s: float = 0.0
    store_silent: bool = False

    def describe(self, name: Callable[[int], str]) -> str:
        """A sentence naming the silent ranks, for an error message."""
        if self.store_silent:
            return (
                "the job's store did not answer either (its host, rank 0 or the torchrun agent, "
                "may be stopped or dead)"
            )
        if not self.ranks:
            return (
                f"no rank's heartbeat stopped within {self.window_s:.1f} s: the others are "
                "running (if none died, they did not reach this wait: do all ranks run the same "
                "steps?)"
            )
        names = ", ".join(name(r) for r in self.ranks)
        verb = "has" if len(self.ranks) == 1 else "have"
        return (
            f"not answering: {names} ({verb} sent no heartbeat for at least "
            f"{self.window_s:.1f} s: killed, stopped or hung)"
        )


class Heartbeat:
    """One rank's heartbeat thread and the probe of everyone's.

    Args:
        store: a ``torch.distributed`` store every rank shares.
        prefix: the keys' prefix, the same on every rank and new for each job.
        rank, world_size: this rank and the number of ranks.
        interval_s: seconds between two beats.
    """

    def __init__(
        self, store: Any, prefix: str, rank: int, world_size: int, interval_s: float = 0.5
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s
        self._keys = [f"{prefix}/{r}" for r in range(world_size)]
        now = time.monotonic()
        self._seen = [-1] * world_size
        self._moved = [now] * world_size  # when each counter last moved, as seen here
        self._observed = now  # when the counters were last read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="stagewise-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.add(self._keys[self.rank], 1)
        self._thread.start()

    def stop(self, wait_s: float = 0.0) -> None:
        """End the thread (waiting up to ``wait_s`` seconds for it to finish)."""
        self._stop.set()
        if wait_s > 0 and self._thread.is_alive():
            self._thread.join(wait_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(self._keys[self.rank], 1)
                self._observe()
            except Exception:  # the store is gone: the job is ending, nothing to report to
                return

    def _observe(self) -> None:
        if self.store.check(self._keys):
            values = [int(v) for v in self.store.multi_get(self._keys)]
        else:  # a rank that has not started yet: add(key, 0) reads without waiting
            values = [int(self.store.add(key, 0)) for key in self._keys]
        now = time.monotonic()
        for rank, value in enumerate(values):
            if value != self._seen[rank]:
                self._seen[rank] = value
                self._moved[rank] = now
        self._observed = now

    def _still(self, beats: float) -> list[int]:
        """The ranks whose counter had not moved for ``beats`` beats at the last reading."""
        limit = beats * self.interval_s
        return [
            r
            for r in range(self.world_size)
            if r != self.rank and self._observed - self._moved[r] > limit
        ]

    def probe(self) -> Silence:
        """The ranks still for three beats; if none yet, watch five more beats for one."""
        window = 5 * self.interval_s
        silent = self._still(3)
        deadline = time.monotonic() + window
        while not silent and time.monotonic() < deadline:
            time.sleep(self.interval_s / 2)
            silent = self._still(3)
        if not silent and time.monotonic() - self._observed > 2 * self.interval_s + 1:
            return Silence([], window, store_silent=True)
        still_for = max((self._observed - self._moved[r] for r in silent), default=window)
        return Silence(silent, still_for)


_current: Heartbeat | None = None
_names: Callable[[int], str] = lambda rank: f"rank {rank}"  # noqa: E731


def _stop_at_exit() -> None:
    # A daemon thread that comes back from a store call (C++) while the interpreter
    # finalizes is ended by Python inside that C++ frame: std::terminate, "terminate
    # called without an active exception". So the thread ends before finalization.
    if _current is not None:
        _current.stop(wait_s=_current.interval_s + 1.0)


def start(
    store: Any,
    prefix: str,
    rank: int,
    world_size: int,
    describe: Callable[[int], str] | None = None,
    interval_s: float | None = None,
) -> Heartbeat:
    """Start this process's heartbeat (replacing an earlier one) and name ranks with
    ``describe`` in messages. A large job beats less often (``world_size / 500`` s)."""
    global _current, _names
    if _current is None:
        atexit.register(_stop_at_exit)
    else:
        _current.stop()
    interval = interval_s if interval_s is not None else max(0.5, world_size / 200)
    beat = Heartbeat(store, prefix, rank, world_size, interval)
    beat.start()
    _current = beat
    if describe is not None:
        _names = describe
    return beat


def active() -> Heartbeat | None:
    """The running heartbeat, or None (no engine built, or a single process)."""
    return _current


def describe_rank(rank: int) -> str:
    """A rank as messages name it (``"stage 1 (rank 3)"`` once an engine is built)."""
    return _names(rank)


def silent_ranks() -> str | None:
    """A sentence naming the ranks not answering, or None without a heartbeat."""
    beat = _current
    if beat is None or beat.world_size < 2:
        return None
    try:
        return beat.probe().describe(_names)
    except Exception as exc:  # a probe is a help for a message, never a second failure
        return f"(could not read the heartbeats: {type(exc).__name__}: {exc})"
