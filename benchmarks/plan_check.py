"""Check the planner against the real engine: planned vs measured step time, three models.

Run from the repository root::

    .venv/bin/python benchmarks/plan_check.py            # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/plan_check.py --steps 12 --rounds 3

For each model (the demo's GPT, the MLP of ``benchmarks/peers.py``, a deeper and
narrower GPT: 12 blocks of width 128) it

1. profiles every layer on this machine (``stagewise.plan.profile``, one thread),
   after measuring once the engine's own work per pass and per step and the gloo
   link's latency and bandwidth (``stagewise.plan.calibrate``);
2. plans for 2 devices (``stagewise.plan.search``: stages 1 or 2, every
   micro-batch size dividing the batch, every schedule, checkpointing on and off);
3. runs the planner's pick and two other candidates (another stage count, another
   schedule and micro-batch size) with the real engine: 2 gloo ranks, one thread
   each, SGD; ``--warmup`` untimed steps, then ``--steps`` timed ones per round,
   ``--rounds`` rounds in rotated order; a step counts as the slower rank's, a
   round's figure is the median of its steps, and a candidate's the lowest of its
   rounds (the round least disturbed by anything else running on the 2 cores;
   every round is printed too);
4. prints planned vs measured milliseconds and the error, and whether the pick
   measures within 5% of the fastest candidate measured.

Then it times a 256-stage x 2048-micro-batch 1F1B program: generated, checked and
simulated (goal: under 2 s). The load average is printed before and after: the
machine has 2 cores, and anything else running shows in the figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS

from stagewise.models.gpt import DEMO_CONFIG, GPTConfig, gpt_layer_specs, gpt_loss

TIME_GOAL = 0.15
PICK_GOAL = 0.05
SIM_GOAL_S = 2.0


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # "gpt" or "mlp"
    gpt: GPTConfig | None
    global_batch: int
    profile_sizes: tuple[int, ...]

    def specs(self) -> list[Any]:
        if self.gpt is None:
            return WORKLOADS["mlp"].stagewise_specs()
        return list(gpt_layer_specs(self.gpt))

    def loss_fn(self) -> Any:
        return WORKLOADS["mlp"].loss_fn if self.gpt is None else gpt_loss

    def batch(self, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        if self.gpt is None:
            return torch.randn(rows, 1024, generator=gen), torch.randn(rows, 1024, generator=gen)
        c = self.gpt
        tokens = torch.randint(0, c.vocab_size, (rows, c.block_size + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]


MODELS = [
    Model("demo-gpt", "gpt", DEMO_CONFIG, 64, (2, 8, 32)),
    Model("peers-mlp", "mlp", None, 128, (2, 16, 64)),
    Model(
        "deep-gpt",
        "gpt",
        GPTConfig(vocab_size=512, block_size=64, n_layer=12, n_head=4, n_embd=128),
        32,
        (1, 4, 16),
    ),
]


# -- the real engine, on 2 ranks ---------------------------------------------------------
def _worker(
    rank: int, port: int, model: Model, jobs: list[dict[str, Any]], args: Any, out: Any
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    import stagewise

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    steps_of: list[Any] = []
    for job in jobs:
        module = stagewise.PipelineModule(
            layers=model.specs(), loss_fn=model.loss_fn(), seed_layers=True, **job["module"]
        )
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
        config = dict(job["config"], gradient_clipping=0.0, steps_per_print=10**9)
        engine, _, _, _ = stagewise.initialize(model=module, optimizer=optimizer, config=config)
        data = [
            model.batch(job["config"]["train_micro_batch_size_per_gpu"], seed=i) for i in range(4)
        ]

        def cycle(data: list[Any] = data) -> Any:
            while True:
                yield from data

        it = cycle()
        steps_of.append(lambda engine=engine, it=it: engine.train_batch(it))
    for step in steps_of:
        for _ in range(args.warmup):
            step()
    rounds: list[list[float]] = [[] for _ in jobs]  # per job, each round's median step
    for r in range(args.rounds):
        order = list(range(len(jobs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for index in order:
            for _ in range(args.warmup):
                steps_of[index]()
            dist.barrier()
            durations = []
            last = time.perf_counter()
            for _ in range(args.steps):
                steps_of[index]()
                now = time.perf_counter()
                durations.append(now - last)
                last = now
            gathered: list[Any] = [None, None]
            dist.all_gather_object(gathered, durations)  # a step is the slower rank's
            rounds[index].append(statistics.median(map(max, *gathered)))
    if rank == 0:
        out.send(rounds)
    dist.barrier()
    dist.destroy_process_group()


def measure(model: Model, jobs: list[dict[str, Any]], args: Any) -> list[list[float]]:
    """Each round's median step seconds of each job, with the real engine on 2 ranks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_worker, args=(r, port, model, jobs, args, writer)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 600
        while not reader.poll(0.5):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise SystemExit(f"{model.name}: a measuring rank failed or hung")
        return list(reader.recv())
    finally:
        for proc in procs:
            proc.join(timeout=30)


