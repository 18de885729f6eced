"""The interpreter: one handler per instruction class, open to new ones, errors that say where."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from distributed import run_distributed
from pipeline_cases import build_pipeline, ds_config
from stagewise.engine.interpreter import Interpreter
from stagewise.engine.state import BatchState, RunMode
from stagewise.errors import InstructionError, PeerError
from stagewise.schedule import (
    ForwardPass,
    PipeInstruction,
    TrainSchedule,
    instructions,
    schedule_table,
)
from stagewise.schedule.kinds import Kind


def _noop(instr: Any, batch: BatchState) -> None:
    batch.losses.append(repr(instr))


def _batch() -> BatchState:
    return BatchState(RunMode.train(2), lambda: None)


def _all_classes() -> dict[type[PipeInstruction], Any]:
    return {cls: _noop for cls in _concrete_instruction_classes()}


def _concrete_instruction_classes() -> list[type[PipeInstruction]]:
    return [
        cls
        for name in instructions.__all__
        if isinstance(cls := getattr(instructions, name), type)
        and issubclass(cls, PipeInstruction)
        and cls.code
    ]


def test_runs_every_instruction_in_order() -> None:
    steps = [list(step) for step in TrainSchedule(2, 1, 0).steps()]
    batch = _batch()
    events = Interpreter(_all_classes(), 0, 0).run(steps, batch, record=True)
    assert batch.losses == [repr(i) for step in steps for i in step]
    assert [e.name for e in events] == batch.losses


def test_a_failing_handler_names_rank_step_instruction_and_marks_the_grid() -> None:
    def broken(instr: Any, batch: BatchState) -> None:
        raise KeyError((0, 1))

    handlers = {**_all_classes(), ForwardPass: broken}
    steps = [list(step) for step in TrainSchedule(2, 2, 1).steps()]
    interpreter = Interpreter(handlers, stage_id=1, rank=3)
    with pytest.raises(InstructionError) as info:
        interpreter.run(
            steps,
            _batch(),
            schedule="TrainSchedule(micro_batches=2, stages=2, stage_id=1)",
            table=lambda: schedule_table(TrainSchedule, 2, 2),
        )
    message = str(info.value)
    assert message.startswith(
        "stage 1 (rank 3), step 1 of TrainSchedule(micro_batches=2, stages=2, stage_id=1): "
        "F0 failed: KeyError: (0, 1)"
    ), message
    assert ">>F0<<" in message and "stage 1 |" in message, message
    assert isinstance(info.value.original, KeyError)


def test_stagewise_errors_keep_their_class() -> None:
    def dead_peer(instr: Any, batch: BatchState) -> None:
        raise PeerError("stage 0 (rank 0) closed the connection")

    handlers = {**_all_classes(), ForwardPass: dead_peer}
    with pytest.raises(PeerError, match=r"step 0: F0 failed: PeerError: stage 0 \(rank 0\)"):
        Interpreter(handlers, 0, 0).run([[ForwardPass(0)]], _batch())


def test_register_adds_wraps_and_resolves_subclasses() -> None:
    class Tagged(ForwardPass):
        code = "F"

    class Probe(PipeInstruction):
        kind: ClassVar[Kind] = Kind.CUSTOM
        code: ClassVar[str] = "PRB"

    interpreter = Interpreter(_all_classes(), 0, 0)
    seen: list[str] = []

    def wrapper(instr: Any, batch: BatchState) -> None:
        seen.append("wrapped")
        original(instr, batch)

    original = interpreter.register(ForwardPass, wrapper)
    assert original is _noop
    assert interpreter.register(Probe, lambda instr, batch: seen.append("probe")) is None
    batch = _batch()
    interpreter.run([[Tagged(0), Probe()]], batch)
    assert seen == ["wrapped", "probe"] and batch.losses == ["F0"]
    with pytest.raises(TypeError, match=r"subclass of stagewise\.schedule\.PipeInstruction"):
        interpreter.register(int, _noop)  # type: ignore[arg-type]


def _handled_classes(rank: int, world_size: int) -> list[str]:
    case = {"model": "mlp", "stages": 1, "micro_batches": 2, "mb_size": 2}
    module = build_pipeline(case)
    import stagewise

    engine, *_ = stagewise.initialize(model=module, config=ds_config(case))
    return sorted(cls.__name__ for cls in engine.interpreter.handlers)


def test_the_engine_has_a_handler_for_every_instruction_class() -> None:
    (handled,) = run_distributed(_handled_classes, 1)
    assert handled == sorted(cls.__name__ for cls in _concrete_instruction_classes())
