"""Asynchronous saves: the step copies its state to host memory, a thread writes and commits.

:class:`AsyncSaver` takes what :func:`~stagewise.checkpoint.save.capture`
copied and runs :func:`~stagewise.checkpoint.save.write_and_commit` in a
background thread, with collectives over a process group of its own (gloo, every
rank), so its votes never interleave with training's. The commit is the same
atomic rename as a synchronous save's: a kill at any point of it leaves the
previous checkpoint loadable and ``latest`` naming it.

The copies go into host buffers kept from one save to the next
(:class:`~stagewise.checkpoint.files.HostPool`, about one checkpoint's worth of
host memory per rank), so a save's copy does not allocate. One save is in flight at a time: :meth:`AsyncSaver.submit` first waits for the
previous one (and raises its error, if it failed), and so does the process at a
normal exit. After a failure (an uncaught exception, a dead peer) the exit does
not wait: the torn attempt is removed by the next commit.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from stagewise import teardown
from stagewise.checkpoint.files import HostPool, staging
from stagewise.checkpoint.save import capture, write_and_commit
from stagewise.checkpoint.state import CheckpointView
from stagewise.collectives import Collectives

__all__ = ["AsyncSaver"]

logger = logging.getLogger(__name__)


def _wait_at_exit(ref: weakref.ReferenceType[AsyncSaver]) -> None:
    saver = ref()
    if saver is not None:
        saver._at_exit()


class AsyncSaver:
    """Writes captured checkpoints in a background thread, one at a time.

    Args:
        collectives: bounded collectives over a process group of every rank that
            nothing else uses (its tensors on the CPU).
    """

    def __init__(self, collectives: Collectives) -> None:
        self.collectives = collectives
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._committed: str | None = None
        self._files: Mapping[str, Any] | None = None  # the objects being written
        self.pool = HostPool()
        atexit.register(_wait_at_exit, weakref.ref(self))

    @property
    def in_flight(self) -> bool:
        """Whether a save is being written now."""
        return self._thread is not None and self._thread.is_alive()

    def capture(self, view: CheckpointView, client_state: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`~stagewise.checkpoint.save.capture` into this saver's host buffers (waits
        for the save in flight first: its buffers are reused)."""
        self.wait()
        with staging(self.pool):
            return capture(view, client_state)

    def submit(
        self,
        view: CheckpointView,
        save_path: str,
        tag: str,
        files: Mapping[str, Any],
        save_latest: bool = True,
        keep_last: int = 0,
    ) -> None:
        """Write and commit ``files`` (this rank's captured share) in the background.

        Every rank submits its share of the same save. Waits for the previous save
        first, raising its error if it failed.
        """
        self.wait()
        self._files = files
        view = dataclasses.replace(view, collectives=self.collectives, device=torch.device("cpu"))
        self._thread = threading.Thread(
            target=self._write,
            args=(view, save_path, tag, files, save_latest, keep_last),
            name=f"stagewise-save-{tag}",
            daemon=True,  # never holds a failing process; a normal exit waits (see _at_exit)
        )
        self._thread.start()

    def _write(
        self,
        view: CheckpointView,
        save_path: str,
        tag: str,
        files: Mapping[str, Any],
        save_latest: bool,
        keep_last: int,
    ) -> None:
        try:
            self._committed = write_and_commit(view, save_path, tag, files, save_latest, keep_last)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def failed(self) -> bool:
        """Whether the last save finished with an error not yet raised (without waiting)."""
        return not self.in_flight and self._error is not None

    def wait(self) -> str | None:
        """Wait for the save in flight; the tag directory of the last commit (or None).

        Raises:
            CheckpointError, PeerError: the save in flight (or the last one) failed;
                the previous checkpoint is intact.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._files is not None:  # written: its buffers serve the next save's copy
            self.pool.give_back(self._files)
            self._files = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._committed

    def _at_exit(self) -> None:
        if teardown.is_failing() or self._thread is None:
            return
        try:
            self.wait()
        except Exception as exc:
            logger.error("the last asynchronous checkpoint was not saved: %s", exc)
