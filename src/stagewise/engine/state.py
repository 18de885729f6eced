"""The run mode and the state one batch holds in flight.

A batch is run in one :class:`RunMode` (training, or evaluation with its
options), passed to every handler with the :class:`BatchState`; nothing about
the mode is hidden engine state. The state lives per ``(chunk_id, buffer_id)``
key, as DeepSpeed keeps it per buffer: the stage's inputs, its outputs (or, on
the last virtual stage, the micro-batch's loss), the gradients received for
them and the gradients of the inputs to send upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from stagewise.backward.split import WeightPass
from stagewise.errors import PipelineError

__all__ = ["BatchState", "Key", "RunMode", "as_tuple", "read_micro_batch", "to_device"]

Key = tuple[int, int]  # (chunk_id, buffer_id)


@dataclass(frozen=True)
class RunMode:
    """How a batch runs.

    Attributes:
        training: forward and backward with gradients, then the optimizer step;
            else forward only, under ``torch.no_grad``.
        micro_batches: micro-batches in the batch (the loss is divided by it).
        compute_loss: apply ``loss_fn`` on the last stage (else the "loss" is the
            model's output).
        return_logits: keep the last stage's output of every micro-batch.
    """

    training: bool
    micro_batches: int
    compute_loss: bool = True
    return_logits: bool = False

    @classmethod
    def train(cls, micro_batches: int) -> RunMode:
        return cls(training=True, micro_batches=micro_batches)

    @classmethod
    def evaluate(
        cls, micro_batches: int, compute_loss: bool = True, return_logits: bool = False
    ) -> RunMode:
        return cls(False, micro_batches, compute_loss, return_logits)


@dataclass
class BatchState:
    """Everything one batch holds, from its first instruction to its last.

    Attributes:
        mode: how the batch runs.
        next_micro_batch: returns the next ``(inputs, labels)`` pair of the batch.
        inputs, labels, outputs, output_grads, input_grads: per ``(chunk, buffer)``.
        batches: micro-batches read by a stage that holds both ends in different
            chunks (a V), kept for the other end, by micro-batch id.
        losses: per micro-batch, in order: the loss (or output, without a loss).
        logits: per micro-batch, the last stage's output (with ``return_logits``).
        step: the training step this batch is (``global_steps + 1``), for messages;
            None when evaluating.
        read: micro-batches this stage has read from the data so far.
        weight_passes: per key, the parameter gradients its ``I`` left for its ``W``.
        input_edges: per key, where the gradients of the received inputs arrive (the
            split backward's ``I`` differentiates towards them).
    """

    mode: RunMode
    next_micro_batch: Callable[[], Any]
    inputs: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    labels: dict[Key, Any] = field(default_factory=dict)
    outputs: dict[Key, Any] = field(default_factory=dict)
    output_grads: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    input_grads: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    batches: dict[int, Any] = field(default_factory=dict)
    losses: list[Any] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)
    step: int | None = None
    read: int = 0
    weight_passes: dict[Key, WeightPass] = field(default_factory=dict)
    input_edges: dict[Key, list[GradientEdge]] = field(default_factory=dict)


def as_tuple(value: Any) -> tuple[Any, ...]:
    """``value`` itself if it is a tuple, else a 1-tuple."""
    return value if isinstance(value, tuple) else (value,)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors moved to ``device`` (asynchronously where possible); containers walked."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return tuple(to_device(v, device) for v in value)
    return value


def read_micro_batch(data: Iterator[Any] | None, batch_fn: Callable[[Any], Any] | None) -> Any:
    """The next ``(inputs, labels)`` pair of ``data``, post-processed by ``batch_fn``."""
    if data is None:
        raise PipelineError(
            "no data: pass an iterator to train_batch(data_iter) / eval_batch(data_iter), "
            "or training_data= to stagewise.initialize"
        )
    item = next(data)
    if batch_fn is not None:
        item = batch_fn(item)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        length = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
        raise PipelineError(
            f"a micro-batch must be a pair (inputs, labels), got {type(item).__name__}{length}"
        )
    return item
