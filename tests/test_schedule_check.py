"""The schedule checker: sound schedules pass, each kind of broken one is caught."""

from __future__ import annotations

import doctest
import pickle
import re
from collections.abc import Iterator
from typing import ClassVar

import pytest

from stagewise.schedule import (
    DataParallelSchedule,
    InferenceSchedule,
    OptimizerStep,
    PipeSchedule,
    Position,
    ScheduleError,
    Step,
    Table,
    TrainSchedule,
    check_schedule,
    check_table,
    format_grid,
    parse_instruction,
    schedule_table,
)


def table_of(*rows: str) -> Table:
    """A table from text: one string per stage, steps split by ``|``, ``.`` for empty."""
    return [
        [
            [parse_instruction(text) for text in step.split() if text != "."]
            for step in row.split("|")
        ]
        for row in rows
    ]


def find(table: Table, stage: int, text: str) -> tuple[int, int]:
    """``(step, offset)`` of the instruction written ``text`` on ``stage``."""
    for step, instructions in enumerate(table[stage]):
        for offset, ins in enumerate(instructions):
            if repr(ins) == text:
                return step, offset
    raise LookupError(f"{text} not on stage {stage}")


class TwoChunks(PipeSchedule):
    """Placement only: two chunks per stage, looping (virtual stage = chunk * S + stage)."""

    num_chunks = 2
    training: ClassVar[bool] = True

    def steps(self) -> Iterator[Step]:
        yield from ()


# -- sound schedules ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TrainSchedule, InferenceSchedule, DataParallelSchedule])
def test_deepspeed_schedules_pass(cls: type[PipeSchedule]) -> None:
    for stages in range(1, 9):
        for micro_batches in range(1, 17):
            table = check_schedule(cls, micro_batches, stages)
            assert table == schedule_table(cls, micro_batches, stages)


def test_a_large_schedule_passes() -> None:
    check_schedule(TrainSchedule, micro_batches=256, stages=32)


def test_two_chunks_with_split_backward_pass() -> None:
    # virtual stages: 0 = stage 0 chunk 0, 1 = stage 1 chunk 0, 2 = stage 0 chunk 1, 3 = stage 1 chunk 1
    table = table_of(
        "L0 F0 SA0 | RA0c1 F0c1 SA0c1 | RG0c1 B0c1 SG0c1 | RG0 I0 W0 RTG RDG OPT",
        "RA0 F0 SA0 | L0 RA0c1 F0c1 B0c1 SG0c1 | RG0 I0 SG0 W0 RTG RDG OPT",
    )
    check_table(table, TwoChunks(1, 2, 0))


def test_inference_with_two_chunks_passes() -> None:
    table = table_of("L0 F0 SA0 | RA0c1 F0c1 SA0c1", "RA0 F0 SA0 | L0 RA0c1 F0c1")
    check_table(table, TwoChunks(1, 2, 0), training=False)


# -- broken schedules -----------------------------------------------------------------
def test_swapped_sends() -> None:
    table = table_of(
        "L0 F0 | L1 F1 | L2 SA1 SA0 F2 | SA2 | .",
        ". | L0 RA0 F0 | L1 RA1 F1 | L2 RA2 F2",
    )
    with pytest.raises(ScheduleError, match="sends and receives must come in the same order"):
        check_table(table, InferenceSchedule(3, 2, 0))


def test_missing_receive() -> None:
    table = schedule_table(TrainSchedule, 4, 3)
    step, offset = find(table, 2, "RA2b0")
    del table[2][step][offset]
    with pytest.raises(ScheduleError, match=r"stage 2 \(virtual stage 2\) has no RA2: every "):
        check_table(table, TrainSchedule(4, 3, 0))


def test_duplicated_send() -> None:
    table = table_of("L0 F0 SA0 SA0", "RA0 L0 F0")
    with pytest.raises(ScheduleError, match=r"SA0 at step 0 and again SA0 at step 0: .* once"):
        check_table(table, InferenceSchedule(1, 2, 0))


def test_backward_before_forward() -> None:
    table = schedule_table(TrainSchedule, 4, 2)
    f_step, f_offset = find(table, 1, "F1")
    b_step, b_offset = find(table, 1, "B1")
    table[1][f_step][f_offset], table[1][b_step][b_offset] = (
        table[1][b_step][b_offset],
        table[1][f_step][f_offset],
    )
    with pytest.raises(ScheduleError, match="forward runs before its backward") as caught:
        check_table(table, TrainSchedule(4, 2, 0))
    # the forward (now where the backward was) and the backward are marked
    assert caught.value.positions == (Position(1, b_step, b_offset), Position(1, f_step, f_offset))


