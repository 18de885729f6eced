"""DeepSpeed's engine surface over real processes: in-place first layers, subclass hooks.

Every result is compared with one process or with the plain engine on the same data.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import stagewise
import stagewise.runtime.pipe.schedule as ds_schedule
from distributed import run_distributed
from pipeline_cases import batches_for, build_pipeline, ds_config, train_pipeline
from stagewise.schedule import ForwardPass, OptimizerStep, PipeInstruction, TrainSchedule
from stagewise.schedule.kinds import Kind
from test_engine import check_against_reference

pytestmark = pytest.mark.slow

# -- a stage may modify its input in place -----------------------------------------------------

# Stages 1 and 2 start with nn.ReLU(inplace=True).
INPLACE = {
    "model": "inplace",
    "micro_batches": 4,
    "mb_size": 3,
    "steps": 2,
    "stages": 3,
    "partition": [0, 1, 3, 5],
}
INPLACE_CASES = [
    INPLACE,
    {**INPLACE, "ckpt_interval": 1},  # activation checkpointing around the in-place layer
    {**INPLACE, "pipeline": {"schedule": "zb-h1"}},  # the split backward (I, then W)
]


def _first_layer_in_place(rank: int, world_size: int) -> bool:
    """Stage 0 starts with an in-place ReLU: the caller's batches must stay as they were."""
    layers: list[Any] = [nn.ReLU(inplace=True), nn.Linear(4, 8)]
    for _ in range(world_size - 1):
        layers += [nn.ReLU(inplace=True), nn.Linear(8, 8)]
    layers[-1] = nn.Linear(8, 3)
    torch.manual_seed(0)
    model = stagewise.PipelineModule(
        layers=layers,
        num_stages=world_size,
        loss_fn=nn.functional.cross_entropy,
        partition_method=list(range(0, 2 * world_size + 1, 2)),
    )
    engine, *_ = stagewise.initialize(model=model, config=ds_config(INPLACE))
    data = batches_for(INPLACE, 0, 0)
    kept = [(x.clone(), y.clone()) for x, y in data]
    engine.train_batch(iter(data))
    return all(
        torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(data, kept, strict=True)
    )


def _inplace_runs(rank: int, world_size: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": [train_pipeline(rank, world_size, case) for case in cases],
        "batches_untouched": _first_layer_in_place(rank, world_size),
    }


def test_stages_may_modify_their_input_in_place() -> None:
    results = run_distributed(_inplace_runs, 3, INPLACE_CASES, timeout=240)
    for index, case in enumerate(INPLACE_CASES):
        check_against_reference(case, [r["runs"][index] for r in results])
    assert all(r["batches_untouched"] for r in results)


# -- DeepSpeed-style subclasses and new instructions -------------------------------------------

BASE = {"model": "mlp", "micro_batches": 4, "mb_size": 3, "steps": 2, "stages": 2}


class Tally(PipeInstruction):
    """A user's instruction: the checker and the simulator pass over a ``CUSTOM`` kind."""

    kind: ClassVar[Kind] = Kind.CUSTOM
    code: ClassVar[str] = "TAL"


class TallySchedule(TrainSchedule):
    """1F1B with a Tally after the optimizer step."""

    def steps(self) -> Any:
        for step in super().steps():
            yield [*step, Tally()] if any(isinstance(i, OptimizerStep) for i in step) else step


class RecordingEngine(stagewise.PipelineEngine):
    """Wraps a built-in instruction by overriding DeepSpeed's method for it."""

    seen: list[tuple[int, str]]

    def _exec_forward_pass(self, buffer_id: int) -> None:
        self.seen.append((buffer_id, type(self.current_instruction).__name__))
        super()._exec_forward_pass(buffer_id)


class TallyEngine(stagewise.PipelineEngine):
    """Adds an instruction through DeepSpeed's _INSTRUCTION_MAP."""

    tallies = 0

    def _exec_tally(self) -> None:
        self.tallies += 1

    _INSTRUCTION_MAP: ClassVar[dict[Any, Any]] = {
        **stagewise.PipelineEngine._INSTRUCTION_MAP,
        Tally: _exec_tally,
    }


