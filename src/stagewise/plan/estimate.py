"""One candidate's step time and memory, from measured costs: :func:`estimate`.

The model of a step, every term from :class:`~stagewise.plan.costs.ModelCosts`:

* the layers are cut into the candidate's virtual stages by the optimal min-max
  partition (:func:`~stagewise.partition.partition_balanced`) of each layer's
  forward + backward time at the candidate's micro-batch size (with the
  recompute's forward under checkpointing, and the loss on the last layer);
* when more than one device computes, pass times are multiplied by the measured
  ``engine.concurrency`` (how much slower a pass runs while the other devices
  compute too: 1 for devices that share nothing);
* each virtual stage's forward, input-gradient and weight-gradient times are the
  sums over its layers, plus the engine's measured work per pass
  (``engine.per_pass``: a forward pays it, a whole backward pays it once, split
  into halves between ``I`` and ``W``); under checkpointing the input-gradient
  pass also recomputes the forward; the last virtual stage adds the loss;
* a boundary between two devices costs ``latency + bytes / bandwidth`` for the
  layer output crossing it (0 between two chunks on one device);
* the schedule's program is simulated (:func:`~stagewise.schedule.simulate.simulate`);
  each stage then reduces its tied gradients (an all-reduce of the tied bytes
  between the stages holding them), its data-parallel gradients (an all-reduce
  of its gradient bytes, at the measured all-reduce bandwidth) and runs the optimizer
  step (seconds per parameter byte): the step ends when the last stage is done,
  plus ``engine.per_step`` (and ``engine.per_step_data_parallel`` when replicated);
* a stage's peak memory: parameters, their gradients and the optimizer's state
  (each tied module once per stage), plus the simulated peak activation bytes
  (each chunk holds its input and the bytes its layers save; checkpointing keeps
  the input only and recomputes the rest in the backward).
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.partition import partition_balanced
from stagewise.plan.candidates import Candidate, checked_program
from stagewise.plan.costs import ModelCosts
from stagewise.schedule.costs import ActivationMemory, Costs
from stagewise.schedule.placement import Placement
from stagewise.schedule.simulate import SimResult, simulate

__all__ = ["Estimate", "estimate", "partition_for"]


@dataclass(frozen=True)
class Estimate:
    """What :func:`estimate` found for one candidate (seconds and bytes).

    Attributes:
        step_time: one training step.
        makespan: the simulated pipeline passes alone.
        bubble: idle compute time over ``stages × makespan`` (the simulator's).
        peak_memory: per stage, the most bytes held at once.
        boundaries: the layer boundaries of the virtual stages (``V + 1`` entries).
        samples_per_second: global batch rows over the step time.
        sim: the simulation (its ``events`` draw the timeline).
    """

    step_time: float
    makespan: float
    bubble: float
    peak_memory: list[float]
    boundaries: list[int]
    samples_per_second: float
    sim: SimResult


def partition_for(costs: ModelCosts, candidate: Candidate) -> list[int]:
    """The layer boundaries of the candidate's virtual stages (optimal min-max of time)."""
    rows, ckpt = candidate.micro_batch_size, candidate.checkpointing
    weights = [layer.compute(rows, ckpt) for layer in costs.layers]
    weights[-1] += costs.loss_forward.at(rows) + costs.loss_backward.at(rows)
    # partition_balanced sums exactly; nanosecond integers keep it fast and exact
    return partition_balanced([max(1, round(w * 1e9)) for w in weights], candidate.virtual_stages)


def _device_of(placement: Placement) -> list[int]:
    """The stage holding each virtual stage."""
    return [placement.locate(v)[0] for v in range(placement.num_virtual_stages)]


def estimate(
    costs: ModelCosts, candidate: Candidate, *, global_batch: int | None = None
) -> Estimate:
    """Simulate ``candidate`` with ``costs`` (the model is in the module doc).

    Raises:
        ValueError: the candidate's schedule does not build for its sizes.
    """
    rows = candidate.micro_batch_size
    bounds = partition_for(costs, candidate)
    program = checked_program(candidate.schedule, candidate.micro_batches, candidate.stages)
    placement = program.placement
    device = _device_of(placement)
    engine = costs.engine
    forward, grad_in, grad_w, made, kept, send = [], [], [], [], [], []
    for v in range(candidate.virtual_stages):
        layers = costs.layers[bounds[v] : bounds[v + 1]]
        f = sum(layer.forward.at(rows) for layer in layers)
        i = sum(layer.backward_input.at(rows) for layer in layers)
        w = sum(layer.backward_weight.at(rows) for layer in layers)
        if candidate.checkpointing:
            i += f
        if v == candidate.virtual_stages - 1:
            f += costs.loss_forward.at(rows)
            i += costs.loss_backward.at(rows)
        slow = engine.concurrency if candidate.stages * candidate.data_parallel > 1 else 1.0
        forward.append(f * slow + engine.per_pass)
        grad_in.append(i * slow + engine.per_pass / 2)
        grad_w.append(w * slow + engine.per_pass / 2)
        first = bounds[v]
        entry = (
            costs.input_bytes.at(rows)
            if first == 0
            else costs.layers[first - 1].output_bytes.at(rows)
        )
        kept.append(entry)
        made.append(entry + sum(layer.activation_bytes.at(rows) for layer in layers))
        if v + 1 < candidate.virtual_stages:
            crossing = layers[-1].output_bytes.at(rows) if layers else 0.0
            remote = device[v] != device[v + 1]
            send.append(engine.latency + crossing / engine.bandwidth if remote else 0.0)
    sim = simulate(
        program,
        Costs(
            forward=tuple(forward),
            backward_input=tuple(grad_in),
            backward_weight=tuple(grad_w),
            send=tuple(send) if send else 0,
        ),
        memory=ActivationMemory(
            activations=tuple(made), inputs=tuple(kept), checkpointing=candidate.checkpointing
        ),
    )
    params, tied = _stage_params(costs, candidate, bounds, device)
    finish = _finish_times(sim, candidate.stages)
    dp = candidate.data_parallel
    ends = []
    for stage in range(candidate.stages):
        after = params[stage] * costs.optimizer_seconds_per_byte
        if dp > 1:
            after += params[stage] / engine.reduce_bandwidth + 2 * (dp - 1) * engine.latency
        after += tied[stage]
        ends.append(finish[stage] + after)
    step = max(ends) + engine.per_step + (engine.per_step_data_parallel if dp > 1 else 0.0)
    state = 2.0 + costs.optimizer_state_factor  # parameters, gradients, optimizer state
    peaks = sim.peak_activation_bytes or [0.0] * candidate.stages
    memory = [state * params[s] + peaks[s] for s in range(candidate.stages)]
    batch = global_batch or rows * candidate.micro_batches * dp
    return Estimate(
        step_time=step,
        makespan=sim.makespan,
        bubble=sim.bubble_fraction,
        peak_memory=memory,
        boundaries=list(bounds),
        samples_per_second=batch / step if step > 0 else float("inf"),
        sim=sim,
    )


def _stage_params(
    costs: ModelCosts, candidate: Candidate, bounds: list[int], device: list[int]
) -> tuple[list[float], list[float]]:
    """Per stage: parameter bytes (a tied module once), and the tied all-reduce's time."""
    stages = candidate.stages
    params = [0.0] * stages
    holders: dict[str, set[int]] = {}
    tied_bytes: dict[str, int] = {}
    for v in range(candidate.virtual_stages):
        for layer in costs.layers[bounds[v] : bounds[v + 1]]:
            if layer.tied_key is None:
                params[device[v]] += layer.param_bytes
                continue
            seen = holders.setdefault(layer.tied_key, set())
            if device[v] not in seen:
                params[device[v]] += layer.param_bytes
            seen.add(device[v])
            tied_bytes[layer.tied_key] = layer.tied_bytes
    engine = costs.engine
    tied = [0.0] * stages
    for key, stages_holding in holders.items():
        n = len(stages_holding)
        if n > 1:
            seconds = tied_bytes[key] / engine.reduce_bandwidth + engine.latency
            for stage in stages_holding:
                tied[stage] += seconds
    return params, tied


def _finish_times(sim: SimResult, stages: int) -> list[float]:
    """When each stage finished its last compute pass."""
    finish = [0.0] * stages
    for event in sim.events:
        finish[event.rank] = max(finish[event.rank], event.end)
    return finish
