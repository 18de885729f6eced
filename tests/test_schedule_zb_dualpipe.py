"""ZB-H2 and DualPipeV: sound on every size they accept, and the papers' figures.

Figures assume every half-pass takes the same time (``Costs()``); see the
formulas in the schedules' docstrings.
"""

from __future__ import annotations

import doctest
import inspect
import random

import pytest

from stagewise.cli.simulate import simulate_main
from stagewise.schedule import (
    Costs,
    DualPipeVSchedule,
    Kind,
    Placement,
    PlacementKind,
    SimResult,
    ZeroBubbleH1Schedule,
    ZeroBubbleH2Schedule,
    check_schedule,
    make_schedule,
    schedule_layout,
    simulate,
)
from stagewise.schedule import dualpipe as dualpipe_module
from stagewise.schedule.render import format_timeline

STAGES = range(1, 9)


def inner_idle(result: SimResult) -> list[float]:
    """Per stage, the idle time between its first pass's start and its last pass's end."""
    idle = []
    for stage in range(result.stages):
        mine = [e for e in result.events if e.rank == stage]
        span = max(e.end for e in mine) - min(e.start for e in mine)
        idle.append(span - result.busy[stage])
    return idle


def order(cls: type, micro_batches: int, stages: int, stage: int) -> list[str]:
    return [repr(p) for p in cls(micro_batches, stages, stage).pass_order(stage)]


# -- soundness over every size they accept --------------------------------------------------
@pytest.mark.parametrize("stages", STAGES)
def test_zb_h2_passes_the_checker(stages: int) -> None:
    for micro_batches in range(1, 33):
        check_schedule(ZeroBubbleH2Schedule, micro_batches, stages)


@pytest.mark.parametrize("stages", STAGES)
def test_dualpipev_passes_the_checker(stages: int) -> None:
    for micro_batches in range(2 * stages, 33):
        check_schedule(DualPipeVSchedule, micro_batches, stages)


@pytest.mark.parametrize("stages", STAGES)
def test_dualpipev_refuses_fewer_than_twice_the_stages(stages: int) -> None:
    for micro_batches in range(1, 2 * stages):
        with pytest.raises(
            ValueError,
            match=rf"DualPipeV needs at least 2 x stages = {2 * stages} micro-batches on "
            rf"{stages} stage\(s\), got {micro_batches}: .* or use 'zbv'",
        ):
            DualPipeVSchedule(micro_batches, stages, 0)


def test_registered_with_their_layouts() -> None:
    assert schedule_layout("zb-h2", None, 4) == Placement(4)
    assert schedule_layout("dualpipev", None, 4) == Placement(4, 2, PlacementKind.V)
    assert isinstance(make_schedule("DualPipeV", 8, 4, 1), DualPipeVSchedule)
    assert isinstance(make_schedule("zb_h2", 3, 4, 1), ZeroBubbleH2Schedule)
    with pytest.raises(ValueError, match=r"schedule 'dualpipev' runs 2 chunk\(s\) per stage"):
        schedule_layout("dualpipev", 3, 4)


def test_transfers_sit_next_to_their_passes_in_dualpipev() -> None:
    for stage in range(4):
        steps = list(DualPipeVSchedule(9, 4, stage).steps())
        for step in steps:
            for i, ins in enumerate(step):
                if ins.kind.is_send:
                    assert step[i - 1].kind.is_compute
                    assert step[i - 1].micro_batch_id == ins.micro_batch_id  # type: ignore[attr-defined]
        assert [repr(ins) for ins in steps[-1][-3:]] == ["RTG", "RDG", "OPT"]


# -- ZB-H2 against the paper ---------------------------------------------------------------------
def test_zb_h2_warm_up_and_lags() -> None:
    """Stage s warms up with 2 (S - s) - 1 forwards; W lags 2 (S - 1) iterations."""
    for stages in STAGES:
        for stage in range(stages):
            passes = order(ZeroBubbleH2Schedule, 32, stages, stage)
            first_backward = next(i for i, p in enumerate(passes) if p.startswith("I"))
            assert first_backward == 2 * (stages - stage) - 1
            assert passes[: 2 * (stages - stage) - 1] == [f"F{m}" for m in range(first_backward)]


