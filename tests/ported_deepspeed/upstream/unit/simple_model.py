"""DeepSpeed's ``unit.simple_model.args_from_dict``: an args namespace naming a JSON config."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

__all__ = ["args_from_dict"]


def args_from_dict(tmpdir: Any, config_dict: dict[str, Any]) -> argparse.Namespace:
    path = os.path.join(str(tmpdir) if tmpdir else tempfile.mkdtemp(), "ds_config.json")
    with open(path, "w") as handle:
        json.dump(config_dict, handle)
    return argparse.Namespace(deepspeed=True, deepspeed_config=path, local_rank=0)
