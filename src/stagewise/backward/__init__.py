"""Backward passes: split into input and weight gradients, and checkpointed activations.

* :mod:`~stagewise.backward.graph`: where a backward splits, read from the autograd graph;
* :mod:`~stagewise.backward.split`: the input-gradient pass and the deferred weight pass;
* :mod:`~stagewise.backward.recompute`: activation checkpointing that recomputes once,
  also for a split backward;
* :mod:`~stagewise.backward.linear`: plain linear layers' weight gradients accumulated in
  one GEMM (and deferred by the store), in fp32.
"""

from stagewise.backward.linear import WeightGradStore, route_linear_weight_grads
from stagewise.backward.recompute import checkpoint, keeping_recomputed
from stagewise.backward.split import WeightPass, input_pass

__all__ = [
    "WeightGradStore",
    "WeightPass",
    "checkpoint",
    "input_pass",
    "keeping_recomputed",
    "route_linear_weight_grads",
]
