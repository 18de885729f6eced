"""The mirror of ``deepspeed.runtime.pipe.schedule``: DeepSpeed's schedules and instructions.

``TrainSchedule``, ``InferenceSchedule`` and ``DataParallelSchedule`` yield
DeepSpeed's steps exactly; the instruction classes are stagewise's (frozen
values with ``buffer_id`` first, so ``ForwardPass(0)`` and
``ForwardPass(buffer_id=0)`` work as in DeepSpeed). A new instruction subclasses
``PipeInstruction`` or ``BufferOpInstruction`` and gets a handler with
``engine.register_instruction`` (see ``docs/moving-from-deepspeed.md``).
"""

from stagewise.schedule import (
    BackwardInputPass,
    BackwardPass,
    BackwardWeightPass,
    BufferOpInstruction,
    DataParallelSchedule,
    ForwardPass,
    InferenceSchedule,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

__all__ = [
    "BackwardInputPass",
    "BackwardPass",
    "BackwardWeightPass",
    "BufferOpInstruction",
    "DataParallelSchedule",
    "ForwardPass",
    "InferenceSchedule",
    "LoadMicroBatch",
    "OptimizerStep",
    "PipeInstruction",
    "PipeSchedule",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "ReduceTiedGrads",
    "SendActivation",
    "SendGrad",
    "TrainSchedule",
]
