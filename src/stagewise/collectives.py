"""Collectives bounded in time: the one place stagewise waits on other ranks.

Every wait on another process (a point-to-point transfer, an all-reduce, a
broadcast, a checkpoint's vote) goes through :func:`wait_bounded`, so a peer
that died or stopped answering is reported within ``timeout_s`` seconds as a
:class:`~stagewise.errors.PeerError` naming who waited for what, never a hang.

:class:`Collectives` binds the timeout and the name of this rank once and offers
the few collectives the engine and the checkpoint code use. Without a process
group (a plain single-process test) every collective is the identity.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from stagewise.errors import PeerError

__all__ = ["Collectives", "wait_bounded"]


def wait_bounded(
    work: Any,
    timeout_s: float,
    who: str,
    what: str,
    hint: str = "the peer may have died or stopped answering",
) -> None:
    """Wait for a ``torch.distributed`` work object at most ``timeout_s`` seconds.

    Raises:
        PeerError: naming ``who`` waited for ``what``, when the peer closed its
            connection (it died) or nothing came in time (it hung).
    """
    try:
        done = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise PeerError(
            f"{who}: {what} failed: {exc}. {hint[:1].upper()}{hint[1:]} "
            f"(pipeline.timeout_s={timeout_s:g})"
        ) from exc
    if done is False:
        raise PeerError(
            f"{who}: {what} did not finish within pipeline.timeout_s={timeout_s:g} s; {hint}"
        )


class Collectives:
    """Bounded collectives of one rank.

    Args:
        timeout_s: the longest any one wait may take.
        who: this rank in error messages, e.g. ``"stage 1 (rank 3)"``.
        hint: what a failure most likely means, appended to its message.
    """

    def __init__(
        self,
        timeout_s: float,
        who: str,
        hint: str = "a peer may have died",
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.who = who
        self.hint = hint

    def with_hint(self, hint: str) -> Collectives:
        """The same collectives with another explanation of a failure."""
        return Collectives(self.timeout_s, self.who, hint)

    @property
    def active(self) -> bool:
        """Whether there is a process group of more than one rank to talk to."""
        return dist.is_initialized() and dist.get_world_size() > 1

    def wait(self, work: Any, what: str) -> None:
        """Wait for ``work`` (from any ``async_op=True`` call) within the timeout."""
        wait_bounded(work, self.timeout_s, self.who, what, self.hint)

    def all_reduce(
        self, tensor: torch.Tensor, what: str, group: Any = None, op: Any = None
    ) -> None:
        """``dist.all_reduce`` in place (sum unless ``op``), bounded by the timeout."""
        if not self.active:
            return
        reduce_op = op if op is not None else dist.ReduceOp.SUM
        self.wait(dist.all_reduce(tensor, op=reduce_op, group=group, async_op=True), what)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str, group: Any = None) -> None:
        """``dist.broadcast`` from global rank ``src``, bounded by the timeout."""
        if not self.active:
            return
        self.wait(dist.broadcast(tensor, src=src, group=group, async_op=True), what)

    def failed_ranks(self, failed: bool, what: str, device: torch.device) -> list[int]:
        """Share whether this rank failed; return every rank that did (all ranks call it)."""
        if not self.active:
            return [dist.get_rank() if dist.is_initialized() else 0] if failed else []
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
        flags[dist.get_rank()] = int(failed)
        self.all_reduce(flags, what)
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]
