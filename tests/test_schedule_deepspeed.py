"""DeepSpeed's schedules, step for step: TrainSchedule, InferenceSchedule, DataParallelSchedule.

Every (schedule, micro_batches 1..16, stages 1..8, stage_id) is compared with
DeepSpeed on (class, buffer_id) per position and step, and on ``num_pipe_buffers()``:
against DeepSpeed itself when it is installed, and always against the golden file
``tests/golden/schedules_deepspeed.txt``, made from DeepSpeed 0.19.8 with::

    DS_ACCELERATOR=cpu python tests/test_schedule_deepspeed.py --write-golden

One line per schedule and stage: ``TrainSchedule M=3 S=2 stage=1 buffers=2:`` then
the steps, separated by `` | ``; an instruction is its code and buffer id (``F1`` is
``ForwardPass(buffer_id=1)``, ``OPT`` is ``OptimizerStep()``) and ``.`` an empty step.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from stagewise.schedule import (
    BackwardPass,
    DataParallelSchedule,
    ForwardPass,
    InferenceSchedule,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    TrainSchedule,
)
from stagewise.schedule import deepspeed as ours
from stagewise.schedule.instructions import BufferOpInstruction

GOLDEN = Path(__file__).parent / "golden" / "schedules_deepspeed.txt"
NAMES = ("TrainSchedule", "InferenceSchedule", "DataParallelSchedule")
MICRO_BATCHES = range(1, 17)
STAGES = range(1, 9)
#: DeepSpeed's class names -> our short codes (the same class names).
CODES = {
    cls.__name__: cls.code
    for cls in (
        LoadMicroBatch,
        ForwardPass,
        BackwardPass,
        SendActivation,
        RecvActivation,
        SendGrad,
        RecvGrad,
        ReduceTiedGrads,
        ReduceGrads,
        OptimizerStep,
    )
}


def _token(name: str, buffer_id: int | None) -> str:
    return CODES[name] + ("" if buffer_id is None else str(buffer_id))


def _ours_token(ins: PipeInstruction) -> str:
    return _token(ins.name, ins.buffer_id if isinstance(ins, BufferOpInstruction) else None)


def _deepspeed_token(ins: Any) -> str:
    return _token(ins.name, ins.kwargs.get("buffer_id"))


def _line(name: str, micro_batches: int, stages: int, stage: int, schedule: Any, token: Any) -> str:
    steps = [" ".join(token(ins) for ins in step) or "." for step in schedule]
    header = (
        f"{name} M={micro_batches} S={stages} stage={stage} buffers={schedule.num_pipe_buffers()}"
    )
    return f"{header}: {' | '.join(steps)}"


def _lines(module: ModuleType, token: Any) -> Iterator[str]:
    """Every schedule of ``module`` over the test grid, one line per stage."""
    for name in NAMES:
        for stages in STAGES:
            for micro_batches in MICRO_BATCHES:
                for stage in range(stages):
                    schedule = getattr(module, name)(micro_batches, stages, stage)
                    yield _line(name, micro_batches, stages, stage, schedule, token)


def _import_deepspeed_schedule() -> ModuleType:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.pipe import schedule

    return schedule


def test_golden_file_matches_ours() -> None:
    golden = GOLDEN.read_text().splitlines()
    mine = list(_lines(ours, _ours_token))
    assert len(golden) == len(mine) == 3 * 36 * 16
    for want, got in zip(golden, mine, strict=True):
        assert got == want


def test_deepspeed_matches_ours() -> None:
    schedule = _import_deepspeed_schedule()
    for want, got in zip(
        _lines(schedule, _deepspeed_token), _lines(ours, _ours_token), strict=True
    ):
        assert got == want


def test_golden_file_is_deepspeeds() -> None:
    schedule = _import_deepspeed_schedule()
    assert list(_lines(schedule, _deepspeed_token)) == GOLDEN.read_text().splitlines()


@pytest.mark.parametrize("cls", [TrainSchedule, InferenceSchedule, DataParallelSchedule])
def test_micro_batch_and_chunk_ids(cls: type[ours.PipeSchedule]) -> None:
    """Buffers cycle over the micro-batches; there is one chunk."""
    for stages in STAGES:
        for micro_batches in MICRO_BATCHES:
            for stage in range(stages):
                schedule = cls(micro_batches, stages, stage)
                buffers = schedule.num_pipe_buffers()
                for step in schedule.steps():
                    for ins in step:
                        if isinstance(ins, BufferOpInstruction):
                            assert ins.chunk_id == 0
                            assert 0 <= ins.micro_batch_id < micro_batches
                            if cls is not DataParallelSchedule:
                                assert ins.buffer_id == ins.micro_batch_id % buffers


def _text(schedule: ours.PipeSchedule) -> str:
    return " | ".join(" ".join(map(repr, step)) or "." for step in schedule.steps())


def test_train_schedule_pinned() -> None:
    """Micro-batch ids ride along; a send names the micro-batch it sends."""
    assert _text(TrainSchedule(3, 2, 0)) == (
        "L0 F0 | SA0 | L1 F1 | RG0 SA1 B0 | L2b0 F2b0 | RG1 SA2b0 B1 | . | RG2b0 B2b0 RTG RDG OPT"
    )
    assert _text(TrainSchedule(3, 2, 1)) == (
        ". | RA0 L0 F0 | B0 | SG0 RA1 L1 F1 | B1 | SG1 RA2b0 L2b0 F2b0 | B2b0 | SG2b0 RTG RDG OPT"
    )


def test_inference_schedule_pinned() -> None:
    assert _text(InferenceSchedule(3, 3, 1)) == ". | RA0 F0 | RA1 SA0 F1 | RA2b0 SA1 F2b0 | SA2b0"
    assert _text(InferenceSchedule(3, 3, 2)) == ". | . | L0 RA0 F0 | L1 RA1 F1 | L2b0 RA2b0 F2b0"


def test_data_parallel_schedule_pinned() -> None:
    assert _text(DataParallelSchedule(2, 3, 1)) == "L0 F0 B0 | L1b0 F1b0 B1b0 RDG OPT"


def test_iterating_the_schedule_yields_its_steps() -> None:
    schedule = TrainSchedule(4, 3, 1)
    assert list(schedule) == list(schedule.steps())
    assert list(schedule) == list(schedule.steps())  # iterating again starts over


def _diagram(doc: str | None) -> list[str]:
    """The rows of a docstring's diagram (``stage N  cells...``), without the label."""
    return re.findall(r"^\s*stage \d+ +(.*)$", doc or "", re.MULTILINE)


