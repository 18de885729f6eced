"""DeepSpeed's three schedules, step for step: 1F1B training, inference, data parallel.

Each schedule here yields exactly the steps that DeepSpeed's class of the same name
yields for the same ``(micro_batches, stages, stage_id)``: the same instruction
classes with the same buffer ids, in the same order within each step, and the same
number of steps (empty steps included), so a DeepSpeed engine and ours run in
lockstep. On top of DeepSpeed, every buffer instruction names the micro-batch it acts
on (``micro_batch_id``); the model is not chunked, so ``chunk_id`` is always 0.

The schedules are written as timelines: first *when* each pass runs, then what each
step exchanges with the neighbours. A pass's output always leaves in the step after
the pass, which is exactly the step in which the neighbour consumes it, so a send and
its receive share a step and a barrier between steps never deadlocks. Each schedule
lays its timeline out as arrays (:func:`~stagewise.schedule.slots.assemble`: the
step of every instruction of a kind, and the order of the kinds within a step);
``steps()`` makes the instruction objects from them.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from stagewise.schedule.base import PipeSchedule
from stagewise.schedule.kinds import Kind
from stagewise.schedule.program import StageProgram
from stagewise.schedule.slots import Slot, assemble

__all__ = ["DataParallelSchedule", "InferenceSchedule", "TrainSchedule"]


class TrainSchedule(PipeSchedule):
    """Train one batch with the synchronous 1F1B schedule (DeepSpeed's ``TrainSchedule``).

    Micro-batch ``m`` reaches stage ``s`` one step after it left stage ``s - 1``: its
    forward runs at step ``2m + s``. Its backward starts on the last stage right after
    its forward there and travels back one stage per step: it runs on stage ``s`` at
    step ``2m + 2S - 1 - s``. So each stage alternates forward slots and backward
    slots, and a batch takes ``2 (M + S - 1)`` steps on every stage. For ``S = 4``
    stages and ``M = 4`` micro-batches (``.`` is a step without compute):

    .. code-block:: text

        step      0  1  2  3  4  5  6  7  8  9 10 11 12 13
        stage 0   F0 .  F1 .  F2 .  F3 B0 .  B1 .  B2 .  B3
        stage 1   .  F0 .  F1 .  F2 B0 F3 B1 .  B2 .  B3 .
        stage 2   .  .  F0 .  F1 B0 F2 B1 F3 B2 .  B3 .  .
        stage 3   .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .  .

    Warm-up is the run of forwards before a stage's first backward (``S - s`` of
    them), the steady state alternates ``F``/``B``, the cool-down drains backwards.
    A step holds, in this order: the gradient exchange (send the gradient of the
    previous step's backward upstream, or receive the gradient for this step's
    backward), the activation exchange (send the previous step's forward output
    downstream, or receive this step's input), the load of this step's micro-batch
    (first and last stage), the compute, and, in the last step, the tied-gradient
    reduction, the data-parallel reduction and the optimizer step. Neighbouring
    stages sit in opposite slots, so in each step a link carries a gradient, then an
    activation, in the same order at both ends: blocking exchanges pair up. The
    gradient goes first for a second reason: its buffer is the one that the
    activation received in the same step reuses (when ``2 <= S - s <= M``).
    """

    training: ClassVar[bool] = True

    def num_pipe_buffers(self) -> int:
        """Forwards in flight at most: those before the first backward, at least 2.

        Stage ``s`` runs ``S - s`` forwards before its first backward (fewer when the
        batch is shorter); DeepSpeed never allocates fewer than two buffers.
        """
        return max(2, min(self.stages - self.stage_id, self.micro_batches))

    def build_program(self) -> StageProgram:
        """This stage's ``2 (micro_batches + stages - 1)`` steps (see the class doc)."""
        stages, stage = self.stages, self.stage_id
        mb = np.arange(self.micro_batches)
        buffer = mb % self.num_pipe_buffers()
        forward = 2 * mb + stage  # the step of each micro-batch's forward
        backward = 2 * mb + 2 * stages - 1 - stage  # and of its backward
        total = 2 * (self.micro_batches + stages - 1)
        has_prev, has_next = stage > 0, stage < stages - 1

        def slot(kind: Kind, steps: object) -> Slot:
            return Slot(kind, steps, mb, buffer)

        slots = []
        if has_prev:  # the gradient of the previous step's backward leaves
            slots.append(slot(Kind.SEND_GRAD, backward + 1))
        if has_next:
            slots.append(slot(Kind.RECV_GRAD, backward))
        if has_next:  # the output of the previous step's forward leaves
            slots.append(slot(Kind.SEND_ACTIVATION, forward + 1))
        if has_prev:
            slots.append(slot(Kind.RECV_ACTIVATION, forward))
        if self.is_first_stage or self.is_last_stage:
            slots.append(slot(Kind.LOAD, forward))
        slots += [slot(Kind.FORWARD, forward), slot(Kind.BACKWARD, backward)]
        last = [total - 1]
        slots += [Slot(kind, last) for kind in _CLOSING]
        return assemble(total, slots)


#: what the last step of a training batch ends with, in this order.
_CLOSING = (Kind.REDUCE_TIED, Kind.REDUCE_GRADS, Kind.OPTIMIZER_STEP)


class InferenceSchedule(PipeSchedule):
    """Run a batch forward only (DeepSpeed's ``InferenceSchedule``).

    Micro-batch ``m`` runs on stage ``s`` at step ``m + s``; a batch takes
    ``M + S - 1`` steps on every stage. Two buffers alternate (micro-batch ``m`` uses
    buffer ``m % 2``): while one receives and computes micro-batch ``m``, the other
    sends micro-batch ``m - 1`` on. For ``S = 3``, ``M = 3``:

    .. code-block:: text

        step      0       1           2           3           4
        stage 0   L0 F0   L1 SA0 F1   L2 SA1 F2   SA2         .
        stage 1   .       RA0 F0      RA1 SA0 F1  RA2 SA1 F2  SA2
        stage 2   .       .           L0 RA0 F0   L1 RA1 F1   L2 RA2 F2

    A step holds the load (first and last stage), the exchanges, then the forward.
    The exchanges run in two rounds so that blocking sends and receives pair up: first
    every link leaving an even stage, then every link leaving an odd stage. An even
    stage therefore sends before it receives, an odd stage receives before it sends.
    """

    training: ClassVar[bool] = False

    def num_pipe_buffers(self) -> int:
        """Two buffers: one being received and computed, one being sent."""
        return 2

    @staticmethod
    def _exchange_round(upstream_stage: int) -> int:
        """0 for a link leaving an even stage, 1 for a link leaving an odd one."""
        return upstream_stage % 2

    def build_program(self) -> StageProgram:
        """This stage's ``micro_batches + stages - 1`` steps (see the class doc)."""
        stage = self.stage_id
        mb = np.arange(self.micro_batches)
        buffer = mb % self.num_pipe_buffers()
        forward = mb + stage  # the step of each micro-batch's forward

        def slot(kind: Kind, steps: object) -> Slot:
            return Slot(kind, steps, mb, buffer)

        slots = []
        if self.is_first_stage or self.is_last_stage:
            slots.append(slot(Kind.LOAD, forward))
        exchanges = []  # (round, slot): the link leaving stage s is in round s % 2
        if self._valid_stage(self.next_stage):  # the previous step's output leaves
            exchanges.append((self._exchange_round(stage), slot(Kind.SEND_ACTIVATION, forward + 1)))
        if self._valid_stage(self.prev_stage):
            exchanges.append((self._exchange_round(stage - 1), slot(Kind.RECV_ACTIVATION, forward)))
        slots += [exchange for _, exchange in sorted(exchanges, key=lambda e: e[0])]
        slots.append(slot(Kind.FORWARD, forward))
        return assemble(self.micro_batches + self.stages - 1, slots)


class DataParallelSchedule(PipeSchedule):
    """Plain data parallelism with gradient accumulation (DeepSpeed's example schedule).

    Every stage holds the whole model (the stages are data-parallel replicas that never
    talk to each other point to point): one step per micro-batch, load, forward and
    backward in buffer 0, then the data-parallel reduction and the optimizer step in
    the last step. Like DeepSpeed's, it has no tied-gradient reduction.
    """

    training: ClassVar[bool] = True
    #: every stage runs the whole model; read by :func:`stagewise.schedule.check_table`.
    replicated: ClassVar[bool] = True

    def num_pipe_buffers(self) -> int:
        """One buffer: each micro-batch is done before the next one is loaded."""
        return 1

    def build_program(self) -> StageProgram:
        """One step per micro-batch, the reductions in the last."""
        mb = np.arange(self.micro_batches)
        zero = np.zeros_like(mb)
        slots = [Slot(kind, mb, mb, zero) for kind in (Kind.LOAD, Kind.FORWARD, Kind.BACKWARD)]
        last = [self.micro_batches - 1]
        slots += [Slot(Kind.REDUCE_GRADS, last), Slot(Kind.OPTIMIZER_STEP, last)]
        return assemble(self.micro_batches, slots)
