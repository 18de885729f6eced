"""Run a function in N CPU processes over gloo, bounded in time.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each
joining a fresh gloo group (one thread each, a free port from a TCPStore
served by the test process), calls ``fn(rank, world_size, *args)`` and returns
the results in rank order. A failure on any rank is re-raised with its rank
and traceback; a hang fails after ``timeout`` seconds, never stalls.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    exit_code: int | None = None


def _dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, _dumps(value), ""))
    except BaseException:
        results.put((rank, False, b"", traceback.format_exc()))
    finally:
        # Flush the result, then exit without a collective teardown: a peer's failure can
        # leave the group unusable.
        results.close()
        results.join_thread()
        os._exit(0)


def _context() -> Any:
    """Processes forked from a server that has imported torch and stagewise once.

    A fresh interpreter importing torch costs about a second of CPU; forking from a
    server that already did keeps the per-process cost small, so the many short
    multi-process tests stay cheap. (Nothing has run a torch op or started a thread
    in the server, so forking it is safe.)
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "stagewise", "distributed"])
    return ctx


def run_distributed_raw(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[RankResult]:
    """Run ``fn`` on every rank; return every rank's outcome (failures included)."""
    ctx = _context()
    results = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, store.port, fn, args, results, dict(env or {})),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, RankResult] = {}
    exited_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, payload, error = results.get(timeout=0.2)
            outcomes[rank] = RankResult(rank, ok, _loads(payload) if ok else None, error)
            continue
        except queue_mod.Empty:
            pass
        now = time.monotonic()
        for rank, proc in enumerate(procs):
            if rank in outcomes or proc.exitcode is None:
                continue
            exited_at.setdefault(rank, now)
            if now - exited_at[rank] > 2.0:  # exited (killed?) without reporting
                outcomes[rank] = RankResult(
                    rank,
                    False,
                    error=f"process exited with code {proc.exitcode}",
                    exit_code=proc.exitcode,
                )
    for proc in procs:
        proc.join(timeout=max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    del store
    for rank in range(world_size):
        if rank not in outcomes:
            outcomes[rank] = RankResult(
                rank, False, error=f"rank {rank} did not finish within {timeout:g} s (hang?)"
            )
    return [outcomes[rank] for rank in range(world_size)]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn`` on every rank and return the values; re-raise any rank's failure."""
    outcomes = run_distributed_raw(fn, world_size, *args, timeout=timeout, env=env)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        details = "\n".join(f"--- rank {o.rank} ---\n{o.error}" for o in failed)
        raise AssertionError(f"{len(failed)} of {world_size} ranks failed:\n{details}")
    return [o.value for o in outcomes]
