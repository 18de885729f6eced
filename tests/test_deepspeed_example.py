"""``examples/deepspeed_pipeline/train.py``: DeepSpeed's example shape, DeepSpeed's losses.

The script runs under torchrun on 2 stages with random images. Its losses are
compared with DeepSpeed's: pinned in ``tests/golden/deepspeed_surface.json`` and,
where DeepSpeed is installed, from the same script run on DeepSpeed with only its
imports changed back (``make_deepspeed_golden.deepspeed_script``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from golden import make_deepspeed_golden as dsg

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parent / "golden" / "deepspeed_surface.json").read_text())


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    return dict(dsg.example_losses(dsg.EXAMPLE, deepspeed=False))


def _same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    # DeepSpeed's FusedAdam and torch's AdamW round differently in the last bits.
    assert ours["parts"] == theirs["parts"] == [0, 16, 22]
    assert len(ours["losses"]) == dsg.EXAMPLE_STEPS
    np.testing.assert_allclose(ours["losses"], theirs["losses"], rtol=1e-5)
    np.testing.assert_allclose(ours["eval_loss"], theirs["eval_loss"], rtol=1e-5)


def test_example_trains_with_deepspeeds_losses(ours: dict[str, Any]) -> None:
    _same(ours, GOLDEN["example"])


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)
def test_example_on_deepspeed_with_its_imports_changed_back(ours: dict[str, Any]) -> None:
    theirs = dsg.example_losses(dsg.EXAMPLE, deepspeed=True)
    _same(ours, theirs)
    assert theirs == GOLDEN["example"]
