"""Forward-only evaluation for schedules that hold several model chunks per stage.

Micro-batches go through the virtual stages in one global order, micro-batch
by micro-batch and virtual stage by virtual stage; each stage runs the cells
it holds in that order. Because every stage follows the same global order and
sends do not block, nothing can wait on a cell that comes later::

    virtual stage:  v0    v1    v2    v3        (S=2, 2 chunks, loop placement)
    stage 0 runs:   F0c0        F0c1            then F1c0, F1c1, ...
    stage 1 runs:         F0c0        F0c1      then F1c0, F1c1, ...
"""

from __future__ import annotations

from collections.abc import Iterator

from stagewise.schedule.base import PipeSchedule, Step
from stagewise.schedule.instructions import (
    ForwardPass,
    LoadMicroBatch,
    RecvActivation,
    SendActivation,
)
from stagewise.schedule.placement import Placement

__all__ = ["ChunkedInferenceSchedule"]


class ChunkedInferenceSchedule(PipeSchedule):
    """Forward passes only, with the chunk placement of ``layout``.

    Args:
        micro_batches, stages, stage_id: as for every schedule.
        layout: a schedule whose chunk placement (``num_chunks``, ``virtual_stage``,
            ``locate``) this one follows.
    """

    def __init__(
        self, micro_batches: int, stages: int, stage_id: int, layout: PipeSchedule
    ) -> None:
        super().__init__(micro_batches, stages, stage_id)
        self.layout = layout
        self.num_chunks = layout.num_chunks

    @property
    def placement(self) -> Placement:
        """The layout's placement."""
        return self.layout.placement

    def steps(self) -> Iterator[Step]:
        last = self.num_virtual_stages - 1
        for mb in range(self.micro_batches):
            for virtual in range(self.num_virtual_stages):
                stage, chunk = self.locate(virtual)
                if stage != self.stage_id:
                    continue
                step: Step = []
                ids = {"buffer_id": mb, "micro_batch_id": mb, "chunk_id": chunk}
                if virtual in (0, last):
                    step.append(LoadMicroBatch(**ids))
                if virtual > 0:
                    step.append(RecvActivation(**ids))
                step.append(ForwardPass(**ids))
                if virtual < last:
                    step.append(SendActivation(**ids))
                yield step