def _cells(schedule: ours.PipeSchedule, codes: tuple[str, ...]) -> list[str]:
    """Each step as the diagrams draw it: the reprs of ``codes``, buffers left out."""
    return [
        " ".join(re.sub(r"b\d+$", "", repr(ins)) for ins in step if ins.code in codes) or "."
        for step in schedule.steps()
    ]


def test_train_diagram_in_the_docstring_is_the_schedule() -> None:
    rows = _diagram(TrainSchedule.__doc__)
    assert len(rows) == 4
    for stage, row in enumerate(rows):
        assert row.split() == _cells(TrainSchedule(4, 4, stage), ("F", "B"))


def test_inference_diagram_in_the_docstring_is_the_schedule() -> None:
    rows = _diagram(InferenceSchedule.__doc__)
    assert len(rows) == 3
    for stage, row in enumerate(rows):
        cells = _cells(InferenceSchedule(3, 3, stage), ("L", "SA", "RA", "F"))
        assert row.split() == " ".join(cells).split()


def _write_golden() -> None:
    """Write the golden file from the installed DeepSpeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.pipe import schedule

    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text("".join(line + "\n" for line in _lines(schedule, _deepspeed_token)))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        raise SystemExit(f"usage: python {sys.argv[0]} --write-golden")
    _write_golden()
