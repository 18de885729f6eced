"""Models written as layer specs, and a one-process reference to check pipelines against.

- :mod:`stagewise.models.gpt`: a small GPT with tied input/output embeddings.
- :mod:`stagewise.models.reference`: any spec list built and run in one process
  with the pipeline's per-layer seeding.
"""

from __future__ import annotations

from stagewise.models.gpt import (
    DEMO_CONFIG,
    DEMO_TRAINING,
    GPT,
    DemoTraining,
    GPTConfig,
    generate,
    gpt_head,
    gpt_layer_specs,
    gpt_loss,
)
from stagewise.models.reference import ReferenceModel, build_reference, seed_everything

__all__ = [
    "DEMO_CONFIG",
    "DEMO_TRAINING",
    "GPT",
    "DemoTraining",
    "GPTConfig",
    "ReferenceModel",
    "build_reference",
    "generate",
    "gpt_head",
    "gpt_layer_specs",
    "gpt_loss",
    "seed_everything",
]
