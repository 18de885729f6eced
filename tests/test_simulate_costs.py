"""The cost model for heterogeneous stages and the activation-memory accounting, by hand."""

from __future__ import annotations

import doctest
import importlib

import pytest

from stagewise.schedule import (
    ActivationMemory,
    Costs,
    GPipeSchedule,
    InferenceSchedule,
    TrainSchedule,
    ZBVSchedule,
    ZeroBubbleH1Schedule,
    check_program,
    schedule_program,
    simulate,
)

costs_module = importlib.import_module("stagewise.schedule.costs")


# -- times per virtual stage and per boundary ------------------------------------------------
def test_per_virtual_stage_times_gpipe_by_hand() -> None:
    """F0 on stage 0 [0, 1), on stage 1 [1, 4); B0 on stage 1 [4, 9), on stage 0 [9, 12)."""
    costs = Costs(forward=(1, 3), backward_input=(2, 4), backward_weight=(1, 1))
    result = simulate(GPipeSchedule, costs, micro_batches=1, stages=2)
    assert result.makespan == 12
    assert result.busy == [1 + 2 + 1, 3 + 4 + 1]
    assert costs.backward == (3, 5)
    spans = {(e.rank, e.name): (e.start, e.end) for e in result.events}
    assert spans == {(0, "F0"): (0, 1), (1, "F0"): (1, 4), (1, "B0"): (4, 9), (0, "B0"): (9, 12)}


def test_per_boundary_transfers_by_hand() -> None:
    """1F1B, 3 stages, 1 micro-batch; boundary 0 costs 0.5, boundary 1 costs 2.

    F: [0, 1) on 0, arrives 1.5, [1.5, 2.5) on 1, arrives 4.5, [4.5, 5.5) on 2;
    B: [5.5, 7.5) on 2, arrives 9.5, [9.5, 11.5) on 1, arrives 12, [12, 14) on 0.
    """
    result = simulate(TrainSchedule, Costs(send=(0.5, 2)), micro_batches=1, stages=3)
    assert result.makespan == 14
    assert result.busy == [3, 3, 3]
    assert result.bubble_fraction == (3 * 14 - 9) / (3 * 14)


def test_transfer_times_from_bytes() -> None:
    times = Costs.transfer_times([1000, 3000], bandwidth=500, latency=0.25)
    assert times == (2.25, 6.25)
    result = simulate(TrainSchedule, Costs(send=times), micro_batches=1, stages=3)
    # three forwards (1 each), three backwards (2 each), each boundary crossed twice
    assert result.makespan == 3 * 1 + 3 * 2 + 2 * (2.25 + 6.25)
    with pytest.raises(ValueError, match=r"bandwidth must be a finite number > 0, got 0"):
        Costs.transfer_times([1], bandwidth=0)
    with pytest.raises(ValueError, match=r"boundary_bytes\[1\] must be a finite number >= 0"):
        Costs.transfer_times([1, -1], bandwidth=1)


def test_v_placement_reads_each_virtual_stages_costs() -> None:
    """ZB-V: stage 0 holds virtual stages 0 and 3, stage 1 holds 1 and 2."""
    f, i, w = (1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)
    result = simulate(ZBVSchedule, Costs(f, i, w), micro_batches=4, stages=2)
    per_virtual = [f[v] + i[v] + w[v] for v in range(4)]
    assert result.busy == [
        4 * (per_virtual[0] + per_virtual[3]),
        4 * (per_virtual[1] + per_virtual[2]),
    ]
    durations = {(e.rank, e.name): e.duration for e in result.events}
    assert durations[0, "F0"] == 1 and durations[0, "F0c1"] == 4
    assert durations[1, "I0"] == 6 and durations[1, "W0c1"] == 11


def test_numbers_split_over_chunks_sequences_do_not() -> None:
    split = simulate(ZBVSchedule, Costs(2, 2, 2), micro_batches=2, stages=2)
    given = simulate(ZBVSchedule, Costs((1,) * 4, (1,) * 4, (1,) * 4), micro_batches=2, stages=2)
    assert split.makespan == given.makespan
    assert split.busy == given.busy


def test_a_checked_program_simulates_under_many_costs() -> None:
    program = schedule_program(ZeroBubbleH1Schedule, 8, 4)
    check_program(program)
    first = simulate(program, Costs(1, 1, 1))
    second = simulate(program, Costs((1, 2, 1, 2), 1, (0.5, 0.5, 0.5, 0.5), (0.1, 0.2, 0.3)))
    again = simulate(ZeroBubbleH1Schedule, Costs(1, 1, 1), micro_batches=8, stages=4)
    assert first == again
    assert second.busy == [8 * (1 + 1 + 0.5), 8 * (2 + 1 + 0.5)] * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"forward": (1, 2, 3)},
            r"Costs.forward has 3 entries but the schedule has 4 virtual stages",
        ),
        ({"send": (1, 2)}, r"Costs.send has 2 entries but the schedule has 3 boundaries"),
        ({"backward_weight": ()}, r"Costs.backward_weight must not be an empty sequence"),
        ({"backward_input": (1, -2)}, r"Costs.backward_input\[1\] must be a finite number >= 0"),
        ({"forward": "1"}, r"Costs.forward must be a finite number >= 0, got '1'"),
    ],
)
def test_costs_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(TrainSchedule, Costs(**kwargs), micro_batches=2, stages=4)  # type: ignore[arg-type]


