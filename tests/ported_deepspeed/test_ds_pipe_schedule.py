"""DeepSpeed's ``tests/unit/runtime/pipe/test_pipe_schedule.py``, checked in our words.

Through ``stagewise.runtime.pipe.schedule`` (DeepSpeed's path): the shape of
``InferenceSchedule`` and ``TrainSchedule`` on the first, middle and last of
three stages and on one stage. DeepSpeed's DualPipeV cases are not here: its
``DualPipeVSchedule`` and ``CommitP2P`` are not mirrored.
"""

from __future__ import annotations

from typing import Any

import pytest

import stagewise.runtime.pipe.schedule as schedule


def _count(cmds: list[Any], cls: type) -> int:
    return sum(type(c) is cls for c in cmds)


def test_inference_on_one_stage_loads_and_runs_each_micro_batch() -> None:
    sched = schedule.InferenceSchedule(micro_batches=4, stages=1, stage_id=0)
    steps = list(iter(sched))
    assert sched.num_micro_batches == 4 and len(steps) == 4
    for cmds in steps:
        assert [type(c) for c in cmds] == [schedule.LoadMicroBatch, schedule.ForwardPass]
        assert cmds[0].buffer_id == cmds[1].buffer_id


def test_training_on_one_stage_alternates_forward_and_backward() -> None:
    sched = schedule.TrainSchedule(micro_batches=4, stages=1, stage_id=0)
    steps = list(iter(sched))
    assert len(steps) == 2 * sched.num_micro_batches
    for index, cmds in enumerate(steps):
        if index % 2:
            assert type(cmds[0]) is schedule.BackwardPass and len(cmds) in (1, 4)
        else:
            assert [type(c) for c in cmds] == [schedule.LoadMicroBatch, schedule.ForwardPass]
            assert cmds[0].buffer_id == cmds[1].buffer_id


@pytest.mark.parametrize("micro_batches", [1, 3, 8, 10])
def test_inference_on_three_stages(micro_batches: int) -> None:
    stages = 3
    first, middle, last = (
        list(iter(schedule.InferenceSchedule(micro_batches, stages, stage)))
        for stage in range(stages)
    )
    for steps in (first, middle, last):
        assert len(steps) == micro_batches + stages - 1
    # First stage: load and run at once, then also send; the last busy step only sends.
    for index, cmds in enumerate(first):
        if index == 0:
            assert [type(c) for c in cmds] == [schedule.LoadMicroBatch, schedule.ForwardPass]
        elif index == micro_batches:
            assert [type(c) for c in cmds] == [schedule.SendActivation]
        elif index > micro_batches:
            assert cmds == []
        else:
            assert len(cmds) == 3
            for cls in (schedule.LoadMicroBatch, schedule.ForwardPass, schedule.SendActivation):
                assert _count(cmds, cls) == 1
    # Middle stage: idle one step, then receive, run and (after the first) send.
    for index, cmds in enumerate(middle):
        if index < 1 or index > 1 + micro_batches:
            assert cmds == []
        elif index == 1 + micro_batches:
            assert [type(c) for c in cmds] == [schedule.SendActivation]
        else:
            assert _count(cmds, schedule.LoadMicroBatch) == 0
            assert _count(cmds, schedule.ForwardPass) == _count(cmds, schedule.RecvActivation) == 1
            assert _count(cmds, schedule.SendActivation) == (1 if index > 1 else 0)
    # Last stage: loads its labels, receives and runs; never sends.
    for index, cmds in enumerate(last):
        if index < 2 or index > 2 + micro_batches:
            assert cmds == []
        else:
            for cls in (schedule.LoadMicroBatch, schedule.ForwardPass, schedule.RecvActivation):
                assert _count(cmds, cls) == 1
            assert _count(cmds, schedule.SendActivation) == 0


def test_training_ends_of_three_stages() -> None:
    first = schedule.TrainSchedule(micro_batches=8, stages=3, stage_id=0)
    for cmds in first:
        assert not any(type(c) in (schedule.SendGrad, schedule.RecvActivation) for c in cmds)
        for c in cmds:
            if isinstance(c, schedule.BufferOpInstruction):
                assert 0 <= c.buffer_id < first.num_pipe_buffers()
    last = schedule.TrainSchedule(stages=3, micro_batches=4, stage_id=2)
    assert len(list(iter(last))) == 2 * (last.micro_batches + last.stages - 1)
    for cmds in last:
        assert not any(type(c) in (schedule.SendActivation, schedule.RecvGrad) for c in cmds)


@pytest.mark.parametrize(
    ("stage", "first", "last"), [(0, True, False), (1, False, False), (2, False, True)]
)
def test_stage_queries(stage: int, first: bool, last: bool) -> None:
    sched = schedule.TrainSchedule(stages=3, micro_batches=4, stage_id=stage)
    assert (sched.is_first_stage, sched.is_last_stage) == (first, last)
