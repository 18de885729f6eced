"""The base of every schedule written as an order of passes (GPipe, interleaved, ZB).

Most schedules are easiest to read as the *order of the passes* each stage runs:
forwards ``F``, whole backwards ``B``, and for zero-bubble schedules the
input-gradient half ``I`` and the deferred weight-gradient half ``W``. Everything
else follows from that order by one rule, written once in
:class:`PassOrderSchedule`:

* a pass's *output* leaves right after it: ``SA`` after an ``F`` (unless its
  virtual stage is the last), ``SG`` after a ``B`` or ``I`` (unless it is the
  first); the engine sends asynchronously, so a send never waits;
* a pass's *input* is received right before it: ``RA`` before an ``F``, ``RG``
  before a ``B`` or ``I``; the first and the last virtual stage load (``L``) the
  micro-batch before its forward, with the chunk id of that chunk;
* between two stages, messages are received in the order they were sent (the
  checker's rule, and what point-to-point transport gives). When a pass needs a
  message that its sender sent *after* others still waiting on the same link, the
  earlier ones are received first, in the same step. Those were sent before the
  needed one, so receiving them early never waits longer and never deadlocks;
* a buffer (per chunk) is taken by a micro-batch at its first instruction and
  freed after its last (its ``B``, or its ``W``, or the ``SG`` after its ``I``);
  the lowest free buffer is used, so ``num_pipe_buffers()`` is the most
  micro-batches a chunk holds at once;
* one step per pass; the last step ends with ``RTG``, ``RDG``, ``OPT``.

A transfer between two chunks of the same stage (the turn of a V placement) is a
send and a receive like any other, on the link from the stage to itself; the engine
moves it locally.
"""

from __future__ import annotations

import heapq
from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar, NamedTuple, cast

from stagewise.schedule.base import PipeSchedule, Step, gc_paused
from stagewise.schedule.instructions import (
    BufferOpInstruction,
    OptimizerStep,
    ReduceGrads,
    ReduceTiedGrads,
    instruction_class,
)
from stagewise.schedule.kinds import Kind

__all__ = ["Pass", "PassOrderSchedule"]


class Pass(NamedTuple):
    """One compute pass in a stage's order: ``kind`` is ``"F"``, ``"B"``, ``"I"`` or ``"W"``."""

    kind: str
    micro_batch: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro_batch}" + (f"c{self.chunk}" if self.chunk else "")


def pass_kind(text: str | Kind) -> Kind:
    """The compute kind a :class:`Pass` names (``"F"``, ``"B"``, ``"I"``, ``"W"`` or the Kind).

    Raises:
        ValueError: any other text or kind.
    """
    if isinstance(text, Kind):
        kind = text
    else:
        try:
            kind = Kind.from_code(text)
        except ValueError:
            kind = Kind.CUSTOM
    if not kind.is_compute:
        codes = ", ".join(repr(k.code) for k in Kind if k.is_compute)
        raise ValueError(f"unknown pass kind {text!r} in pass_order(); use {codes}")
    return kind


# (kind, micro-batch, chunk) before buffers are assigned.
_Raw = tuple[Kind, int, int]
# a message on a link: ("A" activation or "G" gradient, micro-batch, receiving chunk).
_Message = tuple[str, int, int]


