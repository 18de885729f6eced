"""The front door: the demo at a tiny size, and the example under torchrun on 1 and 2 "nodes"."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "train_gpt.py"
SMALL = ["--steps", "3", "--n-layer", "2", "--n-embd", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_demo_tiny(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagewise",
            "demo",
            "--tiny",
            "--no-progress",
            "--out",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"demo: validation loss ([\d.]+) -> ([\d.]+) in (\d+) steps, (\d+) s", last
    )
    assert match, last
    assert float(match[2]) < float(match[1])  # it learned something in 4 steps
    for name in ("loss.png", "timeline.png", "timeline.json"):
        assert (tmp_path / "demo" / name).stat().st_size > 1000, name


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_example_one_node_equals_two_agents(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    proc = subprocess.run(
        _torchrun(
            "--standalone", "--nproc_per_node", "2", str(EXAMPLE), *SMALL, "--losses", str(one)
        ),
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two = tmp_path / "two.json"
    port = _free_port()
    agents = [
        subprocess.Popen(
            _torchrun(
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "two-agents",
                str(EXAMPLE),
                *SMALL,
                "--losses",
                str(two),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    for agent in agents:
        out, _ = agent.communicate(timeout=240)
        assert agent.returncode == 0, out.decode()[-3000:]
    assert json.loads(one.read_text()) == json.loads(two.read_text())
