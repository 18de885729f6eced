"""The stage executor: one micro-batch's load, forward, backward and loss on this stage.

Each method runs one instruction on the :class:`~stagewise.engine.state.BatchState`
of the batch. The last virtual stage turns its output into the micro-batch's
loss (``loss_fn(outputs, labels)``), divided by the number of micro-batches
(and multiplied by the fp16 loss scale) before its backward.

The backward comes whole (``B``) or split (``I`` then ``W``): the input-gradient
pass differentiates towards the stage's inputs only and leaves every
parameter's gradient to the weight pass (:mod:`stagewise.backward.split`, for
any layer type, under autocast and activation checkpointing); plain linear
layers in fp32 leave theirs in a :class:`~stagewise.backward.linear.WeightGradStore`
instead, which accumulates them in one GEMM.

A stage's input belongs to the stage, which may modify it in place (a first
layer ``nn.ReLU(inplace=True)``), as in DeepSpeed, with no copy: a received
activation (a fresh buffer) enters the graph through :class:`StageInput`, which
marks it dirty and hands it back as a non-leaf whose backward captures the
input gradient; a loaded micro-batch is copied only when it is the caller's own
tensor (a CPU run, or data already on the device).

Failures name their culprit: a data iterator that runs out says at which
micro-batch of which step; a layer that cannot take what the previous stage
sent (a shape mismatch) is found by running the chunk's layers one by one on
that input, and named with the stage, the input's shapes and what it expects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from stagewise.backward.linear import DeferredLinear, WeightGradStore
from stagewise.backward.recompute import keeping_recomputed
from stagewise.backward.split import input_pass
from stagewise.engine.state import BatchState, Key, as_tuple, to_device
from stagewise.errors import PipelineError
from stagewise.module import PipelineModule
from stagewise.schedule import BufferOpInstruction
from stagewise.schedule.routes import ChunkRoutes

__all__ = ["StageExecutor"]


def _key(instr: BufferOpInstruction) -> Key:
    return instr.chunk_id, instr.buffer_id


class StageInput(torch.autograd.Function):
    """The received tensors themselves, as outputs of a node that keeps their gradients.

    ``StageInput.apply(sink, anchor, *tensors)`` returns ``tensors`` (the same
    objects, marked dirty: their history now starts here, so layers may modify them
    in place); the backward appends the gradient of each to ``sink`` and stops.
    ``anchor`` is a zero-size leaf that wants a gradient, so the outputs do too.
    """

    @staticmethod
    def forward(ctx: Any, sink: list[torch.Tensor], anchor: torch.Tensor, *tensors: Any) -> Any:
        ctx.sink = sink
        ctx.mark_dirty(*tensors)
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.sink.extend(grads)
        return (None, None, *([None] * len(grads)))


def _own(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, as a tensor the stage may modify (a copy if it is the caller's)."""
    moved = tensor.detach().to(device)
    if moved.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        moved = moved.clone()
    return moved


def _shapes(value: Any) -> str:
    values = value if isinstance(value, tuple) else (value,)
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
    return ", ".join(str(s) for s in shapes)


