"""The ``zero_optimization`` section: ZeRO stage 1 (optimizer state sharded over replicas).

Stage 1 keeps, on each data-parallel rank of a stage, the optimizer state of
only its share of the stage's parameters (``stagewise.engine.zero``). Stages 2
and 3 are an error: they shard gradients (and parameters), which a pipeline
accumulates whole over its micro-batches until ``ReduceGrads`` (DeepSpeed's
pipeline engine rejects them too).

Every key of DeepSpeed 0.19.8's section is known (another, including those
0.19.8 removed, is an error that names it). Two act here: ``reduce_bucket_size`` (elements per data-parallel
gradient all-reduce) and ``allgather_bucket_size`` (elements per all-gather
of updated parameters). A key given with a value whose behaviour stagewise
does not have is listed in :attr:`ZeroConfig.not_applied`, which the engine
logs as a warning (rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagewise.config.keys import check_keys, typed
from stagewise.errors import ConfigError

__all__ = ["ZeroConfig"]

# DeepSpeed's default for both bucket sizes (elements).
DEFAULT_BUCKET = 500_000_000

# What stagewise does, for the keys that describe a behaviour: a key given with this
# value is consistent with it (no warning); with another value it is named in a warning.
_OUR_BEHAVIOUR: dict[str, Any] = {
    "overlap_comm": False,  # gradients are reduced at ReduceGrads, after the backward passes
    "contiguous_gradients": False,  # gradients stay per parameter (copied into buckets)
    "reduce_scatter": False,  # gradients are all-reduced (every replica clips the full norm)
    "allgather_partitions": True,  # updated shards are all-gathered
    "round_robin_gradients": False,
    "ignore_unused_parameters": True,  # an unused parameter's gradient is zero
    "compute_grad_norm": True,
    "legacy_stage1": False,
    "load_from_fp32_weights": True,  # there are no half-precision master copies to choose
    "zero_quantized_weights": False,
    "zero_quantized_nontrainable_weights": False,
    "zero_quantized_gradients": False,
    "cpu_offload": False,
    "cpu_offload_param": False,
    "cpu_offload_use_pin_memory": False,
    "parameter_alignment": False,
    "zero_hpz_partition_size": 1,
}
# Checkpoints load at any data-parallel size (elastic) whatever these say.
_ANY_VALUE = {"elastic_checkpoint", "use_multi_rank_bucket_allreduce", "memory_efficient_linear"}
_OFFLOAD = ("offload_optimizer", "offload_param")  # applied when absent or device "none"
# Keys of ZeRO stage 3 (or of offloading to NVMe) that never act at stage 1.
_STAGE3 = (
    "sub_group_size",
    "prefetch_bucket_size",
    "stage3_prefetch_bucket_size",
    "param_persistence_threshold",
    "stage3_param_persistence_threshold",
    "model_persistence_threshold",
    "stage3_model_persistence_threshold",
    "max_live_parameters",
    "stage3_max_live_parameters",
    "max_reuse_distance",
    "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "module_granularity_threshold",
    "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params",
    "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential",
    "stage3_allgather_sequential",
    "pipeline_loading_checkpoint",
    "override_module_apply",
    "log_trace_cache_warnings",
    "enable_sanity_checks",
    "save_muon_momentum_buffer_in_memory",
    "leaf_module",
    "zenflow",
)
_KNOWN = [
    "stage",
    "reduce_bucket_size",
    "allgather_bucket_size",
    *_OUR_BEHAVIOUR,
    *_ANY_VALUE,
    *_OFFLOAD,
    *_STAGE3,
]


def _stage_error(stage: int) -> ConfigError:
    sharded = "gradients" if stage == 2 else "gradients and parameters"
    return ConfigError(
        f"zero_optimization.stage={stage} shards {sharded}, but a pipeline accumulates every "
        "micro-batch's gradients whole until ReduceGrads (DeepSpeed's pipeline engine rejects "
        "stages 2 and 3 too); use stage 1 (optimizer state sharded over data-parallel "
        "replicas) or 0"
    )


@dataclass
class ZeroConfig:
    """The ``zero_optimization`` section (and the top-level ``zero_allow_untested_optimizer``)."""

    # 0: every replica holds the whole optimizer state; 1: each holds its share (ZeRO-1).
    stage: int = 0
    # Elements per data-parallel gradient all-reduce (with stage 1).
    reduce_bucket_size: int = DEFAULT_BUCKET
    # Elements per all-gather of the updated parameters over the replicas (with stage 1).
    allgather_bucket_size: int = DEFAULT_BUCKET
    # Shard an optimizer that is not known to update each element on its own (the
    # user vouches for it); as DeepSpeed's top-level key.
    allow_untested_optimizer: bool = False
    # The keys given whose behaviour stagewise does not have, as "key=value" (warned).
    not_applied: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, allow_untested_optimizer: Any = False) -> ZeroConfig:
        """The section as given (None or absent: stage 0)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config key zero_optimization must be an object, got {data!r} "
                f"({type(data).__name__})"
            )
        check_keys("zero_optimization", data, _KNOWN)
        p = "zero_optimization."
        out = cls(allow_untested_optimizer=bool(allow_untested_optimizer))
        out.stage = typed(p, "stage", data.get("stage", 0), int)
        if out.stage in (2, 3):
            raise _stage_error(out.stage)
        if out.stage not in (0, 1):
            raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {out.stage}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key in data:
                value = int(typed(p, key, data[key], (int, float)))
                if value < 1:
                    raise ConfigError(f"zero_optimization.{key} must be >= 1, got {data[key]}")
                setattr(out, key, value)
        out.not_applied = tuple(_not_applied(data, out.stage))
        return out


def _not_applied(data: dict[str, Any], stage: int) -> list[str]:
    """The given keys that do not act as given (all but ``stage`` at stage 0)."""
    names = []
    for key, value in data.items():
        if key == "stage":
            continue
        if stage == 0:
            names.append(f"{key}={value!r}")
        elif key in _OUR_BEHAVIOUR:
            if value is not None and value != _OUR_BEHAVIOUR[key]:
                names.append(f"{key}={value!r}")
        elif key in _OFFLOAD:
            device = value.get("device", "none") if isinstance(value, dict) else value
            if device not in (None, "none"):
                names.append(f"{key}={value!r}")
        elif key in _STAGE3:
            names.append(f"{key}={value!r}")
    return names