def test_one_virtual_stage_has_no_boundary() -> None:
    with pytest.raises(ValueError, match=r"one virtual stage has no boundary"):
        simulate(TrainSchedule, Costs(send=(1,)), micro_batches=2, stages=1)


# -- activation bytes -----------------------------------------------------------------------------
def test_peak_bytes_without_checkpointing() -> None:
    """1F1B, 2 stages: stage 0 holds 2 micro-batches of 10 bytes, stage 1 one of 20."""
    result = simulate(
        TrainSchedule, micro_batches=3, stages=2, memory=ActivationMemory(activations=(10, 20))
    )
    assert result.peak_activation_bytes == [20, 20]
    assert result.peak_activations == [2, 1]


def test_peak_bytes_with_checkpointing_by_hand() -> None:
    """Stage 0 runs F0 F1 B0 F2 B1 B2, keeping 1 byte per micro-batch between passes.

    During a forward its 10 bytes are live, during a backward the 9 recomputed ones:
    F0 0+10, F1 1+10, B0 2+9, F2 1+10, B1 2+9, B2 1+9: peak 11. Stage 1 (20 bytes,
    keeps 2): 20 during every pass, holding nothing else.
    """
    memory = ActivationMemory(activations=(10, 20), inputs=(1, 2), checkpointing=True)
    result = simulate(TrainSchedule, micro_batches=3, stages=2, memory=memory)
    assert result.peak_activation_bytes == [11, 20]


def test_split_backward_keeps_the_recomputation_until_w() -> None:
    """ZB-H1 stage 0 of 2 runs F0 F1 I0 W0 F2 I1 W1 I2 W2.

    Without checkpointing: 10 per micro-batch from F to W: F1 holds two, peak 20.
    With it (keeps 1): F0 10, F1 1+10, I0 2+9 then holds 1+10, W0 frees 10, F2 1+10,
    I1 2+9, ..., peak 11.
    """
    plain = simulate(
        ZeroBubbleH1Schedule, micro_batches=3, stages=2, memory=ActivationMemory((10, 10))
    )
    assert plain.peak_activation_bytes == [20, 20]
    memory = ActivationMemory((10, 10), inputs=1, checkpointing=True)
    checkpointed = simulate(ZeroBubbleH1Schedule, micro_batches=3, stages=2, memory=memory)
    assert checkpointed.peak_activation_bytes is not None
    assert checkpointed.peak_activation_bytes[0] == 11


def test_inference_keeps_nothing_between_forwards() -> None:
    result = simulate(
        InferenceSchedule, micro_batches=3, stages=2, memory=ActivationMemory((10, 20))
    )
    assert result.peak_activation_bytes == [10, 20]


def test_a_number_is_a_stages_share_over_its_chunks() -> None:
    result = simulate(ZBVSchedule, micro_batches=8, stages=4, memory=ActivationMemory(8))
    assert result.peak_activation_bytes == [4 * p for p in result.peak_activations]


def test_memory_validation() -> None:
    with pytest.raises(ValueError, match=r"checkpointing=True\) needs inputs="):
        ActivationMemory(10, checkpointing=True)
    with pytest.raises(ValueError, match=r"virtual stage 1's input \(30 bytes\) is more than"):
        simulate(
            TrainSchedule,
            micro_batches=1,
            stages=2,
            memory=ActivationMemory((10, 20), inputs=(1, 30), checkpointing=True),
        )
    with pytest.raises(ValueError, match=r"ActivationMemory.activations has 3 entries"):
        simulate(TrainSchedule, micro_batches=1, stages=2, memory=ActivationMemory((1, 2, 3)))


def test_result_as_json_has_the_bytes() -> None:
    result = simulate(
        TrainSchedule, Costs(send=(0.5,)), micro_batches=2, stages=2, memory=ActivationMemory(4)
    )
    data = result.to_dict()
    assert data["peak_activation_bytes"] == [8.0, 4.0]
    assert data["costs"]["send"] == [0.5]


def test_doctests() -> None:
    assert doctest.testmod(costs_module).failed == 0


def test_cli_takes_per_virtual_stage_costs(capsys: pytest.CaptureFixture[str]) -> None:
    from stagewise.cli.simulate import simulate_main

    argv = ["--schedule", "gpipe", "--stages", "2", "--micro-batches", "1", "--json"]
    argv += ["--cost-forward", "1,3", "--cost-backward-input", "2,4", "--cost-backward-weight", "1"]
    assert simulate_main(argv) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["makespan"] == 12  # test_per_virtual_stage_times_gpipe_by_hand
    assert data["costs"]["forward"] == [1, 3]
    argv = ["--schedule", "1f1b", "--stages", "2", "--micro-batches", "1"]
    assert simulate_main([*argv, "--cost-send", "1,2"]) == 2
    assert "Costs.send has 2 entries but the schedule has 1 boundaries" in capsys.readouterr().err