def _expects(func: Any) -> str:
    """What a layer takes, as far as its type tells."""
    if isinstance(func, nn.Linear):
        return f"(..., {func.in_features})"
    if isinstance(func, nn.LayerNorm):
        return f"(..., {', '.join(str(d) for d in func.normalized_shape)})"
    if isinstance(func, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"(N, {func.in_channels}, ...)"
    if isinstance(func, nn.Embedding):
        return f"integer ids below {func.num_embeddings}"
    if isinstance(func, nn.Module):
        for name, param in func.named_parameters():
            return f"an input that fits its {name} of shape {tuple(param.shape)}"
    return "another input"


class StageExecutor:
    """Runs this stage's share of each micro-batch.

    Args:
        module: this rank's layers.
        routes: this stage's routes, one per chunk (which chunks are first or last).
        device: where inputs and labels go.
        autocast: a fresh autocast context (or a null one) per forward.
        loss_scale: the factor of the loss before its backward, besides
            ``1 / micro_batches`` (the fp16 loss scale, else 1).
        weight_store: where routed layers leave their weight-gradient work.
        splits_backward: whether the schedule splits the backward (``I`` and ``W``):
            forwards then keep checkpointed activations for both passes.
    """

    def __init__(
        self,
        module: PipelineModule,
        routes: list[ChunkRoutes],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        loss_scale: Callable[[], float],
        weight_store: WeightGradStore,
        splits_backward: bool = False,
    ) -> None:
        self.module = module
        self.routes = routes
        self.device = device
        self.autocast = autocast
        self.loss_scale = loss_scale
        self.weight_store = weight_store
        self._holds_both_ends = any(r.first for r in routes) and any(r.last for r in routes)
        # A zero-size leaf wanting a gradient: StageInput's outputs want one through it.
        self._anchor = torch.empty(0, requires_grad=True)
        self.splits_backward = splits_backward
        self._param_ids = frozenset(id(p) for p in module.parameters() if p.requires_grad)
        self._self_handled = frozenset({DeferredLinear}) if weight_store.enabled else frozenset()

    # -- data ---------------------------------------------------------------------------
    def load(self, instr: BufferOpInstruction, batch: BatchState) -> None:
        """Read a micro-batch: inputs on the first virtual stage, labels on the last."""
        key, role = _key(instr), self.routes[instr.chunk_id]
        # A stage holding both ends in different chunks (a V) reads each micro-batch once.
        if role.last and not role.first and instr.micro_batch_id in batch.batches:
            data = batch.batches.pop(instr.micro_batch_id)
        else:
            try:
                data = batch.next_micro_batch()
            except StopIteration:
                where = f"step {batch.step}" if batch.step is not None else "this batch"
                raise PipelineError(
                    f"the data iterator ran out at micro-batch {batch.read} (counting from 0, "
                    f"of {batch.mode.micro_batches}) of {where}: each batch reads "
                    f"{batch.mode.micro_batches} micro-batches (gradient_accumulation_steps) on "
                    "the first and the last stage; give more data, or wrap a finite loader in "
                    "stagewise.RepeatingLoader"
                ) from None
            batch.read += 1
            if role.first and not role.last and self._holds_both_ends:
                batch.batches[instr.micro_batch_id] = data
        if role.first:
            batch.inputs[key] = tuple(
                _own(t, self.device) if isinstance(t, torch.Tensor) else t
                for t in as_tuple(data[0])
            )
        if role.last:
            batch.labels[key] = to_device(data[1], self.device)

    def accept_input(
        self, instr: BufferOpInstruction, batch: BatchState, tensors: list[torch.Tensor]
    ) -> None:
        """Keep a received activation as the chunk's input, which its layers may modify.

        To train, the floating-point tensors pass through :class:`StageInput` (no copy);
        their gradients collect in ``batch.input_grads[key]`` during the backward.
        """
        key = _key(instr)
        if batch.mode.training:
            floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]
            sink: list[torch.Tensor] = []
            batch.input_grads[key] = sink
            if floats:
                marked = StageInput.apply(
                    sink, self._anchor, *[tensors[i].detach() for i in floats]
                )
                # Where the input gradients arrive, taken before a layer modifies an input in
                # place (which moves the tensor's own history on): the split backward's I
                # differentiates towards these edges.
                batch.input_edges[key] = [get_gradient_edge(t) for t in marked]
                tensors = list(tensors)
                for i, tensor in zip(floats, marked, strict=True):
                    tensors[i] = tensor
        batch.inputs[key] = tuple(tensors)

    # -- forward ------------------------------------------------------------------------
    def forward(self, instr: BufferOpInstruction, batch: BatchState) -> None:
        """Run the chunk's layers; the last virtual stage adds the loss."""
        key, mode = _key(instr), batch.mode
        last = self.routes[instr.chunk_id].last
        inputs = batch.inputs.get(key)
        if inputs is None:
            raise PipelineError(
                f"{instr!r} has no input (no LoadMicroBatch or RecvActivation before it); the "
                "schedule is wrong"
            )
        x: Any = inputs[0] if len(inputs) == 1 else inputs
        with self.autocast(), keeping_recomputed(self.splits_backward and mode.training):
            try:
                outputs = self.module(x, chunk_id=instr.chunk_id)
            except RuntimeError as exc:
                if self.routes[instr.chunk_id].first:
                    raise
                raise self._mismatch(instr.chunk_id, x, exc) from exc
            if last:
                if mode.compute_loss and self.module.loss_fn is not None:
                    loss = self.module.loss_fn(outputs, batch.labels.pop(key, None))
                else:
                    loss = outputs
        if not last:
            batch.outputs[key] = outputs
        else:
            if mode.return_logits:
                batch.logits.append(None if mode.training else outputs)
            batch.losses.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            if mode.training:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = (
                        f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
                    )
                    raise PipelineError(
                        "the loss of a micro-batch must be a scalar tensor to train; loss_fn "
                        f"returned {type(loss).__name__}{shape}"
                    )
                batch.outputs[key] = loss
        if not mode.training:
            del batch.inputs[key]

    def _mismatch(self, chunk: int, x: Any, exc: RuntimeError) -> Exception:
        """Run the chunk's layers one by one on a received input to name the one that fails."""
        ids = self.module.local_layer_ids(chunk)
        start = sum(len(self.module.local_layer_ids(c)) for c in range(chunk))
        funcs = self.module.forward_funcs[start : start + len(ids)]
        channel = self.routes[chunk].recv_activation
        source = f"stage {channel.peer}" if channel is not None else "the previous stage"
        stage = self.module.stage_id
        with torch.no_grad():
            for position, (idx, func) in enumerate(zip(ids, funcs, strict=True)):
                try:
                    y = func(x)
                except Exception as failure:
                    name = type(func).__name__ if isinstance(func, nn.Module) else str(func)
                    which = "its first layer" if position == 0 else "layer"
                    return PipelineError(
                        f"stage {stage} cannot run {which} {idx} ({name}) on "
                        f"{'the activation received from ' + source if position == 0 else 'its input'}"
                        f": the input has shape {_shapes(x)} but the layer expects "
                        f"{_expects(func)} ({type(failure).__name__}: {failure}); check that "
                        f"the layers on both sides of the cut fit"
                    )
                x = y
        return exc

    # -- backward -----------------------------------------------------------------------
    def _roots(self, key: Key, batch: BatchState) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to differentiate and their incoming gradients."""
        outputs = batch.outputs.pop(key)
        if self.routes[key[0]].last:
            return [outputs * (self.loss_scale() / batch.mode.micro_batches)], []
        grads = batch.output_grads.pop(key)
        floats = [t for t in as_tuple(outputs) if t.is_floating_point()]
        roots, root_grads = [], []
        for out, grad in zip(floats, grads, strict=True):
            if out.requires_grad:
                roots.append(out)
                root_grads.append(grad)
        return roots, root_grads

    def _grad_inputs(self, key: Key, batch: BatchState) -> list[torch.Tensor]:
        """The floating-point inputs received from the previous stage (which want grads)."""
        if self.routes[key[0]].first:
            return []
        return [t for t in batch.inputs[key] if t.is_floating_point()]

    def _keep_input_grads(self, key: Key, batch: BatchState) -> None:
        """The gradients StageInput collected (zeros for inputs the loss does not use)."""
        inputs = self._grad_inputs(key, batch)
        caught = batch.input_grads.get(key) or []
        batch.input_grads[key] = (
            list(caught) if len(caught) == len(inputs) else [torch.zeros_like(t) for t in inputs]
        )
        batch.inputs.pop(key, None)

    def backward(self, instr: BufferOpInstruction, batch: BatchState) -> None:
        """The whole backward of one micro-batch: input and weight gradients."""
        key = _key(instr)
        roots, root_grads = self._roots(key, batch)
        if roots:
            torch.autograd.backward(roots, root_grads or None)
        batch.input_edges.pop(key, None)
        self._keep_input_grads(key, batch)

    def backward_input(self, instr: BufferOpInstruction, batch: BatchState) -> None:
        """The input gradients of one micro-batch; its parameters' wait for ``W``."""
        key = _key(instr)
        roots, root_grads = self._roots(key, batch)
        edges = batch.input_edges.pop(key, [])
        grads: list[torch.Tensor | None] = [None] * len(edges)
        if roots:
            with self.weight_store.capturing(key):
                grads, batch.weight_passes[key] = input_pass(
                    roots, root_grads, edges, self._param_ids, self._self_handled
                )
        inputs = self._grad_inputs(key, batch)
        batch.input_grads[key] = [
            g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs, strict=True)
        ]
        batch.inputs.pop(key, None)

    def backward_weight(self, instr: BufferOpInstruction, batch: BatchState) -> None:
        """The parameter gradients one micro-batch's ``I`` left."""
        key = _key(instr)
        self.weight_store.flush(key)
        pending = batch.weight_passes.pop(key, None)
        if pending is not None:
            pending.run()
