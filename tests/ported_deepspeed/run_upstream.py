"""Run DeepSpeed's own pipeline unit tests against stagewise, with only their imports changed.

DeepSpeed's tests are not in its wheel; give a DeepSpeed source checkout::

    .venv/bin/python tests/ported_deepspeed/run_upstream.py ~/src/DeepSpeed [pytest args]

Each of :data:`FILES` is copied to a temporary directory with its ``deepspeed``
imports rewritten to stagewise's mirrors (``import deepspeed`` ->
``import stagewise as deepspeed``, ``deepspeed.X`` -> ``stagewise.X``); its
``unit.*`` helpers come from ``upstream/unit`` (``DistributedTest`` over
``tests/distributed.py``, the CIFAR AlexNet on random images). The test bodies
are DeepSpeed's, unchanged. The tests that call DeepSpeed's private helpers
fail with an AttributeError naming the helper; ``docs/moving-from-deepspeed.md``
lists them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent

FILES = [
    "tests/unit/runtime/pipe/test_pipe_schedule.py",
    "tests/unit/runtime/pipe/test_topology.py",
    "tests/unit/runtime/pipe/test_pipe_module.py",
    "tests/unit/runtime/pipe/test_pipe.py",
]

_RULES = [
    (re.compile(r"^import deepspeed$", re.M), "import stagewise as deepspeed"),
    (re.compile(r"^import deepspeed\.(\S+) as", re.M), r"import stagewise.\1 as"),
    (re.compile(r"^from deepspeed\.", re.M), "from stagewise."),
    (re.compile(r"^from deepspeed import", re.M), "from stagewise import"),
    (re.compile(r"^from tests\.unit\.", re.M), "from unit."),
]


def rewrite(text: str) -> str:
    """DeepSpeed's test file with its imports pointed at stagewise."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    source = Path(argv[0]).expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "upstream_pipe"
        target.mkdir()
        for name in FILES:
            path = source / name
            if path.exists():
                (target / path.name).write_text(rewrite(path.read_text()))
        shutil.copytree(HERE / "upstream" / "unit", Path(tmp) / "unit")
        pythonpath = f"{tmp}:{TESTS}"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(target), *argv[1:]]
        env = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
        return subprocess.call(cmd, env={**os.environ, **env}, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
