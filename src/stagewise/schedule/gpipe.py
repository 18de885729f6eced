"""GPipe: every forward, then every backward (written as an order of passes)."""

from __future__ import annotations

import numpy as np

from stagewise.schedule.kinds import Kind
from stagewise.schedule.order import PassArrays, PassOrderSchedule

__all__ = ["GPipeSchedule"]


class GPipeSchedule(PassOrderSchedule):
    """GPipe: every forward, then every backward, then the optimizer step.

    Micro-batch ``m`` runs forward on stage ``s`` at time ``m + s``; the backwards
    start once the last stage has run every forward, and run in the same order
    (oldest first). Its bubble equals 1F1B's, ``(S - 1) / (M + S - 1)`` with a
    backward twice a forward, but every stage holds all ``M`` micro-batches at
    once (1F1B holds at most ``S - s``). For ``S = 3``, ``M = 4`` (a column is one
    forward; a backward, twice as long, goes on in its ``-`` column)::

        time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17
        stage 0  F0 F1 F2 F3 .  .  .  .  .  .  B0 -  B1 -  B2 -  B3 -
        stage 1  .  F0 F1 F2 F3 .  .  .  B0 -  B1 -  B2 -  B3 -  .  .
        stage 2  .  .  F0 F1 F2 F3 B0 -  B1 -  B2 -  B3 -  .  .  .  .
    """

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """All forwards of the batch, then all backwards, oldest first."""
        mb = np.arange(self.micro_batches)
        kind = np.repeat([Kind.FORWARD, Kind.BACKWARD], self.micro_batches)
        return PassArrays(kind, np.tile(mb, 2), np.zeros(2 * self.micro_batches, np.int64))
