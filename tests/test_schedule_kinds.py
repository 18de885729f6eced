"""One source for instruction kinds: every class has one, every reader decides on it."""

from __future__ import annotations

import ast
import doctest
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import stagewise.schedule as schedule_pkg
from stagewise.schedule import (
    BufferOpInstruction,
    Kind,
    PipeInstruction,
    Placement,
    Program,
    Step,
    TrainSchedule,
    check_schedule,
    check_table,
    instruction_class,
    parse_instruction,
    schedule_table,
    simulate,
)
from stagewise.schedule import instructions as instructions_module
from stagewise.schedule import kinds as kinds_module
from stagewise.schedule.check.state import CheckState
from stagewise.schedule.kinds import kind_mask
from stagewise.schedule.render import TimelineEvent
from stagewise.schedule.simulate import sim_op

SCHEDULE_DIR = Path(schedule_pkg.__file__).parent


def concrete_instruction_classes() -> list[type[PipeInstruction]]:
    found = []
    for _, cls in inspect.getmembers(instructions_module, inspect.isclass):
        if issubclass(cls, PipeInstruction) and not cls.__dict__.get("_abstract", False):
            found.append(cls)
    return found


@dataclass(frozen=True, repr=False)
class SaveCheckpoint(PipeInstruction):
    """A user's own instruction: the engine would run it through a registered handler."""

    kind: ClassVar[Kind] = Kind.CUSTOM
    code: ClassVar[str] = "CKPT"


@dataclass(frozen=True, repr=False)
class Prefetch(BufferOpInstruction):
    """A custom instruction with buffer fields: they mean nothing to the checker."""

    kind: ClassVar[Kind] = Kind.CUSTOM
    code: ClassVar[str] = "PF"


# -- the enum -----------------------------------------------------------------------------
def test_every_kind_has_its_traits() -> None:
    for kind in Kind:
        assert kind.description
        if kind == Kind.CUSTOM:
            assert kind.code is None
            assert not (kind.is_compute or kind.is_transfer or kind.is_buffer_op)
            assert not (kind.is_collective or kind.closes_batch or kind.is_backward)
            continue
        assert kind.code is not None and Kind.from_code(kind.code) is kind
        assert kind.is_transfer == (kind.is_send or kind.is_recv)
        assert (kind.carries is not None) == kind.is_transfer
        assert kind.is_activation == (kind.carries == "activation")
        assert kind.is_gradient == (kind.carries == "gradient")
        if kind.is_compute or kind.is_transfer:
            assert kind.is_buffer_op


def test_kind_groups() -> None:
    def codes(trait: str) -> list[str | None]:
        return [kind.code for kind in Kind if getattr(kind, trait)]

    assert codes("is_compute") == ["F", "B", "I", "W"]
    assert codes("is_send") == ["SA", "SG"]
    assert codes("is_recv") == ["RA", "RG"]
    assert codes("is_collective") == ["RTG", "OPT"]
    assert codes("closes_batch") == ["RTG", "RDG", "OPT"]
    assert codes("makes_input_grad") == ["B", "I"]
    assert codes("frees_activation") == ["B", "W"]
    assert codes("is_buffer_op") == ["L", "F", "B", "I", "W", "SA", "RA", "SG", "RG"]


def test_kind_mask_is_indexed_by_kind() -> None:
    mask = kind_mask("is_compute")
    assert mask.tolist() == [kind.is_compute for kind in Kind]
    assert not mask.flags.writeable
    with pytest.raises(ValueError, match=r"Kind\.code is not a boolean property"):
        kind_mask("code")


def test_unknown_code() -> None:
    with pytest.raises(ValueError, match=r"no instruction kind has the code 'X': the codes are"):
        Kind.from_code("X")


# -- every class has a kind, every reader a decision ----------------------------------------
def test_every_instruction_class_has_a_kind_the_readers_decide_on() -> None:
    classes = concrete_instruction_classes()
    assert {cls.kind for cls in classes} == set(Kind) - {Kind.CUSTOM}
    for cls in classes:
        assert isinstance(cls.kind, Kind)
        assert cls.code == cls.kind.code
        assert instruction_class(cls.kind) is cls
        sim_op(cls.kind)  # the simulator's decision: raises for a kind it does not know
        assert issubclass(cls, BufferOpInstruction) == cls.kind.is_buffer_op
    # the checker reads the kind of whatever sits in a table
    table = [[[cls(0) if issubclass(cls, BufferOpInstruction) else cls() for cls in classes]]]
    state = CheckState(Program.from_table(table, Placement(1), 1), training=False)
    assert state.kinds[0].tolist() == [int(cls.kind) for cls in classes]


