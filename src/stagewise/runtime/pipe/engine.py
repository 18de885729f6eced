"""The mirror of ``deepspeed.runtime.pipe.engine``: ``PipelineEngine``.

A subclass adds an instruction through ``register_instruction`` (or DeepSpeed's
``_INSTRUCTION_MAP``) and wraps a built-in one by overriding its ``_exec_*``
method; see :mod:`stagewise.engine.subclass` for what is honoured.
"""

from stagewise.engine import PipelineEngine

__all__ = ["PipelineEngine"]
