"""The mirror of ``deepspeed.checkpointing``: activation checkpointing by DeepSpeed's names.

:func:`checkpoint` recomputes ``function``'s activations in the backward pass
(non-reentrant, :func:`stagewise.backward.checkpoint`, which also works when no
input needs a gradient, e.g. token ids, and recomputes once for a split
backward); the random state is restored for the recompute, so dropout draws the
same masks. :func:`non_reentrant_checkpoint` is the same function that
``PipelineModule`` uses by default, so
``module.activation_checkpoint_func is checkpointing.non_reentrant_checkpoint``.

:func:`configure` takes DeepSpeed's arguments. Its options change where
DeepSpeed keeps checkpointed activations (partitioned over model-parallel
ranks, in one contiguous buffer, on the CPU) or add timing, never the
results; stagewise does not implement them, and enabling one is reported in
one warning that names it. Model-parallel RNG tracking
(``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker``) is not
mirrored and raises an error that says what to use instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from stagewise.backward.recompute import checkpoint as non_reentrant_checkpoint

__all__ = [
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint",
    "reset",
    "set_num_layers",
]

logger = logging.getLogger(__name__)

#: configure()'s options -> the ``activation_checkpointing`` config keys DeepSpeed reads them from.
_CONFIG_KEYS = {
    "partition_activations": "partition_activations",
    "contiguous_checkpointing": "contiguous_memory_optimization",
    "num_checkpoints": "number_checkpoints",
    "checkpoint_in_cpu": "cpu_checkpointing",
    "synchronize": "synchronize_checkpoint_boundary",
    "profile": "profile",
}
_MEMORY_ONLY = (
    "partition_activations",
    "contiguous_checkpointing",
    "checkpoint_in_cpu",
    "synchronize",
    "profile",
)

_state: dict[str, Any] = {"configured": False, "num_layers": None}


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, its activations recomputed in the backward pass."""
    return non_reentrant_checkpoint(_with_kwargs(function, kwargs), *args)


def _with_kwargs(function: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    if not kwargs:
        return function

    def call(*args: Any) -> Any:
        return function(*args, **kwargs)

    return call


def _config_section(config: Any) -> dict[str, Any]:
    """The ``activation_checkpointing`` section of a config dict or JSON path."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        section = config.get("activation_checkpointing") or {}
        return dict(section) if isinstance(section, dict) else {}
    # stagewise's Config: its activation_checkpointing section was reported when parsed.
    return {}


def configure(
    mpu_: Any = None,
    deepspeed_config: Any = None,
    partition_activations: bool | None = None,
    contiguous_checkpointing: bool | None = None,
    num_checkpoints: int | None = None,
    checkpoint_in_cpu: bool | None = None,
    synchronize: bool | None = None,
    profile: bool | None = None,
) -> None:
    """Configure activation checkpointing, with DeepSpeed's arguments.

    Args:
        mpu_: a model-parallel unit (accepted; checkpoints are not partitioned here).
        deepspeed_config: a config dict, JSON path or stagewise ``Config`` whose
            ``activation_checkpointing`` section gives the defaults of the options.
        partition_activations, contiguous_checkpointing, checkpoint_in_cpu,
        synchronize, profile: DeepSpeed's memory and timing options: not
            implemented; any that is enabled is named in one warning.
        num_checkpoints: the number of checkpoints (for contiguous buffers).
    """
    given = {
        "partition_activations": partition_activations,
        "contiguous_checkpointing": contiguous_checkpointing,
        "num_checkpoints": num_checkpoints,
        "checkpoint_in_cpu": checkpoint_in_cpu,
        "synchronize": synchronize,
        "profile": profile,
    }
    section = _config_section(deepspeed_config) if deepspeed_config is not None else {}
    options = {
        name: value if value is not None else section.get(key)
        for (name, value), key in zip(given.items(), _CONFIG_KEYS.values(), strict=True)
    }
    _state["configured"] = True
    _state["num_layers"] = options["num_checkpoints"]
    enabled = [name for name in _MEMORY_ONLY if options[name]]
    if enabled and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning(
            "checkpointing.configure: %s not implemented by stagewise (they change where "
            "DeepSpeed keeps checkpointed activations, or time them; results are the same "
            "without them)",
            ", ".join(enabled),
        )


def is_configured() -> bool:
    """Whether :func:`configure` was called."""
    return bool(_state["configured"])


def set_num_layers(nlayers: int) -> None:
    """The number of checkpoints (DeepSpeed sizes its contiguous buffers with it)."""
    _state["num_layers"] = nlayers


def reset() -> None:
    """Free checkpoint buffers between evaluations: stagewise keeps none, so none to free."""


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """DeepSpeed's switch for partitioned checkpoints: not implemented (warns when on)."""
    if partition_activation:
        configure(partition_activations=True)


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Not mirrored: DeepSpeed's model-parallel RNG tracker (raises ``NotImplementedError``)."""
    raise NotImplementedError(
        "checkpointing.model_parallel_cuda_manual_seed: stagewise has no model-parallel RNG "
        "tracker; seed with stagewise.runtime.utils.set_random_seed(seed) or "
        "get_accelerator().manual_seed(seed) (checkpoint() restores the RNG state itself)"
    )


def get_cuda_rng_tracker() -> Any:
    """Not mirrored: DeepSpeed's model-parallel RNG tracker (raises ``NotImplementedError``)."""
    raise NotImplementedError(
        "checkpointing.get_cuda_rng_tracker: stagewise has no model-parallel RNG tracker; "
        "checkpoint() restores the CPU and CUDA random state for the recompute itself"
    )