def test_the_simulator_decides_every_kind_and_refuses_others() -> None:
    for kind in Kind:
        sim_op(kind)
    with pytest.raises(ValueError, match=r"the simulator has no cost for instruction kind 99"):
        sim_op(99)  # type: ignore[arg-type]


def test_a_class_without_a_kind_is_an_error_when_defined() -> None:
    with pytest.raises(TypeError, match=r"instruction class Checkpoint has no kind .* Kind.CUSTOM"):

        @dataclass(frozen=True, repr=False)
        class Checkpoint(PipeInstruction):
            code: ClassVar[str] = "CKPT"


def test_kind_and_base_must_agree() -> None:
    with pytest.raises(TypeError, match=r"Forwardish has kind FORWARD, which acts on a buffer"):

        class Forwardish(PipeInstruction):
            kind: ClassVar[Kind] = Kind.FORWARD

    with pytest.raises(TypeError, match=r"Stepish subclasses BufferOpInstruction but has kind"):

        class Stepish(BufferOpInstruction):
            kind: ClassVar[Kind] = Kind.OPTIMIZER_STEP


def test_a_subclass_of_a_builtin_keeps_its_kind() -> None:
    class TracedForward(instruction_class(Kind.FORWARD)):  # type: ignore[misc]
        pass

    assert TracedForward.kind == Kind.FORWARD
    assert repr(TracedForward(2, 2)) == "F2"


def test_no_kind_without_a_class_and_custom_has_none() -> None:
    with pytest.raises(ValueError, match="no built-in instruction class has kind"):
        instruction_class(Kind.CUSTOM)


def test_parse_reads_the_kinds_codes() -> None:
    for cls in concrete_instruction_classes():
        text = f"{cls.code}3c1b2" if cls.kind.is_buffer_op else cls.code
        ins = parse_instruction(text)
        assert type(ins) is cls and repr(ins) == text


# -- CUSTOM instructions: ignored by the rules, free in the simulator ----------------------
class TrainWithCheckpoints(TrainSchedule):
    """1F1B with a custom instruction in every step, and a custom buffer op too."""

    def steps(self) -> Iterator[Step]:
        for step in super().steps():
            # micro-batch 99 is out of range: a custom op's fields are not checked
            yield [SaveCheckpoint(), *step, Prefetch(7, 99, 5)]


def test_custom_instructions_pass_the_checker_and_cost_nothing() -> None:
    for stages, micro_batches in [(1, 1), (2, 3), (4, 8)]:
        table = check_schedule(TrainWithCheckpoints, micro_batches, stages)
        assert any(isinstance(ins, SaveCheckpoint) for ins in table[0][0])
        plain = simulate(TrainSchedule, micro_batches=micro_batches, stages=stages)
        custom = simulate(TrainWithCheckpoints, micro_batches=micro_batches, stages=stages)
        assert custom.makespan == plain.makespan
        assert custom.busy == plain.busy
        assert custom.peak_activations == plain.peak_activations
        assert all(e.kind.is_compute for e in custom.events)


def test_a_custom_instruction_keeps_its_text_in_the_grid() -> None:
    table = schedule_table(TrainSchedule, 1, 1)
    table[0][0].insert(0, SaveCheckpoint())
    table[0][1].append(table[0][1][0])  # B0 twice
    with pytest.raises(ValueError, match=r"B0 at step 1 and again B0 at step 1") as caught:
        check_table(table, TrainSchedule(1, 1, 0))
    assert "CKPT L0 F0" in str(caught.value)


def test_timeline_events_know_their_kind() -> None:
    assert TimelineEvent(0, "W3c1", 0, 1).kind == Kind.BACKWARD_WEIGHT
    assert TimelineEvent(0, "CKPT", 0, 1).kind == Kind.CUSTOM
    assert TimelineEvent(0, "F0", 0, 1, Kind.BACKWARD).code == "B"


# -- module shape ---------------------------------------------------------------------------
def test_no_module_over_400_lines() -> None:
    for path in SCHEDULE_DIR.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.relative_to(SCHEDULE_DIR)} has {lines} lines"


def _imports(path: Path, package: str) -> set[str]:
    """The stagewise.schedule modules a file imports anywhere (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith(package):
                found.add(name)
    return found


def test_no_import_cycles() -> None:
    package = "stagewise.schedule"
    modules: dict[str, Path] = {}
    for path in SCHEDULE_DIR.rglob("*.py"):
        parts = path.relative_to(SCHEDULE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    graph = {
        name: {dep for dep in _imports(path, package) if dep in modules and dep != name}
        for name, path in modules.items()
    }
    # the package's own __init__ files import their submodules; a submodule importing
    # its package's names back would close a cycle, which the graph shows
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [name, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])


def test_doctests() -> None:
    for module in (kinds_module, instructions_module):
        assert doctest.testmod(module).failed == 0
