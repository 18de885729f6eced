"""The pipeline engine: a short face (:class:`PipelineEngine`) over small parts.

The parts, in the order a batch meets them (imports run downwards only):

* :mod:`~stagewise.engine.state`: the run mode and what a batch holds in flight;
* :mod:`~stagewise.engine.wire`: a tuple of tensors as one message;
* :mod:`~stagewise.engine.transfer`: links and receives posted in link order;
* :mod:`~stagewise.engine.stage_exec`: load, forward, backward (whole or split), loss;
* :mod:`~stagewise.engine.grad_step`: tied and data-parallel reductions, the global norm;
* :mod:`~stagewise.engine.optim`: optimizer and scheduler by name, loss scaling, the step;
* :mod:`~stagewise.engine.results`: the loss and evaluation outputs shared;
* :mod:`~stagewise.engine.interpreter`: the dispatch table and the loop over steps;
* :mod:`~stagewise.engine.timeline`: real timelines gathered and drawn;
* :mod:`~stagewise.engine.parts`: the parts built and joined into the dispatch table;
* :mod:`~stagewise.engine.pipeline_engine`: :class:`PipelineEngine`, DeepSpeed's methods.
"""

from stagewise.engine.pipeline_engine import PipelineEngine

__all__ = ["PipelineEngine"]
