"""The mirror of ``deepspeed.ops``: DeepSpeed's optimizers by name, its kernels as clear errors.

``stagewise.ops.adam.FusedAdam`` and ``DeepSpeedCPUAdam`` are torch's Adam with
DeepSpeed's arguments and defaults (the math of DeepSpeed's fused kernels, not
the kernels). DeepSpeed's other CUDA kernels (``ops.lamb.FusedLamb``,
``ops.transformer.DeepSpeedTransformerLayer``) exist and raise an error that
says what to use instead.
"""

from stagewise.ops import adam, lamb, transformer

__all__ = ["adam", "lamb", "transformer"]