class PassOrderSchedule(PipeSchedule):
    """A training schedule given by the order of passes on each stage.

    Subclasses implement :meth:`pass_order` for *any* stage (a stage's receives
    depend on the order its neighbours send in); the communication, loads,
    buffers and the closing reductions follow by the rules in the module doc.
    """

    training: ClassVar[bool] = True

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        super().__init__(micro_batches, stages, stage_id)
        self._steps: list[Step] | None = None
        self._num_buffers = 0

    @abstractmethod
    def pass_order(self, stage_id: int) -> Iterator[Pass]:
        """Yield the passes that ``stage_id`` runs, in order."""

    # -- the rule ------------------------------------------------------------------
    def steps(self) -> Iterator[Step]:
        """Yield this stage's steps: one per pass, with its transfers around it."""
        for step in self._build():
            yield list(step)  # a copy: the built steps are cached

    def num_pipe_buffers(self) -> int:
        """The most micro-batches that one chunk of this stage holds at once."""
        self._build()
        return self._num_buffers

    def _build(self) -> list[Step]:
        if self._steps is None:
            with gc_paused():
                self._steps = self._assign_buffers(self._raw_steps())
        return self._steps

    def _outgoing(self, src: int, dst: int) -> dict[_Message, int]:
        """Messages ``src`` sends to ``dst``, each with its place in the link's order."""
        last = self.num_virtual_stages - 1
        # per chunk of src: the chunk of dst its activations (or gradients) go to, or -1
        act_to, grad_to = [], []
        for chunk in range(self.num_chunks):
            virtual = self.virtual_stage(src, chunk)
            peer = self.locate(virtual + 1) if virtual < last else (-1, -1)
            act_to.append(peer[1] if peer[0] == dst else -1)
            peer = self.locate(virtual - 1) if virtual > 0 else (-1, -1)
            grad_to.append(peer[1] if peer[0] == dst else -1)
        order: dict[_Message, int] = {}
        for text, mb, chunk in self.pass_order(src):
            kind = pass_kind(text)
            if kind == Kind.FORWARD:
                if act_to[chunk] >= 0:
                    order["A", mb, act_to[chunk]] = len(order)
            elif kind.makes_input_grad and grad_to[chunk] >= 0:
                order["G", mb, grad_to[chunk]] = len(order)
        return order

    def _raw_steps(self) -> list[list[_Raw]]:
        """This stage's steps as ``(code, micro-batch, chunk)``, buffers not yet chosen."""
        stage = self.stage_id
        last = self.num_virtual_stages - 1
        roles = [self.virtual_stage(stage, chunk) for chunk in range(self.num_chunks)]
        # the stage each chunk receives activations from and gradients from
        act_src = [self.locate(v - 1)[0] if v > 0 else -1 for v in roles]
        grad_src = [self.locate(v + 1)[0] if v < last else -1 for v in roles]
        links = {src: self._outgoing(src, stage) for src in {*act_src, *grad_src} if src >= 0}
        sent_order = {src: list(order) for src, order in links.items()}
        received = dict.fromkeys(links, 0)  # messages taken so far on each link

        def receive(src: int, message: _Message, step: list[_Raw]) -> None:
            """Receive ``message`` from ``src`` unless it came already, and what precedes it."""
            wanted = links[src].get(message)
            if wanted is None:
                kind, mb, chunk = message
                what = "activation" if kind == "A" else "gradient"
                raise ValueError(
                    f"{type(self).__name__}: stage {stage} needs the {what} of micro-batch "
                    f"{mb} for chunk {chunk} from stage {src}, which never sends it: "
                    f"pass_order() must run every pass of the batch on every stage"
                )
            for kind, mb, chunk in sent_order[src][received[src] : wanted + 1]:
                step.append((Kind.RECV_ACTIVATION if kind == "A" else Kind.RECV_GRAD, mb, chunk))
            received[src] = max(received[src], wanted + 1)

        steps: list[list[_Raw]] = []
        for text, mb, chunk in self.pass_order(stage):
            kind = pass_kind(text)
            virtual = roles[chunk]
            step: list[_Raw] = []
            if kind == Kind.FORWARD:
                if virtual > 0:
                    receive(act_src[chunk], ("A", mb, chunk), step)
                if virtual == 0 or virtual == last:
                    step.append((Kind.LOAD, mb, chunk))
                step.append((kind, mb, chunk))
                if virtual < last:
                    step.append((Kind.SEND_ACTIVATION, mb, chunk))
            elif kind.makes_input_grad:
                if virtual < last:
                    receive(grad_src[chunk], ("G", mb, chunk), step)
                step.append((kind, mb, chunk))
                if virtual > 0:
                    step.append((Kind.SEND_GRAD, mb, chunk))
            else:  # the weight-gradient half: no transfer
                step.append((kind, mb, chunk))
            steps.append(step)
        return steps

    def _assign_buffers(self, raw: list[list[_Raw]]) -> list[Step]:
        """Give each micro-batch the lowest buffer free in its chunk for its lifetime."""
        last_use: dict[tuple[int, int], int] = {}  # (chunk, mb) -> index of its last instruction
        index = 0
        for step in raw:
            for _, mb, chunk in step:
                last_use[chunk, mb] = index
                index += 1
        free: list[list[int]] = [[] for _ in range(self.num_chunks)]  # heaps of freed ids
        size = [0] * self.num_chunks
        held: dict[tuple[int, int], int] = {}
        steps: list[Step] = []
        classes = {
            kind: cast(type[BufferOpInstruction], instruction_class(kind))
            for kind in Kind
            if kind.is_buffer_op
        }
        index = 0
        for step in raw:
            out: Step = []
            for kind, mb, chunk in step:
                key = (chunk, mb)
                buffer = held.get(key)
                if buffer is None:
                    if free[chunk]:
                        buffer = heapq.heappop(free[chunk])
                    else:
                        buffer = size[chunk]
                        size[chunk] += 1
                    held[key] = buffer
                out.append(classes[kind](buffer, mb, chunk))
                if last_use[key] == index:
                    heapq.heappush(free[chunk], held.pop(key))
                index += 1
            steps.append(out)
        if steps:
            steps[-1] += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
        self._num_buffers = max(size, default=0)
        return steps
