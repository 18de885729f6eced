"""Zero-bubble schedules (Qi et al., 2023): the backward split in two.

A backward pass computes two things: the gradient of the stage's *input*, which the
previous stage is waiting for, and the gradient of the stage's *weights*, which
nobody needs until the optimizer step. Zero-bubble schedules run the first half
(``I``, :class:`~stagewise.schedule.instructions.BackwardInputPass`) as soon as they
can and send its result upstream at once, and defer the second half (``W``,
:class:`~stagewise.schedule.instructions.BackwardWeightPass`) into the time where
a stage would otherwise wait.

The schedules here are *periodic*: in iteration ``k`` each stage runs one pass of
each kind in a fixed order, each on micro-batch ``k - lag`` for a lag per kind and
stage (a pass whose micro-batch is outside ``0..M-1`` is left out, which gives the
warm-up and the cool-down). The lags are the smallest that let every pass find
its input ready when all passes cost the same, so the steady state has no idle
time at all; they are spelled out in each class. Any number of micro-batches works.

The figures in the class docs assume, as the paper's analysis does, that a
forward, an input-gradient and a weight-gradient pass each take one time unit
``T`` (``Costs()``, the simulator's default); ``S`` is the number of stages and
``M`` of micro-batches. The tests compare the simulator with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from stagewise.schedule.order import PassArrays, PassOrderSchedule, pass_kind
from stagewise.schedule.placement import PlacementKind

__all__ = ["ZBVSchedule", "ZeroBubbleH1Schedule", "ZeroBubbleH2Schedule"]


def periodic(plan: Sequence[tuple[str, int, int]], micro_batches: int) -> PassArrays:
    """Run ``plan`` — ``(kind, chunk, lag)`` per pass of one iteration — until done.

    Iteration ``k`` runs each planned pass on micro-batch ``k - lag``, skipping
    micro-batches outside the batch.
    """
    kind = np.array([pass_kind(k) for k, _, _ in plan], np.int64)
    chunk = np.array([c for _, c, _ in plan], np.int64)
    lag = np.array([lag for _, _, lag in plan], np.int64)
    iterations = micro_batches + int(lag.max())
    mb = np.arange(iterations)[:, None] - lag[None, :]  # (iteration, pass of the plan)
    run = (mb >= 0) & (mb < micro_batches)
    shape = mb.shape
    return PassArrays(
        np.broadcast_to(kind, shape)[run], mb[run], np.broadcast_to(chunk, shape)[run]
    )


class ZeroBubbleH1Schedule(PassOrderSchedule):
    """ZB-H1: 1F1B with the weight gradients deferred ("zb-h1").

    Stage ``s`` of ``S`` runs, in iteration ``k``::

        F(k)    I(k - (S - 1 - s))    W(k - (S - 1))

    The forwards and input-gradient passes are 1F1B's (``S - 1 - s`` warm-up
    forwards, then one forward, one backward), and each ``I`` sends its gradient
    upstream at once. The ``W`` of a micro-batch runs ``s`` iterations after its
    ``I``: the later stages, whose gradients come first, hand them upstream without
    a ``W`` in between, so stage ``s`` gets its first gradient ``S - 1 - s`` passes
    sooner than in 1F1B, and the ``W`` s left over fill the cool-down. With equal costs each stage is idle ``(S - 1) F`` instead of
    1F1B's ``3 (S - 1) F``: a third of 1F1B's bubble. Every stage holds at most
    ``S`` micro-batches (forwarded, ``W`` not yet run): what 1F1B's first stage
    holds. For ``S = 4``, ``M = 6`` (every pass one unit)::

        time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20
        stage 0  F0 F1 F2 F3 .  .  .  I0 W0 F4 I1 W1 F5 I2 W2 I3 W3 I4 W4 I5 W5
        stage 1  .  F0 F1 F2 .  .  I0 F3 I1 W0 F4 I2 W1 F5 I3 W2 I4 W3 I5 W4 W5
        stage 2  .  .  F0 F1 .  I0 F2 I1 F3 I2 W0 F4 I3 W1 F5 I4 W2 I5 W3 W4 W5
        stage 3  .  .  .  F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 W3 W4 W5
    """

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """``F(k), I(k - (S-1-s)), W(k - (S-1))`` for ``k = 0, 1, ...``."""
        stages = self.stages
        plan = [("F", 0, 0), ("I", 0, stages - 1 - stage_id), ("W", 0, stages - 1)]
        return periodic(plan, self.micro_batches)


class ZeroBubbleH2Schedule(PassOrderSchedule):
    """ZB-H2: more warm-up forwards for no idle time inside the batch ("zb-h2").

    Stage ``s`` of ``S`` runs, in iteration ``k``::

        F(k)    I(k - 2 (S - 1 - s))    W(k - 2 (S - 1))

    So stage ``s`` warms up with ``2 (S - s) - 1`` forwards, which fill exactly the
    time until its first gradient comes back (ZB-H1 runs ``S - s`` and then waits),
    and defers every weight pass by ``2 (S - 1)`` iterations, the same on every
    stage: the stages that run out of forwards first (the upper ones) have the most
    weight passes left to fill the end with. With all passes ``T``, stage ``s`` is
    busy from ``s·T`` to ``(s + 3M)·T`` without a gap (a parallelogram, where ZB-H1
    is a trapezoid) once ``M >= 2S - 1``:

    * makespan ``(3M + S - 1) T``; the idle time, ``(S - 1) T`` per stage, is all
      at the two ends of each stage's span: the bubble fraction is
      ``(S - 1) / (3M + S - 1)`` and the bubble *inside* every stage's span is 0.
      The paper's "zero bubble" is this: with the optimizer step's synchronisation
      bypassed (its post-validation), one batch's end overlaps the next one's
      start. Our optimizer step waits for every stage, so within one batch the
      bubble equals ZB-H1's at equal costs; with a weight pass cheaper than a
      forward, or an input-gradient pass dearer, ZB-H2 is the shorter (``F = I =
      T``, ``W = T/2``, ``S = 8``, ``M = 32``: makespan ``87 T`` against ZB-H1's
      ``90.5 T``), and from ``M = 2S - 1`` on never the longer (the tests try
      random costs and transfer times);
    * every stage holds at most ``2S - 1`` micro-batches (forwarded, ``W`` not yet
      run), the paper's ``(2p - 1) M_B``: twice 1F1B's first stage, less one.

    Any number of micro-batches works (with fewer than ``2S - 1`` the warm-up is cut
    short and gaps remain). For ``S = 3``, ``M = 6`` (every pass one unit)::

        time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19
        stage 0  F0 F1 F2 F3 F4 I0 W0 F5 I1 W1 I2 W2 I3 W3 I4 W4 I5 W5 .  .
        stage 1  .  F0 F1 F2 I0 F3 I1 F4 I2 W0 F5 I3 W1 I4 W2 I5 W3 W4 W5 .
        stage 2  .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 F5 I5 W1 W2 W3 W4 W5
    """

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """``F(k), I(k - 2 (S-1-s)), W(k - 2 (S-1))`` for ``k = 0, 1, ...``."""
        stages = self.stages
        plan = [("F", 0, 0), ("I", 0, 2 * (stages - 1 - stage_id)), ("W", 0, 2 * (stages - 1))]
        return periodic(plan, self.micro_batches)


class ZBVSchedule(PassOrderSchedule):
    """ZB-V: two chunks per stage in a V, zero bubble at 1F1B's memory ("zbv").

    The model is cut into ``2S`` virtual stages. Stage ``s`` holds virtual stage
    ``s`` (chunk 0) and virtual stage ``2S - 1 - s`` (chunk 1), so a micro-batch
    goes down the stages on chunk 0, turns on the last stage (chunk 0 to chunk 1
    of the same stage, a local transfer) and comes back up on chunk 1; the first
    stage holds both the input and the loss. Backwards run the V the other way.

    Stage ``s`` runs, in iteration ``k`` (chunk in brackets)::

        F[0](k)  W[1](k - S)  F[1](k - (S-1-s))  I[1](k - (S-1))
        I[0](k - (2S-2-s))  W[0](k - (2S-2-s))

    Each lag is the least that has the pass's input ready in time when all passes
    cost the same: a forward on chunk 0 meets its input one pass after the stage
    above made it, chunk 1's forward one iteration later per stage on the way back
    up, and so on around the V. The steady state is then free of idle time; only
    the ramp at the start (stage ``s`` starts ``s`` passes late) and its mirror at
    the end remain. Every stage holds at most ``2S`` chunk activations, each half
    a stage's layers: the ``S`` micro-batches 1F1B's first stage holds. Any number
    of micro-batches works. For ``S = 2``, ``M = 4`` (``a`` for chunk 1, every
    pass one unit)::

        time     0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
        stage 0  F0  F1  .   F0a I0a F2  W0a F1a I1a I0  W0  F3  W1a F2a I2a I1  W1  W2a F3a I3a I2  W2  W3a I3  W3
        stage 1  .   F0  F0a F1  F1a I0a I0  W0  F2  W0a F2a I1a I1  W1  F3  W1a F3a I2a I2  W2  W2a I3a I3  W3  W3a
    """

    num_chunks = 2
    placement_kind: ClassVar[PlacementKind] = PlacementKind.V

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """The six passes of each iteration, lagged as in the class doc."""
        stages = self.stages
        back = stages - 1 - stage_id  # iterations the way back up adds per stage
        plan = [
            ("F", 0, 0),
            ("W", 1, stages),
            ("F", 1, back),
            ("I", 1, stages - 1),
            ("I", 0, stages - 1 + back),
            ("W", 0, stages - 1 + back),
        ]
        return periodic(plan, self.micro_batches)
