"""DeepSpeed's engine and stagewise's, same specs and seeds: the same per-step losses.

Runs ``tests/interop/parity_train.py`` under torchrun twice, once per
implementation (the script differs only in its imports). Skipped where
DeepSpeed is not installed (``DS_BUILD_OPS=0 pip install deepspeed==0.19.8``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
    ),
]

SCRIPT = Path(__file__).parent / "interop" / "parity_train.py"


def _train(impl: str, tmp_path: Path, *extra: str, nproc: int = 2) -> list[float]:
    out = tmp_path / f"{impl}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        str(SCRIPT),
        "--impl",
        impl,
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return list(json.loads(out.read_text())["losses"])


def test_same_losses_as_deepspeed(tmp_path: Path) -> None:
    ds = _train("deepspeed", tmp_path)
    ours = _train("stagewise", tmp_path)
    print("deepspeed:", ds)
    print("stagewise:", ours)
    assert len(ds) == len(ours) == 6
    for a, b in zip(ds, ours, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (ds, ours)


def test_zero1_same_losses_and_weights_as_deepspeed(tmp_path: Path) -> None:
    """2 stages x 2 data-parallel, ZeRO stage 1 (clipping off): DeepSpeed's ZeRO-1 and ours."""
    runs = {}
    for impl in ("deepspeed", "stagewise"):
        dump = str(tmp_path / impl)
        runs[impl] = _train(impl, tmp_path, "--zero", "1", "--dump", dump, nproc=4)
    print("deepspeed:", runs["deepspeed"])
    print("stagewise:", runs["stagewise"])
    assert len(runs["deepspeed"]) == len(runs["stagewise"]) == 6
    for a, b in zip(runs["deepspeed"], runs["stagewise"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(a), runs
    for rank in range(4):
        ds = torch.load(tmp_path / f"deepspeed.{rank}.pt", weights_only=True)
        ours = torch.load(tmp_path / f"stagewise.{rank}.pt", weights_only=True)
        assert ds.keys() == ours.keys()
        for name, value in ds.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)
