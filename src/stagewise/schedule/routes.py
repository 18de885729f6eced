"""Routes: which peer and which channel every send and receive of a stage uses (pure).

The layers are cut into virtual stages ``0..V-1``; *boundary* ``b`` lies between
virtual stages ``b`` and ``b + 1``. Each boundary carries two channels, one per
direction: activations go down it with tag ``2b``, the gradients of those
activations come back up it with tag ``2b + 1``. Both ends of a transfer read
their channel from this one table, so a send's tag is its receive's tag by
construction (a test checks it for every schedule and stage count).

Where a boundary joins two chunks of the same stage (the turn of a V), the
peer is the stage itself and the transfer stays local.

>>> from stagewise.schedule.deepspeed import TrainSchedule
>>> table = stage_routes(TrainSchedule(4, 3, 1))
>>> table[0].recv_activation, table[0].send_grad
(Channel(peer=0, tag=0, boundary=0), Channel(peer=0, tag=1, boundary=0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stagewise.schedule.instructions import (
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)

__all__ = [
    "Channel",
    "ChunkRoutes",
    "PlacementLike",
    "activation_tag",
    "channel_of",
    "grad_tag",
    "stage_routes",
]


class PlacementLike(Protocol):
    """What routing needs of a placement: a schedule or a ``Placement`` both have it."""

    @property
    def stages(self) -> int: ...

    @property
    def num_chunks(self) -> int: ...

    @property
    def stage_id(self) -> int: ...

    def virtual_stage(self, stage_id: int, chunk_id: int) -> int: ...

    def locate(self, virtual_stage: int) -> tuple[int, int]: ...


def activation_tag(boundary: int) -> int:
    """The tag of the activations crossing ``boundary`` (from ``boundary`` to ``boundary+1``)."""
    return 2 * boundary


def grad_tag(boundary: int) -> int:
    """The tag of the gradients crossing ``boundary`` back (from ``boundary+1`` to ``boundary``)."""
    return 2 * boundary + 1


@dataclass(frozen=True)
class Channel:
    """One direction of one boundary, as seen from one end: the other end and the tag."""

    peer: int  # the stage at the other end
    tag: int
    boundary: int


@dataclass(frozen=True)
class ChunkRoutes:
    """Where one chunk of one stage sits and the channels of its four transfers."""

    chunk: int
    virtual: int
    first: bool  # holds the first virtual stage (reads the inputs)
    last: bool  # holds the last virtual stage (computes the loss)
    recv_activation: Channel | None
    send_activation: Channel | None
    recv_grad: Channel | None
    send_grad: Channel | None


def stage_routes(placement: PlacementLike, stage_id: int | None = None) -> list[ChunkRoutes]:
    """The routes of every chunk of ``stage_id`` (default: the placement's own stage)."""
    stage = placement.stage_id if stage_id is None else stage_id
    count = placement.stages * placement.num_chunks
    routes = []
    for chunk in range(placement.num_chunks):
        virtual = placement.virtual_stage(stage, chunk)
        before = placement.locate(virtual - 1)[0] if virtual > 0 else None
        after = placement.locate(virtual + 1)[0] if virtual < count - 1 else None
        routes.append(
            ChunkRoutes(
                chunk=chunk,
                virtual=virtual,
                first=virtual == 0,
                last=virtual == count - 1,
                recv_activation=None
                if before is None
                else Channel(before, activation_tag(virtual - 1), virtual - 1),
                send_activation=None
                if after is None
                else Channel(after, activation_tag(virtual), virtual),
                recv_grad=None if after is None else Channel(after, grad_tag(virtual), virtual),
                send_grad=None
                if before is None
                else Channel(before, grad_tag(virtual - 1), virtual - 1),
            )
        )
    return routes


def channel_of(routes: list[ChunkRoutes], instruction: PipeInstruction) -> Channel | None:
    """The channel a transfer instruction uses (None for other instructions).

    Raises:
        ValueError: a transfer past either end of the model (e.g. ``SA`` on the last
            virtual stage).
    """
    if not isinstance(instruction, (SendActivation, RecvActivation, SendGrad, RecvGrad)):
        return None
    chunk = routes[instruction.chunk_id]
    if isinstance(instruction, SendActivation):
        channel = chunk.send_activation
    elif isinstance(instruction, RecvActivation):
        channel = chunk.recv_activation
    elif isinstance(instruction, SendGrad):
        channel = chunk.send_grad
    else:
        channel = chunk.recv_grad
    if channel is None:
        raise ValueError(
            f"{instruction!r} on virtual stage {chunk.virtual} has no peer: it is "
            f"{'the first' if chunk.first else 'the last'} virtual stage"
        )
    return channel
