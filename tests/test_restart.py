"""Training that outlives killed ranks: torchrun restarts resume from the last checkpoint.

A 2-stage job of 60 steps runs under ``torchrun --standalone --max-restarts 3`` with
``checkpoint.every_steps`` 5 and ``resume: "auto"``; a rank SIGKILLs itself at three
random steps (before a step, in the middle of one, or while writing a checkpoint). Its
final weights must be bit-identical to those of the same job run without faults, with
stagewise's loader (and asynchronous saves) and with a plain iterator that skips
``engine.global_steps`` batches (and synchronous saves). The faults' seed is printed;
``STAGEWISE_FAULT_SEED=N`` replays one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from resilient_train import train_job
from stagewise.rendezvous import incarnation_store

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("resilient_train.py")
STEPS, EVERY = 60, 5


def fault_plan(seed: int) -> list[dict[str, Any]]:
    """Three faults at random distinct steps and ranks: one before a step, one in the middle
    of one, one while writing a checkpoint (the background thread, with async saves)."""
    rng = random.Random(seed)
    plan: list[dict[str, Any]] = []
    for point in ("before", "mid", "save"):
        while True:
            step = rng.randrange(2, STEPS - 1)
            if point == "save":
                step = max(EVERY, step - step % EVERY)  # a step that saves
            if all(abs(step - f["step"]) > 1 for f in plan):
                break
        plan.append({"step": step, "rank": rng.randrange(2), "point": point})
    return sorted(plan, key=lambda f: f["step"])


def _launch(tmp: Path, data: str, async_save: bool, plan: list[dict[str, Any]]) -> Any:
    (tmp / "marks").mkdir(parents=True)
    (tmp / "plan.json").write_text(json.dumps(plan))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", "3", "--monitor-interval", "0.2", str(SCRIPT),
        "--out", str(tmp / "out"), "--steps", str(STEPS), "--every", str(EVERY),
        "--save-dir", str(tmp / "ckpt"), "--resume", "auto", "--data", data,
        "--plan", str(tmp / "plan.json"), "--marks", str(tmp / "marks"), "--timeout-s", "20",
        *(["--async-save"] if async_save else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp / "log.txt", "w")  # closed by the caller
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp), log


def test_killed_ranks_resume_bit_identical(tmp_path: Path) -> None:
    seed = int(os.environ.get("STAGEWISE_FAULT_SEED", random.randrange(2**31)))
    plan = fault_plan(seed)
    print(f"fault seed {seed}: {plan}")
    variants = {"loader": True, "iterator": False}  # data source -> asynchronous saves
    jobs = {
        data: _launch(tmp_path / data, data, async_save, plan)
        for data, async_save in variants.items()
    }
    references = {
        data: run_distributed(train_job, 2, {"steps": STEPS, "data": data}, timeout=180)
        for data in variants
    }
    for data, (proc, log) in jobs.items():
        try:
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp_path / data / "log.txt").read_text()
        where = f"[{data}, fault seed {seed}, plan {plan}]\n{text[-6000:]}"
        assert proc.returncode == 0, where
        fired = sorted(os.listdir(tmp_path / data / "marks"))
        assert fired == [f"done-{i}" for i in range(3)], where
        assert text.count("resumed from ") >= 2, where  # two of three faults after step 5
        for rank in range(2):
            got = torch.load(tmp_path / data / "out" / f"rank{rank}.pt", weights_only=False)
            want = references[data][rank]
            assert got["steps"] == STEPS, where
            assert got["state"].keys() == want["state"].keys()
            for name, value in want["state"].items():
                assert torch.equal(got["state"][name], value), f"{name} differs {where}"
        ckpt = tmp_path / data / "ckpt"
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "global_step55",
            "global_step60",
            "latest",
        ]


# -- the incarnation prefix, without torchrun ------------------------------------------------


def _meet(port: int, rank: int, world: int, out: dict[int, str]) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    prefixed = incarnation_store(store, rank, world, timeout_s=30)
    prefixed.set(f"who/{rank}", str(rank))
    out[rank] = "".join(prefixed.get(f"who/{r}").decode() for r in range(world))


def test_each_incarnation_gets_a_fresh_prefix() -> None:
    """Three ranks meet three times in one store that keeps every key (as torchrun's agent
    store does); an incarnation never sees a key of an earlier one, and a rank arriving
    late (after stale offers and acks are in the store) still joins its own."""
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    world = 3
    for incarnation in range(3):
        out: dict[int, str] = {}
        threads = [
            threading.Thread(target=_meet, args=(server.port, r, world, out)) for r in range(world)
        ]
        for rank, thread in enumerate(threads):
            if incarnation == 2 and rank == 2:
                time.sleep(0.5)  # a late rank: the others wait for it, not for stale keys
            thread.start()
        for thread in threads:
            thread.join(60)
        assert out == {r: "012" for r in range(world)}, (incarnation, out)
    # the stale keys of three incarnations are there, and three distinct prefixes were used
    assert server.num_keys() >= 3 * world


def test_no_destroy_still_exits_cleanly(tmp_path: Path) -> None:
    """A script that never calls destroy_process_group: stagewise's exit hook destroys the
    group while the interpreter is whole (a hook registered before it runs after it)."""
    script = tmp_path / "no_destroy.py"
    script.write_text(
        "import atexit, os, torch, torch.distributed as dist\n"
        "atexit.register(lambda: os.write(1, f'group alive at exit: {dist.is_initialized()}\\n'"
        ".encode()))\n"
        "import stagewise\n"
        "from resilient_train import train_job\n"
        "stagewise.init_distributed()\n"
        "train_job(dist.get_rank(), dist.get_world_size(), {'steps': 2})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(script)], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("group alive at exit: False") == 2, proc.stdout[-2000:]
    assert "terminate called" not in proc.stderr