@pytest.mark.parametrize("stages", STAGES)
def test_zb_h2_has_no_bubble_inside_the_batch(stages: int) -> None:
    """A parallelogram: makespan (3M + S - 1) T, all idle at the ends, 2S - 1 held."""
    for micro_batches in range(2 * stages - 1, 33):
        result = simulate(ZeroBubbleH2Schedule, micro_batches=micro_batches, stages=stages)
        assert result.makespan == 3 * micro_batches + stages - 1
        assert result.bubble_fraction == (stages - 1) / (3 * micro_batches + stages - 1)
        assert inner_idle(result) == [0] * stages
        assert result.peak_activations == [2 * stages - 1] * stages


def test_zb_h2_with_fewer_micro_batches_holds_them_all_at_most() -> None:
    for stages in STAGES:
        for micro_batches in range(1, 2 * stages - 1):
            result = simulate(ZeroBubbleH2Schedule, micro_batches=micro_batches, stages=stages)
            assert max(result.peak_activations) <= micro_batches


def test_zb_h2_trades_memory_against_zb_h1() -> None:
    """Equal costs: the same makespan; ZB-H1's idle is inside the span, ZB-H2's is not."""
    for stages, micro_batches in [(4, 8), (4, 16), (8, 32)]:
        h1 = simulate(ZeroBubbleH1Schedule, micro_batches=micro_batches, stages=stages)
        h2 = simulate(ZeroBubbleH2Schedule, micro_batches=micro_batches, stages=stages)
        assert h1.makespan == h2.makespan
        assert max(inner_idle(h1)) == stages - 1 and max(inner_idle(h2)) == 0
        assert max(h1.peak_activations) == stages and max(h2.peak_activations) == 2 * stages - 1


def test_zb_h2_never_longer_than_zb_h1_from_2s_minus_1() -> None:
    rng = random.Random(7)
    for stages in range(1, 7):
        for micro_batches in (2 * stages - 1, 2 * stages, 3 * stages, 16):
            for _ in range(6):
                costs = Costs(
                    rng.choice([0.5, 1, 1.5, 2, 3]),
                    rng.choice([0.5, 1, 1.5, 2, 3]),
                    rng.choice([0.25, 0.5, 1, 1.5, 2]),
                    rng.choice([0, 0.25, 1]),
                )
                h1 = simulate(
                    ZeroBubbleH1Schedule, costs, micro_batches=micro_batches, stages=stages
                )
                h2 = simulate(
                    ZeroBubbleH2Schedule, costs, micro_batches=micro_batches, stages=stages
                )
                assert h2.makespan <= h1.makespan + 1e-9, (stages, micro_batches, costs)
    # the docstring's example: cheaper weight passes
    cheaper_w = Costs(1, 1, 0.5)
    assert simulate(ZeroBubbleH2Schedule, cheaper_w, micro_batches=32, stages=8).makespan == 87
    assert simulate(ZeroBubbleH1Schedule, cheaper_w, micro_batches=32, stages=8).makespan == 90.5


# -- DualPipeV against DeepSeek's figures ----------------------------------------------------
def test_dualpipev_phases_golden() -> None:
    """S = 2: stage 0 runs every phase once (phase 6 switches at once: r = 0)."""
    assert order(DualPipeVSchedule, 4, 2, 0) == [
        "F0", "F1",  # 1: F[0] x 2
        "F2", "F0c1",  # 2: F[0] F[1]
        "I0c1", "W0c1", "F1c1",  # 3: I[1] W F[1]
        "F3", "B1c1", "F2c1", "B0",  # 4: F[0] B[1]  F[1] B[0]
        "B2c1", "F3c1", "B1",  # 5: B[1]  F[1] B[0]
        "B3c1", "I2",  # 6: B[1] B[0], split from the middle (before B[0] on stage 0)
        "W2", "I3",  # 7: W I[0]
        "W3",  # 8: W
    ]  # fmt: skip
    assert order(DualPipeVSchedule, 4, 2, 1) == [
        "F0", "F0c1", "F1", "F1c1",  # 2: F[0] F[1] x 2
        "F2", "B0c1", "F2c1", "B0",  # 4 (x 1)
        "F3", "B1c1", "F3c1", "B1",
        "B2c1", "B2", "I3c1", "I3",  # 6: odd stage: split before chunk 1 at i = 1
        "W3c1", "W3",  # 8: W x 2
    ]  # fmt: skip