def _train(engine: Any, case: dict[str, Any]) -> list[float]:
    dp = engine.grid.get_data_parallel_rank()
    return [float(engine.train_batch(iter(batches_for(case, s, dp)))) for s in range(case["steps"])]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _subclasses(rank: int, world_size: int) -> dict[str, Any]:
    config = stagewise.Config.from_any(ds_config(BASE))
    records = _Records()
    logging.getLogger("stagewise").addHandler(records)
    # A DeepSpeed config with a typo and a seed_layers the module was not built with.
    loose = {**ds_config(BASE), "grandient_accumulation_steps": 4}
    loose["pipeline"] = {**loose["pipeline"], "seed_layers": False}
    plain = _train(stagewise.initialize(model=build_pipeline(BASE), config=loose)[0], BASE)
    logging.getLogger("stagewise").removeHandler(records)

    recording = RecordingEngine(module=build_pipeline(BASE), config=config)
    recording.seen = []
    recorded = _train(recording, BASE)

    wrapped = stagewise.initialize(model=build_pipeline(BASE), config=ds_config(BASE))[0]
    steps: list[str] = []

    def counting(instr: Any, batch: Any) -> None:
        steps.append(repr(instr))
        builtin(instr, batch)

    builtin = wrapped.register_instruction(OptimizerStep, counting)
    assert builtin is not None
    wrapped_losses = _train(wrapped, BASE)

    ds_schedule.TrainSchedule = TallySchedule  # type: ignore[misc]  # Megatron-DeepSpeed's swap
    try:
        tally = TallyEngine(module=build_pipeline(BASE), config=config)
        tally_losses = _train(tally, BASE)
        registered = stagewise.initialize(model=build_pipeline(BASE), config=ds_config(BASE))[0]
        calls: list[str] = []
        registered.register_instruction(Tally, lambda i, b: calls.append(repr(i)))
        registered_losses = _train(registered, BASE)
    finally:
        ds_schedule.TrainSchedule = TrainSchedule  # type: ignore[misc]
    outside = ""
    try:
        recording._exec_forward_pass(0)
    except stagewise.PipelineError as exc:
        outside = str(exc)
    return {
        "plain": plain,
        "recorded": recorded,
        "seen": recording.seen,
        "forwards": sum(
            isinstance(i, ForwardPass)
            for step in TrainSchedule(BASE["micro_batches"], world_size, rank).steps()
            for i in step
        ),
        "wrapped": (wrapped_losses, steps),
        "tally": (tally_losses, tally.tallies),
        "registered": (registered_losses, calls),
        "outside": outside,
        "warnings": records.messages,
    }


def test_subclass_overrides_and_new_instructions() -> None:
    results = run_distributed(_subclasses, 2, timeout=240)
    for result in results:
        plain = result["plain"]
        # An _exec_forward_pass override wraps the built-in forward: same losses, every F seen.
        assert result["recorded"] == plain
        per_step = result["forwards"]
        assert len(result["seen"]) == BASE["steps"] * per_step
        assert {name for _, name in result["seen"]} == {"ForwardPass"}
        # register_instruction returns the handler it replaces, so it can be wrapped.
        losses, steps = result["wrapped"]
        assert losses == plain and steps == ["OPT", "OPT"]
        # A new instruction by DeepSpeed's _INSTRUCTION_MAP, in a swapped TrainSchedule.
        losses, tallies = result["tally"]
        assert losses == plain and tallies == BASE["steps"]
        losses, calls = result["registered"]
        assert losses == plain and calls == ["TAL", "TAL"]
        assert "only inside train_batch/eval_batch" in result["outside"]
    # The config's warnings, on rank 0 only: the unknown key, and seed_layers.
    first, second = (r["warnings"] for r in results)
    assert second == [] and len(first) == 2
    assert first[0].startswith("unknown config key 'grandient_accumulation_steps'; did you mean")
    assert first[1].startswith("pipeline.seed_layers=False is not used: the PipelineModule was")
