"""Transfers between pipeline stages, matched by order alone (as NCCL matches them).

:class:`Links` moves messages (:mod:`~stagewise.engine.wire`) between this rank
and its neighbours. Each *direction* of each link (an ordered pair of ranks) has
a process group of its own, so the messages of one direction are matched purely
by the order in which they are issued: NCCL ignores tags and serialises the
sends and receives of one communicator, and two directions sharing one would
wait on each other. Tags are kept (``pipeline.p2p_match = "tags"``) only as a
debugging aid on gloo; by default (``"order"``) every message goes with tag 0,
on gloo as on NCCL, so every multi-process test runs the order-only mode.

:class:`Transfers` is what the engine's handlers call. It knows each chunk's
channels from the pure route table (:mod:`stagewise.schedule.routes`) and posts
receives *ahead* of their instructions (gloo moves a message only once its
receive is posted, and a receive posted late costs a round trip to a busy
sender), but only ever the next one of each link, in the link's program order.
The schedule checker guarantees that the k-th send on a link meets the k-th
receive, so posting in program order never matches a message to the wrong
receive, whatever the transport does with tags.

Sends are asynchronous (the buffer is kept alive until the send completes);
receives block, but every wait is bounded by ``timeout_s`` and a peer that died
or went silent raises :class:`~stagewise.errors.PeerError` naming it.
Transfers between two chunks of the same stage (a V schedule's turn) go
through a local queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stagewise.collectives import peer_failure, wait_bounded
from stagewise.engine.state import Key
from stagewise.engine.wire import (
    FLAG_META_FOLLOWS,
    META_LEN,
    TensorMeta,
    decode_meta,
    encode_meta,
    metas_of,
    pack,
    payload_size,
    read_flag,
    stale_message,
    unpack,
)
from stagewise.errors import PeerError, PipelineError
from stagewise.schedule import PipeInstruction, RecvActivation, RecvGrad
from stagewise.schedule.routes import Channel, ChunkRoutes

__all__ = ["MATCH_MODES", "Links", "Transfers"]

MATCH_MODES = ("order", "tags")


@dataclass
class _Posted:
    """A receive posted ahead of its instruction."""

    grad: bool
    tag: int
    work: Any
    flat: torch.Tensor
    metas: tuple[TensorMeta, ...]


class Links:
    """Messages between this rank and its pipeline neighbours.

    Args:
        rank: this process's global rank.
        device: where received tensors live.
        timeout_s: the longest any single wait may take.
        groups: ``(src, dst) -> process group`` for every direction this rank sends
            or receives on (built collectively by the engine).
        match: ``"order"`` (every message with tag 0) or ``"tags"`` (the route's tags).
        describe: names a global rank for error messages (``"stage 1 (rank 3)"``).
    """

    def __init__(
        self,
        rank: int,
        device: torch.device,
        timeout_s: float,
        groups: Mapping[tuple[int, int], Any],
        match: str = "order",
        describe: Callable[[int], str] = lambda r: f"rank {r}",
    ) -> None:
        if match not in MATCH_MODES:
            raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.describe = describe
        self._groups = dict(groups)
        self._use_tags = match == "tags"
        self._metas: dict[tuple[str, int, int], tuple[TensorMeta, ...]] = {}
        self._local: dict[int, deque[list[torch.Tensor]]] = {}
        self._posted: dict[int, _Posted] = {}  # source rank -> its link's posted receive
        self._pending: list[tuple[Any, torch.Tensor, int, str]] = []

    # -- the wire ----------------------------------------------------------------------
    def _group(self, src: int, dst: int) -> Any:
        group = self._groups.get((src, dst))
        if group is None:
            raise PipelineError(
                f"{self.describe(self.rank)}: no link from rank {src} to rank {dst}; the "
                "route table and the engine's process groups disagree"
            )
        return group

    def _wait(self, work: Any, peer: int, what: str) -> None:
        wait_bounded(
            work, self.timeout_s, self.describe(self.rank), f"{what} {self.describe(peer)}"
        )

    def _refused(self, exc: RuntimeError, peer: int, what: str) -> PeerError:
        """A transfer the transport refused at once (the peer's connection is closed)."""
        return peer_failure(
            self.describe(self.rank), f"{what} {self.describe(peer)}", f"failed: {exc}",
            "the peer has died or closed its connection", self.timeout_s,
        )  # fmt: skip

    def _isend(self, flat: torch.Tensor, dst: int, tag: int, what: str) -> None:
        group = self._group(self.rank, dst)
        try:
            work = dist.isend(flat, dst=dst, group=group, tag=tag if self._use_tags else 0)
        except RuntimeError as exc:
            raise self._refused(exc, dst, what) from exc
        self._pending.append((work, flat, dst, what))
        if len(self._pending) > 64:
            self.flush(keep_last=16)

    def _irecv(self, flat: torch.Tensor, src: int, tag: int) -> Any:
        group = self._group(src, self.rank)
        try:
            return dist.irecv(flat, src=src, group=group, tag=tag if self._use_tags else 0)
        except RuntimeError as exc:
            raise self._refused(exc, src, "receiving from") from exc

    def _recv(self, flat: torch.Tensor, src: int, tag: int, what: str) -> None:
        self._wait(self._irecv(flat, src, tag), src, what)

    def flush(self, keep_last: int = 0) -> None:
        """Wait for the sends issued so far (all but the ``keep_last`` newest)."""
        while len(self._pending) > keep_last:
            work, _flat, peer, what = self._pending.pop(0)
            self._wait(work, peer, what)

    def _take_posted(self, src: int, grad: bool, tag: int) -> _Posted | None:
        posted = self._posted.get(src)
        if posted is None:
            return None
        if posted.grad != grad or posted.tag != tag:
            raise PipelineError(
                f"{self.describe(self.rank)}: the receive posted ahead on the link from "
                f"{self.describe(src)} is for {'gradients' if posted.grad else 'activations'} "
                f"on channel {posted.tag}, but {'gradients' if grad else 'activations'} on "
                f"channel {tag} are wanted: receives must run in the order they were planned"
            )
        del self._posted[src]
        return posted

    # -- activations: tuples of any dtype, with metadata when the shapes change ------
    def send_tensors(self, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
        """Send ``tensors`` to ``dst`` on channel ``tag`` without waiting."""
        if dst == self.rank:
            self._local.setdefault(tag, deque()).append([t.detach() for t in tensors])
            return
        key = ("send", dst, tag)
        known = self._metas.get(key)
        metas = metas_of(tensors)
        what = "sending activations to"
        if known is not None and known != metas:
            self._isend(stale_message(known, self.device), dst, tag, what)
        if known != metas:
            self._isend(encode_meta(metas).to(self.device), dst, tag, what)
            self._metas[key] = metas
        self._isend(pack(tensors), dst, tag, what)

    def post_tensors(self, src: int, tag: int) -> bool:
        """Post the next activation receive of a channel ahead of its instruction.

        Possible once the channel's layout is known (its first message carries it);
        at most one receive per link is posted ahead. Returns whether one is posted.
        """
        metas = self._metas.get(("recv", src, tag))
        if src == self.rank or metas is None or src in self._posted:
            return src in self._posted
        flat = torch.empty(payload_size(metas), dtype=torch.uint8, device=self.device)
        self._posted[src] = _Posted(False, tag, self._irecv(flat, src, tag), flat, metas)
        return True

    def recv_tensors(self, src: int, tag: int) -> list[torch.Tensor]:
        """Receive a tuple of tensors from ``src`` on channel ``tag`` (blocking, bounded)."""
        if src == self.rank:
            return [t.clone() for t in self._pop_local(tag, "receive")]
        what = "receiving activations from"
        key = ("recv", src, tag)
        posted = self._take_posted(src, False, tag)
        if posted is not None:
            flat, metas = posted.flat, posted.metas
            self._wait(posted.work, src, what)
        else:
            metas = self._metas.get(key) or self._recv_meta(src, tag, what)
            flat = torch.empty(payload_size(metas), dtype=torch.uint8, device=self.device)
            self._recv(flat, src, tag, what)
        if read_flag(flat) == FLAG_META_FOLLOWS:
            metas = self._recv_meta(src, tag, what)
            flat = torch.empty(payload_size(metas), dtype=torch.uint8, device=self.device)
            self._recv(flat, src, tag, what)
        self._metas[key] = metas
        return unpack(flat, metas)

    def _recv_meta(self, src: int, tag: int, what: str) -> tuple[TensorMeta, ...]:
        encoded = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
        self._recv(encoded, src, tag, what)
        return decode_meta(encoded.cpu())

    def _pop_local(self, tag: int, what: str) -> list[torch.Tensor]:
        """The oldest tensors this rank sent itself on channel ``tag`` (a V schedule's turn)."""
        queue = self._local.get(tag)
        if not queue:
            raise PeerError(
                f"{self.describe(self.rank)}: {what} from itself on channel {tag} before the "
                "matching send; the schedule orders them wrongly"
            )
        return list(queue.popleft())

    # -- gradients: layout known from the activation they belong to ------------------
    def send_grads(self, grads: Sequence[torch.Tensor], dst: int, tag: int) -> None:
        """Send gradients (one per floating-point activation) without waiting."""
        if dst == self.rank:
            self._local.setdefault(tag, deque()).append([g.detach() for g in grads])
            return
        if grads:
            self._isend(pack(grads, header=False), dst, tag, "sending gradients to")

    def post_grads(self, like: Sequence[torch.Tensor], src: int, tag: int) -> bool:
        """Post the next gradient receive of a channel (shaped like ``like``) ahead of time."""
        if src == self.rank or not like or src in self._posted:
            return src in self._posted
        metas = metas_of(like)
        flat = torch.empty(payload_size(metas, header=0), dtype=torch.uint8, device=self.device)
        self._posted[src] = _Posted(True, tag, self._irecv(flat, src, tag), flat, metas)
        return True

    def recv_grads(self, like: Sequence[torch.Tensor], src: int, tag: int) -> list[torch.Tensor]:
        """Receive gradients shaped like ``like`` from ``src`` (blocking, bounded)."""
        if src == self.rank:
            return self._pop_local(tag, "gradient receive")
        if not like:
            return []
        what = "receiving gradients from"
        metas = metas_of(like)
        posted = self._take_posted(src, True, tag)
        if posted is not None:
            if posted.metas != metas:
                raise PeerError(
                    f"{self.describe(self.rank)}: a gradient receive was posted for shapes "
                    f"{[m.shape for m in posted.metas]} but {[t.shape for t in like]} are "
                    "expected; gradients must come back in the order the schedule planned"
                )
            self._wait(posted.work, src, what)
            return unpack(posted.flat, metas, header=False)
        flat = torch.empty(payload_size(metas, header=0), dtype=torch.uint8, device=self.device)
        self._recv(flat, src, tag, what)
        return unpack(flat, metas, header=False)


def floating(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an activation (a tensor or a tuple): what has gradients."""
    values = value if isinstance(value, tuple) else (value,)
    return [t for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()]


class Transfers:
    """The transfers of one stage: channels from the route table, receives posted in order.

    Args:
        links: the messages themselves.
        routes: this stage's routes, one per chunk (:func:`~stagewise.schedule.routes.stage_routes`).
        rank_of_stage: the global rank of a stage of this rank's pipeline.
    """

    def __init__(
        self,
        links: Links,
        routes: list[ChunkRoutes],
        rank_of_stage: Callable[[int], int],
    ) -> None:
        self.links = links
        self.routes = routes
        self.rank_of_stage = rank_of_stage
        # per source rank: the receives of this batch, in program order: (grad?, tag, key)
        self._plan: dict[int, deque[tuple[bool, int, Key]]] = {}
        self._outputs: Mapping[Key, Any] = {}

    def _peer(self, channel: Channel | None, instr: PipeInstruction) -> tuple[int, int]:
        if channel is None:
            chunk = self.routes[getattr(instr, "chunk_id", 0)]
            raise PipelineError(
                f"{instr!r} on virtual stage {chunk.virtual} has no peer (it is "
                f"{'the first' if chunk.first else 'the last'} virtual stage): the schedule is "
                "wrong"
            )
        return self.rank_of_stage(channel.peer), channel.tag

    def begin(self, steps: Sequence[Sequence[PipeInstruction]], outputs: Mapping[Key, Any]) -> None:
        """Plan one batch's receives and post the first of each link.

        ``outputs`` is the batch's output store: a gradient receive is posted once the
        output it belongs to is there.
        """
        self._outputs = outputs
        self._plan = {}
        me = self.links.rank
        for step in steps:
            for instr in step:
                if isinstance(instr, (RecvActivation, RecvGrad)):
                    routes = self.routes[instr.chunk_id]
                    grad = isinstance(instr, RecvGrad)
                    channel = routes.recv_grad if grad else routes.recv_activation
                    src, tag = self._peer(channel, instr)
                    if src != me:
                        key = (instr.chunk_id, instr.buffer_id)
                        self._plan.setdefault(src, deque()).append((grad, tag, key))
        for src in self._plan:
            self._post_head(src)

    def _post_head(self, src: int) -> None:
        queue = self._plan.get(src)
        if not queue:
            return
        grad, tag, key = queue[0]
        if not grad:
            self.links.post_tensors(src, tag)
            return
        output = self._outputs.get(key)
        if output is not None:
            self.links.post_grads(floating(output), src, tag)

    def _take(self, src: int, grad: bool, tag: int, key: Key, instr: PipeInstruction) -> None:
        if src == self.links.rank:
            return
        queue = self._plan.get(src)
        head = queue[0] if queue else None
        if head != (grad, tag, key):
            raise PipelineError(
                f"{instr!r} is not the next receive planned on the link from rank {src} "
                f"(planned: {head}); receives must run in schedule order"
            )
        if queue:
            queue.popleft()

    def send_activation(self, instr: PipeInstruction, outputs: Sequence[torch.Tensor]) -> None:
        """Send a forward's output down its channel; its gradient's receive may now be posted."""
        chunk = getattr(instr, "chunk_id", 0)
        dst, tag = self._peer(self.routes[chunk].send_activation, instr)
        self.links.send_tensors(outputs, dst, tag)
        back = self.routes[chunk].recv_grad
        if back is not None:
            self._post_head(self.rank_of_stage(back.peer))

    def recv_activation(self, instr: PipeInstruction) -> list[torch.Tensor]:
        """Receive a chunk's input (blocking, bounded); post the link's next receive."""
        chunk, buffer = getattr(instr, "chunk_id", 0), getattr(instr, "buffer_id", 0)
        src, tag = self._peer(self.routes[chunk].recv_activation, instr)
        self._take(src, False, tag, (chunk, buffer), instr)
        tensors = self.links.recv_tensors(src, tag)
        self._post_head(src)
        return tensors

    def send_grads(self, instr: PipeInstruction, grads: Sequence[torch.Tensor]) -> None:
        """Send the gradients of a chunk's input up its channel."""
        dst, tag = self._peer(self.routes[getattr(instr, "chunk_id", 0)].send_grad, instr)
        self.links.send_grads(grads, dst, tag)

    def recv_grads(self, instr: PipeInstruction, output: Any) -> list[torch.Tensor]:
        """Receive the gradients of a chunk's ``output`` (blocking, bounded)."""
        chunk, buffer = getattr(instr, "chunk_id", 0), getattr(instr, "buffer_id", 0)
        src, tag = self._peer(self.routes[chunk].recv_grad, instr)
        self._take(src, True, tag, (chunk, buffer), instr)
        grads = self.links.recv_grads(floating(output), src, tag)
        self._post_head(src)
        return grads

    def finish(self) -> None:
        """Wait for every send of the batch."""
        self.links.flush()