def test_weight_gradient_before_input_gradient() -> None:
    table = table_of("L0 F0 SA0 | RG0 W0 I0 RTG RDG OPT", "RA0 L0 F0 B0 SG0 RTG RDG OPT")
    with pytest.raises(ScheduleError, match=r"input gradient \(I\) runs before"):
        check_table(table, TrainSchedule(1, 2, 0))


def test_backward_both_whole_and_split() -> None:
    table = table_of("L0 F0 SA0 | RG0 B0 I0 RTG RDG OPT", "RA0 L0 F0 B0 SG0 RTG RDG OPT")
    with pytest.raises(ScheduleError, match="one B, or an I and a W"):
        check_table(table, TrainSchedule(1, 2, 0))


def test_duplicated_optimizer_step() -> None:
    table = schedule_table(TrainSchedule, 4, 3)
    table[1][-1].append(OptimizerStep())
    with pytest.raises(ScheduleError, match=r"stage 1 runs OPT 2 times \(steps 11, 11\)"):
        check_table(table, TrainSchedule(4, 3, 0))


def test_optimizer_step_before_compute() -> None:
    table = table_of("L0 F0 OPT RDG | B0")
    with pytest.raises(ScheduleError, match="come after all compute"):
        check_table(table, TrainSchedule(1, 1, 0))


def test_missing_optimizer_step() -> None:
    table = table_of("L0 F0 | B0 RDG")
    with pytest.raises(ScheduleError, match="stage 0 never runs OPT"):
        check_table(table, TrainSchedule(1, 1, 0))


def test_reduction_after_optimizer_step() -> None:
    table = table_of("L0 F0 | B0 RDG OPT RTG")
    with pytest.raises(ScheduleError, match="reduced before the optimizer step"):
        check_table(table, TrainSchedule(1, 1, 0))


def test_deadlock_reports_every_stage() -> None:
    table = table_of(
        "L0 F0 | SA0 | RG0 | B0 | L1 F1 | SA1 | RG1 | B1 RTG RDG OPT",
        "RA0 | RA1 | L0 F0 | B0 | SG0 | L1 F1 | B1 | SG1 RTG RDG OPT",
    )
    with pytest.raises(ScheduleError, match="deadlock") as caught:
        check_table(table, TrainSchedule(2, 2, 0))
    message = str(caught.value)
    assert "stage 0: RG0 at step 2 waits for stage 1 to send it" in message
    assert "stage 1: RA1 at step 1 waits for stage 0 to send it" in message
    assert ">>RG0<<" in message and ">>RA1<<" in message


def test_deadlock_through_a_collective() -> None:
    # stage 1 steps the optimizer (a collective over all stages) before it sends
    # the gradient that stage 0 waits for
    table = table_of(
        "L0 F0 | SA0 | RG0 B0 RTG RDG OPT",
        ". | RA0 L0 F0 | B0 RTG RDG OPT SG0",
    )
    with pytest.raises(ScheduleError, match=r"stage 1: RTG at step 2 waits for stages \[0\]"):
        check_table(table, TrainSchedule(1, 2, 0))


def test_buffer_reused_too_early() -> None:
    table = schedule_table(TrainSchedule, 4, 3)
    # on stage 1, a step sends micro-batch 0's gradient and receives micro-batch 2's
    # activation into the same buffer: receiving first overwrites what is being sent
    step, offset = find(table, 1, "SG0")
    assert repr(table[1][step][offset + 1]) == "RA2b0"
    table[1][step][offset], table[1][step][offset + 1] = (
        table[1][step][offset + 1],
        table[1][step][offset],
    )
    with pytest.raises(ScheduleError, match="uses buffer 0 while micro-batch 0 still needs it"):
        check_table(table, TrainSchedule(4, 3, 0))


def test_buffer_beyond_num_pipe_buffers() -> None:
    table = schedule_table(TrainSchedule, 4, 3)
    with pytest.raises(ScheduleError, match=r"num_pipe_buffers\(\) is 1"):
        check_table(table, TrainSchedule(4, 3, 0), num_buffers=[1, 1, 1])


def test_receive_after_its_forward() -> None:
    table = table_of("L0 F0 SA0", "F0 RA0 L0")
    with pytest.raises(ScheduleError, match="received before the forward that uses it"):
        check_table(table, InferenceSchedule(1, 2, 0))


def test_send_past_the_last_stage() -> None:
    table = table_of("L0 F0 SA0 | RG0 B0 RTG RDG OPT", "RA0 L0 F0 SA0 B0 SG0 RTG RDG OPT")
    with pytest.raises(ScheduleError, match="the last virtual stage sends no activation"):
        check_table(table, TrainSchedule(1, 2, 0))


def test_loads_only_at_the_ends() -> None:
    table = table_of("L0 F0 SA0", "L0 RA0 F0 SA0", "L0 RA0 F0")
    with pytest.raises(ScheduleError, match="holds neither the first nor the last"):
        check_table(table, InferenceSchedule(1, 3, 0))


