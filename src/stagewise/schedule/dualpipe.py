"""DualPipeV: DeepSeek-V3's DualPipe cut in half, on a V placement with a split backward.

DualPipe (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024) feeds micro-batches
from both ends of the pipeline and overlaps the forward of one with the backward of
another. Cut in half ("DualPipeV", Sea AI Lab's cut-in-half procedure, as the
DualPipe repository, DeepSpeed 0.19.8 and ``torch.distributed.pipelining``'s
``ScheduleDualPipeV`` run it), it needs one copy of the weights: each stage holds
two chunks in a V (virtual stage ``s`` and ``2S - 1 - s``, as ZB-V), and a stage's
order is eight phases, for stage ``r`` of ``S`` (chunk in brackets; ``B`` a whole
backward, ``I``/``W`` its two halves, each ``W`` the oldest ``I`` not yet
followed by its ``W``)::

    1  F[0]                                       × 2 (S - r - 1)
    2  F[0] F[1]                                  × (r + 1)
    3  I[1] W F[1]                                × (S - r - 1)
    4  F[0] B[1]   F[1] B[0]                      × (M - 2S + r + 1)
    5  B[1]   F[1] B[0]                           × (S - r - 1)
    6  B[1] B[0], switching to I from the middle  × (r + 1)
    7  W I[0]                                     × (S - r - 1)
    8  W                                          × (r + 1)

In phases 4 and 5 DualPipe overlaps each forward with the backward beside it (one
micro-batch's forward hides another's backward communication); here a stage runs
one pass at a time, the forward first, then the backward. In phase 6 the backward
switches from whole to split halfway (``i = ⌊(r + 1) / 2⌋``, before the chunk-1
pass on odd stages, after it on even ones), and the weight halves fill phases 7
and 8. The micro-batch of each pass counts up per kind and chunk, as in DualPipe.
It needs ``M >= 2S`` micro-batches (phase 4 must run on stage 0); other counts are
an error.

DeepSeek's figures, with ``PP = 2S`` virtual stages and ``F``, ``B``, ``W`` the
time of one chunk's forward, whole backward and weight half: a bubble of
``(PP/2 - 1)(F&B + B - 3W)`` per stage, ``F&B`` an overlapped pair, and ``PP + 1``
chunk activations held per stage. Run one pass at a time (``F&B = F + B``) with
every half-pass the same time ``T`` (so ``B = 2T``; ``Costs()``, where a chunk's
pass takes ``T = 1/2``): the formula gives ``2 (S - 1) T`` of idle time per stage,
the simulator finds ``(S - 1) T`` (a forward no longer waits for the backward it
was paired with): makespan ``(6M + S - 1) T``, bubble fraction
``(S - 1) / (6M + S - 1)``; and every stage holds ``2S + 1`` chunk activations at
most, DeepSeek's ``PP + 1`` (the ``+ 1`` is phase 4's forward, which runs before
the backward that frees a chunk). The tests compare both. For ``S = 2``, ``M = 4``
(``a`` marks chunk 1; a column is one half-pass, a whole backward goes on in its
``-`` column)::

    time     0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
    stage 0  F0  F1  F2  F0a I0a W0a F1a F3  B1a -   F2a B0  -   B2a -   F3a .   B1  -   B3a -   I2  W2  I3  W3
    stage 1  .   F0  F0a F1  F1a F2  B0a -   F2a B0  -   F3  B1a -   F3a B1  -   B2a -   B2  -   I3a I3  W3a W3
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from stagewise.schedule.kinds import Kind
from stagewise.schedule.order import PassArrays, PassOrderSchedule
from stagewise.schedule.placement import PlacementKind

__all__ = ["DualPipeVSchedule"]

_F, _B, _I, _W = Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT
_ANY = -1  # the chunk of a W comes from the I it completes


class DualPipeVSchedule(PassOrderSchedule):
    """DualPipeV ("dualpipev"): two chunks per stage in a V, the phases in the module doc.

    Args:
        micro_batches: micro-batches per batch, at least ``2 * stages``.
        stages: pipeline stages.
        stage_id: this stage.

    Raises:
        ValueError: fewer than ``2 * stages`` micro-batches.
    """

    num_chunks = 2
    placement_kind: ClassVar[PlacementKind] = PlacementKind.V

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        super().__init__(micro_batches, stages, stage_id)
        if micro_batches < 2 * stages:
            raise ValueError(
                f"DualPipeV needs at least 2 x stages = {2 * stages} micro-batches on "
                f"{stages} stage(s), got {micro_batches}: raise gradient_accumulation_steps "
                f"to {2 * stages} or more, or use 'zbv' (the same V, any count)"
            )

    def _phases(self, stage_id: int) -> list[tuple[list[tuple[Kind, int]], int]]:
        """The phases of the module doc: (passes of one round, rounds)."""
        stages, r = self.stages, stage_id
        after = stages - r - 1  # stages after this one
        # phase 6: the backward splits halfway, before chunk 1's pass on odd stages
        half = (r + 1) // 2
        six: list[tuple[Kind, int]] = []
        for i in range(r + 1):
            six.append((_I if i > half or (i == half and r % 2 == 1) else _B, 1))
            six.append((_I if i >= half else _B, 0))
        return [
            ([(_F, 0)], 2 * after),
            ([(_F, 0), (_F, 1)], r + 1),
            ([(_I, 1), (_W, _ANY), (_F, 1)], after),
            ([(_F, 0), (_B, 1), (_F, 1), (_B, 0)], self.micro_batches - 2 * stages + r + 1),
            ([(_B, 1), (_F, 1), (_B, 0)], after),
            (six, 1),
            ([(_W, _ANY), (_I, 0)], after),
            ([(_W, _ANY)], r + 1),
        ]

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """The passes of ``stage_id``: the phases, then each pass's micro-batch."""
        kinds, chunks = [], []
        for passes, rounds in self._phases(stage_id):
            kinds.append(np.tile(np.array([int(k) for k, _ in passes], np.int64), rounds))
            chunks.append(np.tile(np.array([c for _, c in passes], np.int64), rounds))
        kind, chunk = np.concatenate(kinds), np.concatenate(chunks)
        mb = np.zeros(len(kind), np.int64)
        # forwards and backwards (whole or input half) count up per chunk
        for group in ([_F], [_B, _I]):
            for c in (0, 1):
                mask = np.isin(kind, [int(k) for k in group]) & (chunk == c)
                mb[mask] = np.arange(int(mask.sum()))
        # the k-th W completes the k-th I (the oldest pending one)
        halves, weights = np.flatnonzero(kind == _I), np.flatnonzero(kind == _W)
        if len(weights) != len(halves) or np.any(halves[: len(weights)] > weights):
            raise RuntimeError(  # pragma: no cover - the phases above never do this
                f"DualPipeV stage {stage_id}: a W without an I before it"
            )
        mb[weights], chunk[weights] = mb[halves], chunk[halves]
        return PassArrays(kind, mb, chunk)