def test_dualpipev_counts_every_pass_once_per_chunk() -> None:
    for stages in STAGES:
        for micro_batches in (2 * stages, 2 * stages + 3):
            for stage in range(stages):
                passes = DualPipeVSchedule(micro_batches, stages, stage).pass_arrays(stage)
                for chunk in (0, 1):
                    mine = passes.chunk == chunk
                    forwards = passes.micro_batch[mine & (passes.kind == Kind.FORWARD)]
                    assert forwards.tolist() == list(range(micro_batches))
                    backward = mine & (
                        (passes.kind == Kind.BACKWARD) | (passes.kind == Kind.BACKWARD_INPUT)
                    )
                    assert passes.micro_batch[backward].tolist() == list(range(micro_batches))


@pytest.mark.parametrize("stages", STAGES)
def test_dualpipev_bubble_and_memory(stages: int) -> None:
    """Half-passes of T = 1/2: (S - 1) T idle per stage, 2S + 1 chunk activations held.

    DeepSeek's bubble (PP/2 - 1)(F&B + B - 3W) with F&B = F + B gives 2 (S - 1) T:
    one pass at a time, a forward need not wait for the backward it was paired with.
    """
    t = 0.5
    deepseek = (stages - 1) * ((t + 2 * t) + 2 * t - 3 * t)
    for micro_batches in range(2 * stages, 33):
        result = simulate(DualPipeVSchedule, micro_batches=micro_batches, stages=stages)
        idle = [result.makespan - busy for busy in result.busy]
        assert idle == [(stages - 1) * t] * stages
        assert max(idle) <= deepseek
        assert result.makespan == (6 * micro_batches + stages - 1) * t
        assert result.bubble_fraction == (stages - 1) / (6 * micro_batches + stages - 1)
        assert result.peak_activations == [2 * stages + 1] * stages  # PP + 1, PP = 2S


def test_dualpipev_beats_1f1b() -> None:
    for stages in range(2, 9):
        for micro_batches in (2 * stages, 4 * stages):
            dual = simulate(DualPipeVSchedule, micro_batches=micro_batches, stages=stages)
            assert dual.bubble_fraction < (stages - 1) / (micro_batches + stages - 1)


def test_docstring_timeline_matches_the_simulation() -> None:
    drawn = format_timeline(simulate(DualPipeVSchedule, micro_batches=4, stages=2).events)
    doc = [line.strip() for line in (dualpipe_module.__doc__ or "").splitlines()]
    for line in drawn.splitlines():
        assert line.strip() in doc, f"dualpipe's docstring lacks:\n{line}"
    assert inspect.getdoc(DualPipeVSchedule)


@pytest.mark.parametrize("name", ["zb-h2", "dualpipev"])
def test_cli_lists_and_runs_them(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", name, "--stages", "4", "--micro-batches", "8", "--json", "--check"]
    assert simulate_main(argv) == 0
    assert '"bubble_fraction"' in capsys.readouterr().out
    simulate_main(["--schedule", "nope", "--stages", "2", "--micro-batches", "2"])
    assert f"{name}" in capsys.readouterr().err


def test_cli_says_which_counts_dualpipev_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--schedule", "dualpipev", "--stages", "4", "--micro-batches", "6"]
    assert simulate_main(argv) == 2
    assert "DualPipeV needs at least 2 x stages = 8 micro-batches" in capsys.readouterr().err


def test_doctests() -> None:
    assert doctest.testmod(dualpipe_module).failed == 0