def test_missing_micro_batch() -> None:
    with pytest.raises(ScheduleError, match="never runs F1: every micro-batch"):
        check_table(table_of("L0 F0"), InferenceSchedule(2, 1, 0))


def test_micro_batch_out_of_range() -> None:
    with pytest.raises(ScheduleError, match=r"names micro-batch 5, but the batch has .* 0\.\.1"):
        check_table(table_of("L0 F0 | L5 F5"), InferenceSchedule(2, 1, 0))


def test_chunk_out_of_range() -> None:
    with pytest.raises(ScheduleError, match="names chunk 1, but the schedule places 1 chunk"):
        check_table(table_of("L0 F0 F0c1"), InferenceSchedule(1, 1, 0))


def test_inference_has_no_backward() -> None:
    with pytest.raises(ScheduleError, match="an inference schedule has no backward"):
        check_table(table_of("L0 F0 B0"), InferenceSchedule(1, 1, 0))


def test_inference_has_no_optimizer_step() -> None:
    with pytest.raises(ScheduleError, match="only training reduces gradients"):
        check_table(table_of("L0 F0 OPT"), InferenceSchedule(1, 1, 0), training=False)


def test_chunks_must_meet_the_right_virtual_stage() -> None:
    # stage 1 chunk 0 (virtual stage 1) sends to stage 0 chunk 1 (virtual stage 2),
    # but stage 0 receives it into chunk 0
    table = table_of("L0 F0 SA0 RA0 | F0c1 SA0c1", "RA0 F0 SA0 | L0 RA0c1 F0c1")
    with pytest.raises(ScheduleError, match=r"stage 0 \(virtual stage 2\) has no RA0c1"):
        check_table(table, TwoChunks(1, 2, 0), training=False)


def test_something_that_is_not_an_instruction() -> None:
    table = [[[parse_instruction("L0"), parse_instruction("F0"), "F1"]]]
    with pytest.raises(ScheduleError, match=r"'F1' at step 0 is a str, not an instruction"):
        check_table(table, InferenceSchedule(1, 1, 0))  # type: ignore[arg-type]


def test_table_must_have_every_stage() -> None:
    with pytest.raises(ValueError, match="the table has 1 stages but the schedule has 2"):
        check_table(table_of("L0 F0"), InferenceSchedule(1, 2, 0))


# -- the error and the grid -----------------------------------------------------------
def test_error_is_a_value_error_with_the_grid() -> None:
    table = table_of("L0 F0 | B0 RDG OPT OPT")
    with pytest.raises(ValueError) as caught:
        check_table(table, TrainSchedule(1, 1, 0))
    error = caught.value
    assert isinstance(error, ScheduleError)
    assert error.problem.startswith("stage 0 runs OPT 2 times")
    assert str(error) == (
        f"{error.problem}\n\nstep    | 0     | 1\nstage 0 | L0 F0 | B0 RDG >>OPT<< >>OPT<<"
    )


def test_error_pickles() -> None:
    with pytest.raises(ScheduleError) as caught:
        check_table(table_of("L0 F0 | B0 RDG OPT OPT"), TrainSchedule(1, 1, 0))
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert copy.problem == caught.value.problem
    assert copy.positions == caught.value.positions


def test_doctests() -> None:
    import stagewise.schedule.check

    assert doctest.testmod(stagewise.schedule.check).failed == 0


def test_format_grid() -> None:
    table = schedule_table(InferenceSchedule, 2, 3)
    assert format_grid(table, [Position(1, 2, 1)]) == (
        "step    | 0     | 1         | 2              | 3\n"
        "stage 0 | L0 F0 | L1 SA0 F1 | SA1            | .\n"
        "stage 1 | .     | RA0 F0    | RA1 >>SA0<< F1 | SA1\n"
        "stage 2 | .     | .         | L0 RA0 F0      | L1 RA1 F1"
    )


def test_format_grid_windows_large_tables() -> None:
    table = schedule_table(TrainSchedule, 64, 40)
    text = format_grid(table, [Position(20, 100, 0)], max_steps=10, max_stages=4)
    lines = text.splitlines()
    assert [field.strip() for field in lines[0].split(" | ")[1:]] == [
        str(step) for step in range(96, 106)
    ]
    assert [line.split(" | ")[0].strip() for line in lines[1:-1]] == [
        "stage 19",
        "stage 20",
        "stage 21",
    ]
    assert ">>" in lines[2]
    assert lines[-1] == "(showing steps 96..105 of 206 and 3 of 40 stages)"


def test_format_grid_gaps_between_stages() -> None:
    table = schedule_table(InferenceSchedule, 1, 40)
    text = format_grid(table, [Position(0, 0, 0), Position(30, 30, 0)], max_stages=8)
    assert re.search(r"^stage 1 .*\n\.\.\. .*\nstage 29 ", text, re.MULTILINE)
