"""Ranks that die or stop answering: everyone else names them and exits on their own.

A 2 x 2 job (2 stages, 2 data-parallel replicas) runs as four plain processes (no
torchrun to clean up after it). Once it trains, one rank is SIGKILLed or SIGSTOPped;
every other process must exit by itself (non-zero) within ``pipeline.timeout_s`` + 5 s,
its error naming the culprit. A stopped rank that is then resumed (SIGCONT) finds its
peers gone: its failing transfer is a PeerError naming a peer, and it exits too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("resilient_train.py")
TIMEOUT_S = 5.0
VICTIM = 2  # stage 1 of replica 0: its pipeline peer is rank 0, its data-parallel peer rank 3
SLEEPER = 1  # stage 0 of replica 1: its pipeline peer is rank 3, its data-parallel peer rank 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tmp: Path, *extra: str) -> list[tuple[subprocess.Popen[bytes], Any]]:
    port = _free_port()
    procs = []
    for rank in range(4):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": "4",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [
            sys.executable, str(SCRIPT), "--out", str(tmp / "out"), "--steps", "100000",
            "--timeout-s", str(TIMEOUT_S), "--ready", str(tmp / "ready"), "--ready-after", "3",
            "--sleep", "0.01", "--marks", str(tmp), *extra,
        ]  # fmt: skip
        log = open(tmp / f"rank{rank}.txt", "wb")  # closed by _stop_all
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    return procs


def _wait_ready(tmp: Path, procs: list[Any], marker: str = "ready") -> None:
    deadline = time.monotonic() + 180
    while not (tmp / marker).exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            _stop_all(procs)
            logs = "\n".join((tmp / f"rank{r}.txt").read_text()[-1500:] for r in range(4))
            pytest.fail(f"the job did not start training:\n{logs}")
        time.sleep(0.1)


def _exit_times(procs: list[Any], ranks: list[int], since: float, limit: float) -> dict[int, float]:
    """Seconds after ``since`` at which each of ``ranks`` exited (missing: still running)."""
    exited: dict[int, float] = {}
    while len(exited) < len(ranks) and time.monotonic() < since + limit:
        for rank in ranks:
            if rank not in exited and procs[rank][0].poll() is not None:
                exited[rank] = time.monotonic() - since
        time.sleep(0.05)
    return exited


def _stop_all(procs: list[Any]) -> None:
    for proc, log in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        log.close()


def _logs(tmp: Path) -> dict[int, str]:
    return {r: (tmp / f"rank{r}.txt").read_text(errors="replace") for r in range(4)}


def test_killed_rank_the_others_exit_naming_it(tmp_path: Path) -> None:
    procs = _start(tmp_path)
    try:
        _wait_ready(tmp_path, procs)
        os.kill(procs[VICTIM][0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        others = [r for r in range(4) if r != VICTIM]
        exited = _exit_times(procs, others, killed_at, TIMEOUT_S + 5)
    finally:
        _stop_all(procs)
    logs = _logs(tmp_path)
    assert sorted(exited) == others, (exited, {r: logs[r][-2000:] for r in others})
    for rank in others:
        assert procs[rank][0].returncode != 0, logs[rank][-2000:]
        assert "PeerError" in logs[rank], logs[rank][-2000:]
        assert "Traceback" in logs[rank]
    for rank in (0, 3):  # the victim's direct peers name it
        assert "stage 1 (rank 2)" in logs[rank], logs[rank][-2000:]


def test_stopped_rank_is_named_and_everyone_exits(tmp_path: Path) -> None:
    """Rank 1 stops itself (SIGSTOP) before step 4; resumed after the others left, its first
    transfer (sending stage 0's activation to rank 3) fails as a PeerError naming rank 3."""
    procs = _start(tmp_path, "--stop-at", "4", "--stop-rank", str(SLEEPER))
    try:
        _wait_ready(tmp_path, procs, f"stopped-{SLEEPER}")
        stopped_at = time.monotonic()
        others = [r for r in range(4) if r != SLEEPER]
        exited = _exit_times(procs, others, stopped_at, TIMEOUT_S + 5)
        still = procs[SLEEPER][0].poll()
        os.kill(procs[SLEEPER][0].pid, signal.SIGCONT)
        resumed = _exit_times(procs, [SLEEPER], time.monotonic(), TIMEOUT_S + 5)
    finally:
        _stop_all(procs)
    logs = _logs(tmp_path)
    assert still is None  # stopped, not dead, until resumed
    assert sorted(exited) == others, (exited, {r: logs[r][-2000:] for r in others})
    assert min(exited.values()) >= TIMEOUT_S - 1, exited  # they waited pipeline.timeout_s
    for rank in (0, 3):  # the sleeper's direct peers name it
        assert re.search(r"PeerError: .*Not answering: stage 0 \(rank 1\)", logs[rank]), logs[rank][
            -2500:
        ]
    assert SLEEPER in resumed, logs[SLEEPER][-2500:]
    assert procs[SLEEPER][0].returncode != 0
    assert re.search(r"PeerError: .*stage 1 \(rank 3\)", logs[SLEEPER]), logs[SLEEPER][-2500:]
