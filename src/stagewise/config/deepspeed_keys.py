"""The config keys DeepSpeed 0.19.8 reads, so that its config files load here as they are.

:data:`TOP_LEVEL` is every top-level key that ``deepspeed.runtime.config.DeepSpeedConfig``
reads (recorded from DeepSpeed itself: ``tests/golden/make_golden.py`` and the
oracle test compare it with the installed DeepSpeed). DeepSpeed ignores any
other top-level key. :data:`SECTIONS` lists the keys DeepSpeed reads inside the
sections whose keys stagewise checks.

A key in these lists that stagewise does not act on is *accepted, not
implemented*: it is named in one warning, unless its value asks for what
stagewise does anyway (:data:`HARMLESS`: DeepSpeed's default where it is
stagewise's behaviour, or a section whose ``enabled`` is false). Any other key
is *unknown*: a warning with "did you mean". ``"strict_config": true`` makes
both errors.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HARMLESS", "SECTIONS", "TOP_LEVEL", "deepspeed_keys", "is_harmless"]

#: Every top-level key DeepSpeed 0.19.8 reads.
TOP_LEVEL: frozenset[str] = frozenset(
    {
        "activation_checkpointing",
        "aio",
        "amp",
        "autotuning",
        "bf16",
        "bfloat16",
        "checkpoint",
        "comet",
        "comms_logger",
        "communication_data_type",
        "compile",
        "compression_training",
        "csv_monitor",
        "curriculum_learning",
        "data_efficiency",
        "data_types",
        "dataloader_drop_last",
        "datastates_ckpt",
        "disable_allgather",
        "disable_python_gc",
        "dump_state",
        "eigenvalue",
        "elasticity",
        "expert_parallel",
        "flops_profiler",
        "fp16",
        "gradient_accumulation_steps",
        "gradient_allreduce_op",
        "gradient_clipping",
        "gradient_predivide_factor",
        "graph_harvesting",
        "hybrid_engine",
        "log_level",
        "managed_gradient_accumulation",
        "memory_breakdown",
        "nebula",
        "optimizer",
        "pipeline",
        "prescale_gradients",
        "progressive_layer_drop",
        "quantize_training",
        "scheduler",
        "seq_parallel_communication_data_type",
        "sparse_attention",
        "sparse_gradients",
        "steps_per_print",
        "tensor_parallel",
        "tensorboard",
        "timers",
        "torch_autocast",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "use_data_before_expert_parallelism",
        "vocabulary_size",
        "wall_clock_breakdown",
        "wandb",
        "weight_quantization",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "zero_optimization",
    }
)

#: The keys DeepSpeed 0.19.8 reads inside a section (by section name).
SECTIONS: dict[str, frozenset[str]] = {
    "optimizer": frozenset({"type", "params", "legacy_fusion"}),
    "scheduler": frozenset({"type", "params"}),
    "pipeline": frozenset(
        {
            "stages",
            "partition",
            "seed_layers",
            "activation_checkpoint_interval",
            "pipe_partitioned",
            "grad_partitioned",
            "use_reentrant",
        }
    ),
    "fp16": frozenset(
        {
            "enabled",
            "auto_cast",
            "loss_scale",
            "initial_scale_power",
            "loss_scale_window",
            "hysteresis",
            "consecutive_hysteresis",
            "min_loss_scale",
            "fp16_master_weights_and_grads",
        }
    ),
    "bf16": frozenset(
        {
            "enabled",
            "immediate_grad_update",
            "check_grad_overflow",
            "bf16_master_weights_and_grads",
            "bf16_optimizer_states",
        }
    ),
    "activation_checkpointing": frozenset(
        {
            "partition_activations",
            "number_checkpoints",
            "contiguous_memory_optimization",
            "synchronize_checkpoint_boundary",
            "profile",
            "cpu_checkpointing",
        }
    ),
    "checkpoint": frozenset(
        {
            "tag_validation",
            "load_universal",
            "use_node_local_storage",
            "parallel_write",
            "checkpoint_serialization",
            "writer",
        }
    ),
}
SECTIONS["bfloat16"] = SECTIONS["bf16"]

#: Values of DeepSpeed keys stagewise does not read that ask for what stagewise does anyway.
HARMLESS: dict[str, Any] = {
    # DeepSpeed never reads these three; its pipeline engine cuts the layers in the module.
    "pipeline.stages": "auto",
    "pipeline.partition": "best",
    # Partitioning activations and gradients over model-parallel ranks saves memory only.
    "pipeline.pipe_partitioned": True,
    "pipeline.grad_partitioned": True,
    # stagewise checkpoints activations without re-entry, always.
    "pipeline.use_reentrant": False,
    "optimizer.legacy_fusion": False,
    "fp16.fp16_master_weights_and_grads": False,
    "bf16.immediate_grad_update": False,
    "bf16.bf16_master_weights_and_grads": False,
    "bf16.bf16_optimizer_states": False,
    "bfloat16.immediate_grad_update": False,
    "bfloat16.bf16_master_weights_and_grads": False,
    "bfloat16.bf16_optimizer_states": False,
}


def deepspeed_keys(section: str) -> frozenset[str]:
    """The keys DeepSpeed reads in ``section`` ("" for the top level; empty if unknown)."""
    if not section:
        return TOP_LEVEL
    return SECTIONS.get(section, frozenset())


def is_harmless(section: str, key: str, value: Any) -> bool:
    """Whether a DeepSpeed key stagewise does not read asks for nothing stagewise lacks."""
    path = f"{section}.{key}" if section else key
    if path in HARMLESS:
        return bool(value == HARMLESS[path] and type(value) is type(HARMLESS[path]))
    # A whole feature section (tensorboard, wandb, flops_profiler, ...) switched off.
    return isinstance(value, dict) and "enabled" in value and value["enabled"] is False