# -- the check ---------------------------------------------------------------------------
def _others(plans: list[Any]) -> list[Any]:
    """The pick, the best with another stage count, the best with another schedule and size."""
    pick = plans[0]
    chosen = [pick]
    for plan in plans[1:]:
        if plan.candidate.stages != pick.candidate.stages:
            chosen.append(plan)
            break
    for plan in plans[1:]:
        c = plan.candidate
        if all(
            c.schedule != o.candidate.schedule
            and c.micro_batch_size != o.candidate.micro_batch_size
            for o in chosen
        ):
            chosen.append(plan)
            break
    return chosen


def simulate_big() -> float:
    """Seconds to generate, check and simulate 1F1B on 256 stages x 2048 micro-batches."""
    from stagewise.schedule.build import schedule_program
    from stagewise.schedule.check import check_program
    from stagewise.schedule.registry import schedule_factory
    from stagewise.schedule.simulate import Costs, simulate

    start = time.perf_counter()
    program = schedule_program(schedule_factory("1f1b"), 2048, 256)
    check_program(program)
    simulate(
        program,
        Costs(forward=1.0, backward_input=1.0, backward_weight=1.0, send=0.1),
        record_events=False,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="planned vs measured step times")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default=",".join(m.name for m in MODELS))
    parser.add_argument("--costs-dir", default=None, help="also write each model's costs file here")
    args = parser.parse_args(argv)

    from stagewise.plan import module_arguments, plan_config, profile, search
    from stagewise.plan.calibrate import measure_concurrency, measure_engine, measure_link

    print(f"load average before: {os.getloadavg()}")
    engine = measure_engine()
    print(
        f"engine: {engine.per_pass * 1e6:.0f} us per pass, {engine.per_step * 1e6:.0f} us per step "
        f"(+{engine.per_step_data_parallel * 1e6:.0f} us replicated), "
        f"{engine.latency * 1e6:.0f} us per transfer; link: {engine.bandwidth / 1e9:.2f} GB/s, "
        f"all-reduce {engine.reduce_bandwidth / 1e9:.2f} GB/s; 2 busy processes compute "
        f"{engine.concurrency:.2f}x slower"
    )
    failures = 0
    for model in MODELS:
        if model.name not in args.models.split(","):
            continue
        # the link and the slowdown of two busy processes, as the machine is now
        link = measure_link()
        link["latency"] = engine.latency  # a transfer's cost through the engine
        engine = replace(engine, **link)
        x, y = model.batch(model.profile_sizes[-1])
        costs = profile(
            model.specs(), x, sample_labels=y, loss_fn=model.loss_fn(),
            micro_batch_sizes=model.profile_sizes, engine=engine,
        )  # fmt: skip
        # how much slower this model's passes run while the other process runs them too
        concurrency = measure_concurrency(
            model.specs(), x[: model.profile_sizes[1]], y[: model.profile_sizes[1]], model.loss_fn()
        )
        costs = replace(costs, engine=replace(costs.engine, concurrency=concurrency))
        if args.costs_dir:
            Path(args.costs_dir).mkdir(parents=True, exist_ok=True)
            costs.save(Path(args.costs_dir) / f"{model.name}.json")
        result = search(costs, devices=2, global_batch=model.global_batch, layers=model.specs())
        chosen = _others(result.fitting)
        jobs = [
            {"module": module_arguments(p), "config": plan_config(p, model.global_batch)}
            for p in chosen
        ]
        rounds = measure(model, jobs, args)
        measured = [min(r) for r in rounds]  # the least disturbed round
        fastest = min(measured)
        print(
            f"\n{model.name}: {len(result.plans)} candidates, global batch {model.global_batch}; "
            f"its passes run {concurrency:.2f}x slower on 2 busy processes, "
            f"load {os.getloadavg()[0]:.2f}"
        )
        print(f"  {'candidate':<34} {'planned ms':>10} {'measured ms':>11} {'error':>7}")
        for index, (plan, real) in enumerate(zip(chosen, measured, strict=True)):
            planned = plan.estimate.step_time
            error = (planned - real) / real
            ok = abs(error) <= TIME_GOAL
            failures += not ok
            tag = "pick " if index == 0 else "other"
            print(
                f"  {tag} {plan.candidate.label:<28} {planned * 1e3:>10.2f} {real * 1e3:>11.2f} "
                f"{100 * error:>+6.1f}% {'ok' if ok else 'OVER 15%'}"
            )
        print("  rounds (ms): " + "; ".join(" ".join(f"{v * 1e3:.1f}" for v in r) for r in rounds))
        slack = measured[0] / fastest - 1
        failures += slack > PICK_GOAL
        print(
            f"  the pick measures {100 * slack:.1f}% over the fastest measured ({'ok' if slack <= PICK_GOAL else 'OVER 5%'})"
        )
    seconds = simulate_big()
    failures += seconds > SIM_GOAL_S
    print(
        f"\n1F1B 256 stages x 2048 micro-batches: generated, checked, simulated in {seconds:.2f} s "
        f"({'ok' if seconds <= SIM_GOAL_S else 'OVER 2 s'})"
    )
    print(f"load average after: {os.getloadavg()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
