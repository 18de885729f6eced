"""Megatron's interleaved 1F1B: several model chunks per stage, looped.

The layers are cut into ``stages × virtual_stages`` virtual stages, and stage ``s``
holds virtual stages ``s, s + S, s + 2S, ...`` (chunk ``c`` is virtual stage
``c·S + s``), so a micro-batch passes every stage ``virtual_stages`` times. Each
stage runs its passes in *groups* of ``S`` micro-batches: forward micro-batches
``0..S-1`` on chunk 0, then the same on chunk 1, and so on, then the next group;
backwards go the same way with the chunks reversed. A stage first runs a warm-up of
forwards, then alternates one forward and one backward, then drains the backwards.

The bubble shrinks by the number of chunks, ``(S - 1) / (V·M + S - 1)`` of the
time with a backward twice a forward, for more transfers (``V`` times as many)
and a little more activation memory.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from stagewise.schedule.kinds import Kind
from stagewise.schedule.order import PassArrays, PassOrderSchedule
from stagewise.schedule.program import Ints

__all__ = ["InterleavedSchedule"]


class InterleavedSchedule(PassOrderSchedule):
    """Interleaved 1F1B (Megatron-LM) with ``virtual_stages`` chunks per stage.

    Args:
        micro_batches: micro-batches per batch; any count (Megatron needs a
            multiple of ``stages``).
        stages: pipeline stages.
        stage_id: this stage.
        virtual_stages: model chunks per stage (``pipeline.virtual_stages``), >= 1;
            with 1 the passes run in 1F1B's order.

    Stage ``s`` warms up with ``2 (S - 1 - s) + (V - 1) S`` forwards (all of them if
    the batch is smaller). For ``S = 2``, ``V = 2``, ``M = 4`` (``a`` marks chunk 1; a
    column is one chunk's forward, a backward goes on in its ``-`` column)::

        time     0   1   2   3   4   5   6   7   8   9   10  11  12  13  14  15  16  17  18  19  20  21  22  23  24  25  26
        stage 0  F0  F1  F0a F1a F2  .   B0a -   F3  B1a -   F2a B0  -   F3a B1  -   .   B2a -   .   B3a -   B2  -   B3  -
        stage 1  .   F0  F1  F0a B0a -   F1a B1a -   F2  B0  -   F3  B1  -   F2a B2a -   F3a B3a -   B2  -   B3  -   .   .

    Megatron needs ``M`` to be a multiple of ``S``. Here any ``M`` works: the order
    is built for ``M`` rounded up to a multiple of ``S`` and the passes of the
    padding micro-batches are left out. Leaving passes out of a deadlock-free order
    keeps it deadlock-free (every remaining dependency was already there), so the
    shorter batch is as safe as Megatron's; it idles where the padding would have
    run.
    """

    configurable_chunks: ClassVar[bool] = True
    #: the chunks per stage when ``pipeline.virtual_stages`` is unset.
    default_chunks: ClassVar[int] = 2

    def __init__(
        self, micro_batches: int, stages: int, stage_id: int, *, virtual_stages: int = 2
    ) -> None:
        self.num_chunks = self.chunks_for(virtual_stages)
        super().__init__(micro_batches, stages, stage_id)

    @classmethod
    def chunks_for(cls, virtual_stages: int | None, *, name: str | None = None) -> int:
        """``virtual_stages`` chunks per stage (2 when unset), any integer >= 1."""
        chunks = cls.default_chunks if virtual_stages is None else virtual_stages
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(
                f"virtual_stages must be an integer >= 1 (model chunks per stage), "
                f"got {virtual_stages!r}"
            )
        return chunks

    @property
    def virtual_stages(self) -> int:
        """Model chunks per stage."""
        return self.num_chunks

    @property
    def padded_micro_batches(self) -> int:
        """``micro_batches`` rounded up to a multiple of ``stages``."""
        return -(-self.micro_batches // self.stages) * self.stages

    def _table(self, backward: bool) -> tuple[Ints, Ints]:
        """``(micro-batch, chunk)`` in the order every stage forwards (or backwards)
        them, over the padded batch: groups of ``S`` micro-batches, chunk by chunk."""
        stages, chunks = self.stages, self.num_chunks
        groups = self.padded_micro_batches // stages
        # (group, chunk, micro-batch within the group)
        mb = np.arange(groups)[:, None, None] * stages + np.arange(stages)[None, None, :]
        chunk = np.arange(chunks)[None, :, None]
        if backward:
            chunk = chunks - 1 - chunk
        shape = (groups, chunks, stages)
        return np.broadcast_to(mb, shape).reshape(-1), np.broadcast_to(chunk, shape).reshape(-1)

    def warmup(self, stage_id: int) -> int:
        """Forwards (of the padded batch) that ``stage_id`` runs before its first backward.

        ``2 (S - 1 - s) + (V - 1) S``, as Megatron; with one chunk, 1F1B's ``S - 1 - s``.
        """
        total = self.padded_micro_batches * self.num_chunks
        if self.num_chunks == 1:
            return min(self.stages - 1 - stage_id, total)
        return min(2 * (self.stages - 1 - stage_id) + (self.num_chunks - 1) * self.stages, total)

    def pass_arrays(self, stage_id: int) -> PassArrays:
        """Warm-up forwards, then one forward and one backward, then the backwards.

        The order is built for the padded batch, then the passes of the padding
        micro-batches (``>= micro_batches``) are left out.
        """
        f_mb, f_chunk = self._table(backward=False)
        b_mb, b_chunk = self._table(backward=True)
        total, warmup = len(f_mb), self.warmup(stage_id)
        steady = total - warmup
        # warm-up forwards; then F, B alternating; then the remaining backwards
        kind = np.concatenate(
            [
                np.full(warmup, Kind.FORWARD),
                np.tile([Kind.FORWARD, Kind.BACKWARD], steady),
                np.full(warmup, Kind.BACKWARD),
            ]
        )
        pairs_mb = np.stack([f_mb[warmup:], b_mb[:steady]], axis=1).reshape(-1)
        pairs_chunk = np.stack([f_chunk[warmup:], b_chunk[:steady]], axis=1).reshape(-1)
        mb = np.concatenate([f_mb[:warmup], pairs_mb, b_mb[steady:]])
        chunk = np.concatenate([f_chunk[:warmup], pairs_chunk, b_chunk[steady:]])
        real = mb < self.micro_batches
        return PassArrays(kind[real], mb[real], chunk[real])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(micro_batches={self.micro_batches}, "
            f"stages={self.stages}, stage_id={self.stage_id}, "
            f"virtual_stages={self.num_chunks})"
        )
