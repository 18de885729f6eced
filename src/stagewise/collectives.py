"""Collectives bounded in time: the one place stagewise waits on other ranks.

Every wait on another process (a point-to-point transfer, an all-reduce, a
broadcast, a checkpoint's vote) goes through :func:`wait_bounded`, so a peer
that died or stopped answering is reported within ``timeout_s`` seconds as a
:class:`~stagewise.errors.PeerError` naming who waited for what, never a hang.
A rank that was stopped (SIGSTOP) keeps its sockets open, so only the timeout
catches it; the message then names the ranks that stopped answering, found by
their heartbeats (:mod:`stagewise.heartbeat`, a probe of about 1.5 s after the
failure), and the process is marked as failed for its exit
(:mod:`stagewise.teardown`).

:class:`Collectives` binds the timeout, the name of this rank and, optionally,
a process group once and offers the few collectives the engine and the
checkpoint code use. Without a process group (a plain single-process test)
every collective is the identity.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from stagewise import heartbeat, teardown
from stagewise.errors import PeerError

__all__ = ["Collectives", "peer_failure", "wait_bounded"]


def peer_failure(who: str, what: str, cause: str, hint: str, timeout_s: float) -> PeerError:
    """The error for a failed wait: who waited for what, why, and who is not answering."""
    silent = heartbeat.silent_ranks()
    named = f" {silent[:1].upper()}{silent[1:]}." if silent else ""
    message = f"{who}: {what} {cause}.{named} {hint[:1].upper()}{hint[1:]} (pipeline.timeout_s={timeout_s:g})"
    teardown.note_failure(message)
    return PeerError(message)


def wait_bounded(
    work: Any,
    timeout_s: float,
    who: str,
    what: str,
    hint: str = "the peer may have died or stopped answering",
    peers: Callable[[], str] | None = None,
) -> None:
    """Wait for a ``torch.distributed`` work object at most ``timeout_s`` seconds.

    ``peers``, called only after a failure, names the other ranks of the collective.

    Raises:
        PeerError: naming ``who`` waited for ``what`` (with whom) and the ranks that
            stopped answering, when the peer closed its connection (it died) or nothing
            came in time (it hung or was stopped).
    """
    try:
        done = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        what = what + (peers() if peers is not None else "")
        raise peer_failure(who, what, f"failed: {exc}", hint, timeout_s) from exc
    if done is False:
        what = what + (peers() if peers is not None else "")
        raise peer_failure(
            who, what, f"did not finish within pipeline.timeout_s={timeout_s:g} s", hint, timeout_s
        )


def _with(group: Any) -> str:
    """`` with <the group's other ranks>`` for a message ("" for every rank)."""
    try:
        world, me = dist.get_world_size(), dist.get_rank()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    except Exception:  # the group is gone: the message goes without the names
        return ""
    others = [r for r in ranks if r != me]
    if len(ranks) == world and world > 2:
        return f" with all {len(others)} other ranks"
    return " with " + ", ".join(heartbeat.describe_rank(r) for r in others)


class Collectives:
    """Bounded collectives of one rank.

    Args:
        timeout_s: the longest any one wait may take.
        who: this rank in error messages, e.g. ``"stage 1 (rank 3)"``.
        hint: what a failure most likely means, appended to its message.
        group: the process group of collectives called without one (default: every
            rank). Its ranks must be every rank of the job (``failed_ranks`` counts them).
    """

    def __init__(
        self,
        timeout_s: float,
        who: str,
        hint: str = "a peer may have died",
        group: Any = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.who = who
        self.hint = hint
        self.group = group

    def with_hint(self, hint: str) -> Collectives:
        """The same collectives with another explanation of a failure."""
        return Collectives(self.timeout_s, self.who, hint, self.group)

    def with_group(self, group: Any) -> Collectives:
        """The same collectives over ``group`` (a group of every rank, e.g. a gloo one)."""
        return Collectives(self.timeout_s, self.who, self.hint, group)

    @property
    def active(self) -> bool:
        """Whether there is a process group of more than one rank to talk to."""
        return dist.is_initialized() and dist.get_world_size() > 1

    def wait(self, work: Any, what: str, group: Any = None) -> None:
        """Wait for ``work`` (from any ``async_op=True`` call on ``group``) within the timeout."""
        wait_bounded(work, self.timeout_s, self.who, what, self.hint, lambda: _with(group))

    def all_reduce(
        self, tensor: torch.Tensor, what: str, group: Any = None, op: Any = None
    ) -> None:
        """``dist.all_reduce`` in place (sum unless ``op``), bounded by the timeout."""
        if not self.active:
            return
        reduce_op = op if op is not None else dist.ReduceOp.SUM
        group = group if group is not None else self.group
        self.wait(dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True), what, group)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str, group: Any = None) -> None:
        """``dist.broadcast`` from global rank ``src``, bounded by the timeout."""
        if not self.active:
            return
        group = group if group is not None else self.group
        self.wait(dist.broadcast(tensor, src=src, group=group, async_op=True), what, group)

    def failed_ranks(self, failed: bool, what: str, device: torch.device) -> list[int]:
        """Share whether this rank failed; return every rank that did (all ranks call it)."""
        if not self.active:
            return [dist.get_rank() if dist.is_initialized() else 0] if failed else []
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        flags[dist.get_rank()] = int(failed)
        self.all_reduce(flags, what)
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]
