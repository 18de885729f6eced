"""The cost-model simulator, the timeline renderers and ``stagewise simulate``."""

from __future__ import annotations

import doctest
import importlib
import itertools
import json
import time
from pathlib import Path

import pytest

from stagewise.cli.simulate import simulate_main
from stagewise.schedule import (
    DataParallelSchedule,
    InferenceSchedule,
    Kind,
    ScheduleError,
    ScheduleFactory,
    TrainSchedule,
    check_program,
    parse_instruction,
    schedule_program,
    schedule_table,
)
from stagewise.schedule.gpipe import GPipeSchedule
from stagewise.schedule.interleaved import InterleavedSchedule
from stagewise.schedule.registry import schedule_factory
from stagewise.schedule.render import (
    TimelineEvent,
    chrome_trace,
    format_timeline,
    render_timeline,
    write_chrome_trace,
)
from stagewise.schedule.simulate import Costs, SimResult, simulate
from stagewise.schedule.zero_bubble import ZBVSchedule, ZeroBubbleH1Schedule

GRID = [(stages, micro_batches) for stages in range(1, 9) for micro_batches in range(1, 33)]


def one_f_one_b_bubble(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


# -- exact bubbles ------------------------------------------------------------------------
def test_1f1b_bubble_is_exact_over_the_grid() -> None:
    """(p - 1) / (m + p - 1) to the last bit: integer costs keep every time an integer."""
    for stages, micro_batches in GRID:
        result = simulate(TrainSchedule, micro_batches=micro_batches, stages=stages)
        assert result.bubble_fraction == one_f_one_b_bubble(stages, micro_batches)
        assert result.makespan == 3 * (micro_batches + stages - 1)


def test_gpipe_bubble_equals_1f1b() -> None:
    for stages, micro_batches in GRID[::7]:
        result = simulate(GPipeSchedule, micro_batches=micro_batches, stages=stages)
        assert result.bubble_fraction == one_f_one_b_bubble(stages, micro_batches)


def test_zb_h1_bubble_is_a_third_of_1f1b() -> None:
    """(p - 1) idle units per stage: (p - 1) / (3m + p - 1) once m >= p."""
    for stages, micro_batches in GRID:
        if micro_batches >= stages:
            result = simulate(ZeroBubbleH1Schedule, micro_batches=micro_batches, stages=stages)
            assert result.bubble_fraction == (stages - 1) / (3 * micro_batches + stages - 1)


def test_interleaved_bubble_shrinks_by_the_chunks() -> None:
    """(p - 1) / (v·m + p - 1) when m is a multiple of p."""
    for stages, micro_batches in GRID:
        if micro_batches % stages == 0:
            result = simulate(
                InterleavedSchedule, micro_batches=micro_batches, stages=stages, virtual_stages=2
            )
            assert result.bubble_fraction == pytest.approx(
                (stages - 1) / (2 * micro_batches + stages - 1), rel=1e-12
            )


@pytest.mark.parametrize(
    ("name", "virtual_stages"),
    [("interleaved", 2), ("interleaved", 4), ("zb-h1", None), ("zbv", None)],
)
def test_new_schedules_beat_1f1b(name: str, virtual_stages: int | None) -> None:
    """Lower bubble than 1F1B on every pipeline with 2+ stages and 2+ micro-batches."""
    factory = schedule_factory(name, virtual_stages)
    for stages, micro_batches in GRID:
        if stages >= 2 and micro_batches >= 2:
            result = simulate(factory, micro_batches=micro_batches, stages=stages)
            assert result.bubble_fraction < one_f_one_b_bubble(stages, micro_batches), (
                name,
                stages,
                micro_batches,
            )


def test_zbv_beats_zb_h1_at_the_same_memory() -> None:
    for stages, micro_batches in [(4, 8), (4, 16), (8, 32)]:
        zbv = simulate(ZBVSchedule, micro_batches=micro_batches, stages=stages)
        h1 = simulate(ZeroBubbleH1Schedule, micro_batches=micro_batches, stages=stages)
        assert zbv.bubble_fraction < h1.bubble_fraction
        assert max(zbv.peak_memory) == max(h1.peak_memory) == stages


# -- peak activations ---------------------------------------------------------------------
def test_peak_activations() -> None:
    for stages, micro_batches in GRID[::5]:

        def run(cls: ScheduleFactory, m: int = micro_batches, s: int = stages) -> SimResult:
            return simulate(cls, micro_batches=m, stages=s)

        assert run(TrainSchedule).peak_activations == [
            min(stages - s, micro_batches) for s in range(stages)
        ]
        assert run(GPipeSchedule).peak_activations == [micro_batches] * stages
        # ZB-H1 holds a micro-batch until its W: S on every stage, 1F1B's first stage
        assert run(ZeroBubbleH1Schedule).peak_activations == [min(stages, micro_batches)] * stages
        # ZB-V: at most 2S chunk activations, each half a stage: 1F1B's peak memory
        zbv = run(ZBVSchedule)
        assert max(zbv.peak_activations) <= 2 * stages
        assert zbv.peak_memory == [p / 2 for p in zbv.peak_activations]


def test_inference_and_data_parallel() -> None:
    """Forward only: M + S - 1 forwards long, one micro-batch held at a time."""
    result = simulate(InferenceSchedule, micro_batches=5, stages=3)
    assert result.makespan == 7
    assert result.peak_activations == [1, 1, 1]
    replicas = simulate(DataParallelSchedule, micro_batches=4, stages=2)
    assert replicas.makespan == 12
    assert replicas.bubble_fraction == 0
    assert replicas.peak_activations == [1, 1]


# -- the cost model -----------------------------------------------------------------------
def test_whole_backward_costs_both_halves() -> None:
    costs = Costs(forward=1, backward_input=2, backward_weight=3)
    result = simulate(GPipeSchedule, costs, micro_batches=1, stages=2)
    assert result.makespan == 1 + 1 + 5 + 5
    assert costs.backward == 5


def test_sends_take_time_on_the_wire() -> None:
    """F on 0, transfer, F then B on 1, transfer, B on 0."""
    result = simulate(GPipeSchedule, Costs(send=0.5), micro_batches=1, stages=2)
    assert result.makespan == 1 + 0.5 + 1 + 2 + 0.5 + 2
    assert result.busy == [3, 3]


def test_chunks_split_a_stages_cost() -> None:
    """With k chunks per stage each chunk's pass costs 1/k, so makespans compare."""
    result = simulate(ZBVSchedule, micro_batches=4, stages=2)
    assert result.chunks == 2
    assert result.busy == [12, 12]  # 4 micro-batches × (F + I + W) per stage
    assert {e.duration for e in result.events} == {0.5}


def test_events_cover_every_pass_without_overlap() -> None:
    result = simulate(ZBVSchedule, Costs(1, 2, 1, 0.25), micro_batches=6, stages=3)
    assert len(result.events) == 3 * 2 * 6 * 3  # stages × chunks × micro-batches × (F, I, W)
    for stage in range(3):
        mine = [e for e in result.events if e.rank == stage]
        assert all(a.end <= b.start for a, b in itertools.pairwise(mine))
        assert sum(e.duration for e in mine) == result.busy[stage]
    assert max(e.end for e in result.events) == result.makespan
    costs = {"F": 0.5, "I": 1.0, "W": 0.5}
    assert all(e.duration == costs[e.code] for e in result.events)


def test_record_events_off() -> None:
    result = simulate(TrainSchedule, micro_batches=4, stages=2, record_events=False)
    assert result.events == []
    assert result.makespan == 15


def test_table_and_factory_agree() -> None:
    table = schedule_table(InterleavedSchedule, 6, 3, virtual_stages=2)
    placement = InterleavedSchedule(6, 3, 0, virtual_stages=2)
    from_table = simulate(table, placement=placement)
    from_factory = simulate(InterleavedSchedule, micro_batches=6, stages=3, virtual_stages=2)
    assert from_table == from_factory
    # without a placement, a table is placed in a loop with as many chunks as it names
    assert simulate(table) == from_factory


def test_deadlock_is_a_schedule_error_with_the_grid() -> None:
    """Both stages receive before they send."""
    table = [
        [[parse_instruction("RG0")], [parse_instruction("F0"), parse_instruction("SA0")]],
        [[parse_instruction("RA0")], [parse_instruction("F0"), parse_instruction("SG0")]],
    ]
    with pytest.raises(ScheduleError, match=r"deadlock") as info:
        simulate(table)
    assert ">>RG0<<" in str(info.value) and ">>RA0<<" in str(info.value)
    assert "stage 0: RG0 at step 0 waits for stage 1" in str(info.value)


def test_factory_needs_sizes() -> None:
    with pytest.raises(
        ValueError, match=r"needs micro_batches= and stages=, got micro_batches=None, stages=None"
    ):
        simulate(TrainSchedule)
    with pytest.raises(ValueError, match=r"got micro_batches=2, stages=None"):
        simulate(TrainSchedule, micro_batches=2)


def test_table_takes_no_schedule_arguments() -> None:
    table = schedule_table(TrainSchedule, 2, 2)
    with pytest.raises(ValueError, match=r"takes no schedule arguments"):
        simulate(table, micro_batches=2)
    with pytest.raises(ValueError, match=r"stages=3 but the table has 2 stages"):
        simulate(table, stages=3)
    with pytest.raises(ValueError, match=r"placement has 4 stages but the table has 2"):
        simulate(table, placement=TrainSchedule(2, 4, 0))


@pytest.mark.parametrize("field", ["forward", "backward_input", "backward_weight", "send"])
@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_costs_must_be_finite_and_non_negative(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"Costs.{field} must be a finite number >= 0"):
        Costs(**{field: bad})


def test_result_as_json() -> None:
    result = simulate(TrainSchedule, micro_batches=3, stages=2)
    data = json.loads(json.dumps(result.to_dict(events=True)))
    assert data["makespan"] == 12
    assert data["peak_activations"] == [2, 1]
    assert data["events"][0] == [0, "F0", 0, 1]


@pytest.mark.slow
def test_256_stages_2048_micro_batches() -> None:
    """Three million instructions of 1F1B: generated, checked and simulated as arrays.

    The bound is generous: a shared CI core runs several times slower than a laptop
    (benchmarks/pure_core.py times it; under 2 s on a quiet machine).
    """
    start = time.perf_counter()
    program = schedule_program(TrainSchedule, 2048, 256)
    check_program(program)
    result = simulate(program, record_events=False)
    elapsed = time.perf_counter() - start
    assert result.bubble_fraction == one_f_one_b_bubble(256, 2048)
    assert result.peak_activations == [min(256 - s, 2048) for s in range(256)]
    assert elapsed < 30, f"generate + check + simulate took {elapsed:.1f} s"


# -- rendering ----------------------------------------------------------------------------
def test_timeline_event() -> None:
    event = TimelineEvent(2, "I3c1", 1.5, 2.0)
    assert (event.kind, event.micro_batch, event.chunk, event.duration) == (
        Kind.BACKWARD_INPUT,
        3,
        1,
        0.5,
    )
    assert event.code == "I"
    assert TimelineEvent(0, "RTG", 0, 0).micro_batch is None
    # a code of your own is a CUSTOM instruction; a given kind wins over the name
    custom = TimelineEvent(0, "CKPT", 0, 1)
    assert (custom.kind, custom.code) == (Kind.CUSTOM, "CKPT")
    assert TimelineEvent(0, "X1", 0, 1, Kind.FORWARD).kind == Kind.FORWARD
    with pytest.raises(ValueError, match=r"'F0' on rank 1 ends before it starts"):
        TimelineEvent(1, "F0", 2.0, 1.0)


def test_format_timeline_golden() -> None:
    events = simulate(TrainSchedule, micro_batches=2, stages=2).events
    assert format_timeline(events) == (
        "time     0  1  2  3  4  5  6  7  8\n"
        "stage 0  F0 F1 .  .  B0 -  .  B1 -\n"
        "stage 1  .  F0 B0 -  F1 B1 -  .  ."
    )


def test_chrome_trace(tmp_path: Path) -> None:
    events = simulate(ZBVSchedule, micro_batches=2, stages=2).events
    trace = chrome_trace(events, unit_us=1000)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(events)
    assert spans[0] == {
        "name": "F0",
        "cat": "F",
        "ph": "X",
        "ts": 0,
        "dur": 500,
        "pid": 0,
        "tid": 0,
    }
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"stage 0", "stage 1"}
    path = tmp_path / "trace.json"
    write_chrome_trace(events, path)
    assert json.loads(path.read_text())["traceEvents"][0]["dur"] == 0.5e6
    with pytest.raises(ValueError, match=r"unit_us must be > 0, got 0"):
        chrome_trace(events, unit_us=0)


def test_render_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "zbv.png"
    render_timeline(simulate(ZBVSchedule, micro_batches=8, stages=4).events, path, title="zbv")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["stagewise.schedule.simulate", "stagewise.schedule.render"])
def test_doctests(name: str) -> None:
    # import_module: the package exports a function named like the simulate module.
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# -- the command ----------------------------------------------------------------------------
def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        simulate_main(["--schedule", "1f1b", "--stages", "4", "--micro-batches", "8", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["makespan"] == 33
    assert data["bubble_fraction"] == 3 / 11
    assert data["peak_activations"] == [4, 3, 2, 1]
    assert data["schedule"] == "1f1b"


@pytest.mark.parametrize("name", ["gpipe", "interleaved", "zb-h1", "zbv"])
def test_cli_json_every_schedule(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", name, "--stages", "4", "--micro-batches", "8", "--json", "--check"]
    assert simulate_main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bubble_fraction"] < 3 / 11 or name == "gpipe"
    assert len(data["peak_activations"]) == 4


def test_cli_costs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", "gpipe", "--stages", "2", "--micro-batches", "1", "--json"]
    argv += ["--cost-forward", "1", "--cost-backward-input", "2", "--cost-backward-weight", "3"]
    argv += ["--cost-send", "0.5"]
    assert simulate_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] == 1 + 0.5 + 1 + 5 + 0.5 + 5


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["--schedule", "zbv", "--stages", "2", "--micro-batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "zbv: 2 stage(s), 4 micro-batch(es), 2 chunks per stage" in out
    assert "makespan          12.5" in out
    assert "bubble fraction   0.0400 (4.0%)" in out
    assert "4 chunk(s) = 2 stage(s)" in out


def test_cli_png_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    argv = ["--schedule", "interleaved", "--virtual-stages", "2", "--stages", "4"]
    argv += ["--micro-batches", "8", "--png", str(png), "--trace", str(trace)]
    assert simulate_main(argv) == 0
    assert png.stat().st_size > 1000
    assert json.loads(trace.read_text())["traceEvents"]
    assert f"timeline drawn to {png}" in capsys.readouterr().out


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_main(["--schedule", "nope", "--stages", "2", "--micro-batches", "2"]) == 2
    assert "unknown pipeline schedule 'nope': valid names are" in capsys.readouterr().err
    argv = ["--schedule", "zbv", "--virtual-stages", "3", "--stages", "2", "--micro-batches", "2"]
    assert simulate_main(argv) == 2
    assert "'zbv' runs 2 chunk(s) per stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        simulate_main(["--stages", "0", "--micro-batches", "2"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err
