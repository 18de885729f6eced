"""PipelineEngine: the one interpreter of schedule instructions.

``train_batch`` asks the configured schedule for this stage's steps and hands
each instruction to a dispatch table (instruction class -> one method). The
schedule alone decides the order of work; the engine never special-cases one.

State lives per ``(chunk_id, buffer_id)`` key, as DeepSpeed keeps it per
buffer: the stage's inputs, its outputs (or, on the last virtual stage, the
micro-batch's loss), the gradients received for them and the gradients of the
inputs to send upstream.

Gradients: each micro-batch's loss is divided by the number of micro-batches
before its backward; data-parallel gradients are averaged (``ReduceGrads``);
tied weights' gradients are summed over the stages that share them
(``ReduceTiedGrads``); ``gradient_clipping`` clips the global norm over every
stage, tied weights counted once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagewise.comm import P2PChannels
from stagewise.config import Config
from stagewise.dist_utils import default_device, wait_bounded
from stagewise.errors import ConfigError, PipelineError
from stagewise.lr_schedules import build_lr_scheduler
from stagewise.module import PipelineModule
from stagewise.partition import PartitionMethod
from stagewise.schedule import (
    BackwardInputPass,
    BackwardPass,
    BackwardWeightPass,
    BufferOpInstruction,
    ForwardPass,
    InferenceSchedule,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)
from stagewise.schedule.chunked_inference import ChunkedInferenceSchedule
from stagewise.schedule.registry import schedule_factory
from stagewise.schedule.render import TimelineEvent, render_timeline, write_chrome_trace
from stagewise.split_backward import WeightGradStore, route_linear_weight_grads

__all__ = ["PipelineEngine"]

logger = logging.getLogger(__name__)

Key = tuple[int, int]  # (chunk_id, buffer_id)


@dataclass
class _Buffers:
    """Everything held for micro-batches in flight, keyed by (chunk, buffer)."""

    inputs: dict[Key, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    labels: dict[Key, Any] = field(default_factory=dict)
    outputs: dict[Key, Any] = field(default_factory=dict)
    output_grads: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    input_grads: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    batches: dict[int, Any] = field(default_factory=dict)


@dataclass
class _ReceivePlan:
    """The receives of one batch per channel, in schedule order, to post them early.

    gloo moves a message only once its receive is posted, so a receive posted when
    its instruction runs costs a round trip to the sender's (busy) process. The plan
    lets the engine post each channel's next receive as soon as it is known: an
    activation receive right after the previous one on its channel, a gradient receive
    once the forward whose output it belongs to has run.
    """

    activations: dict[tuple[int, int], int] = field(default_factory=dict)
    grads: dict[tuple[int, int], deque[Key]] = field(default_factory=dict)
    grad_posted: dict[tuple[int, int], Key] = field(default_factory=dict)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return tuple(_to_device(v, device) for v in value)
    return value


def _optimizer_from_config(name: str, params: dict[str, Any], model_params: Any) -> Any:
    """A ``torch.optim`` optimizer by (DeepSpeed) name, e.g. ``Adam``, ``AdamW``, ``SGD``."""
    kwargs = dict(params)
    lowered = name.lower()
    if lowered == "adam":
        # DeepSpeed's "Adam" decouples weight decay (AdamW) unless adam_w_mode is false.
        adam_w_mode = kwargs.pop("adam_w_mode", True)
        kwargs.pop("torch_adam", None)
        cls: Any = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    elif lowered == "adamw":
        kwargs.pop("adam_w_mode", None)
        kwargs.pop("torch_adam", None)
        cls = torch.optim.AdamW
    else:
        by_lower = {
            n.lower(): getattr(torch.optim, n)
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        }
        cls = by_lower.get(lowered)
        if cls is None:
            raise ConfigError(
                f"unknown optimizer.type {name!r}; use one of torch.optim's optimizers "
                f"({', '.join(sorted(c.__name__ for c in by_lower.values()))})"
            )
    try:
        return cls(model_params, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer {name!r} rejected its params {params}: {exc}") from None


class _LossScaler:
    """Dynamic loss scaling for fp16 (DeepSpeed's defaults)."""

    def __init__(self, cfg: Any) -> None:
        self.dynamic = cfg.loss_scale == 0
        self.scale = float(2**cfg.initial_scale_power) if self.dynamic else float(cfg.loss_scale)
        self.window = cfg.loss_scale_window
        self.min_scale = cfg.min_loss_scale
        self.hysteresis = cfg.hysteresis
        self._hysteresis_left = cfg.hysteresis
        self._good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The dynamic part of the scaler (its settings come from the config)."""
        return {
            "scale": self.scale,
            "good_steps": self._good_steps,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self._good_steps = 0
            if self._hysteresis_left <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self._hysteresis_left -= 1
            return
        self._good_steps += 1
        if self._good_steps % self.window == 0:
            self.scale *= 2
            self._hysteresis_left = self.hysteresis


class PipelineEngine:
    """Trains a :class:`PipelineModule` with a pipeline schedule.

    Build it with :func:`stagewise.initialize`. Use :meth:`train_batch` and
    :meth:`eval_batch`; ``forward``/``backward``/``step`` are not available on a
    pipeline (as in DeepSpeed).
    """

    def __init__(
        self,
        module: PipelineModule,
        config: Config,
        optimizer: Any = None,
        model_parameters: Any = None,
        lr_scheduler: Any = None,
        training_data: Any = None,
        collate_fn: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(module, PipelineModule):
            raise TypeError(
                f"the pipeline engine needs a stagewise.PipelineModule, got {type(module).__name__}"
            )
        self.module = module
        self.config = config
        self.grid = module.mpu()
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.stage_id = self.grid.get_stage_id()
        self.num_stages = self.grid.get_pipe_parallel_world_size()
        self.dp_world_size = self.grid.get_data_parallel_world_size()
        self.device = default_device()
        self.train_batch_size_, self.micro_batch_size, self.micro_batches = config.resolve_batch(
            self.dp_world_size
        )
        self.global_steps = 0
        self.global_samples = 0
        self.batch_fn: Callable[[Any], Any] | None = None
        self.data_iterator: Iterator[Any] | None = None
        self.training_dataloader: Any = None
        self.agg_train_loss: torch.Tensor | None = None
        self.micro_batch_losses: list[torch.Tensor] = []
        self.timeline: list[TimelineEvent] = []
        self.record_timeline = config.pipeline.record_timeline

        self._apply_pipeline_config()
        try:
            self.schedule_cls = schedule_factory(
                config.pipeline.schedule, config.pipeline.virtual_stages
            )
        except ValueError as exc:
            raise ConfigError(f"pipeline.schedule / pipeline.virtual_stages: {exc}") from None
        self._check_chunks()

        if optimizer is None and config.optimizer is not None:
            params = model_parameters if model_parameters is not None else module.parameters()
            optimizer = _optimizer_from_config(
                config.optimizer.type, config.optimizer.params, params
            )
        self.optimizer = optimizer
        if lr_scheduler is None and config.scheduler is not None:
            if optimizer is None:
                raise ConfigError("a scheduler is configured but there is no optimizer")
            lr_scheduler = build_lr_scheduler(
                config.scheduler.type, optimizer, config.scheduler.params
            )
        elif (
            lr_scheduler is not None
            and not hasattr(lr_scheduler, "step")
            and callable(lr_scheduler)
        ):
            lr_scheduler = lr_scheduler(optimizer)
        self.lr_scheduler = lr_scheduler

        self.bf16 = config.bf16_enabled
        self.fp16 = config.fp16.enabled
        self.loss_scaler = _LossScaler(config.fp16) if self.fp16 else None
        self.skipped_steps = 0

        self.p2p = P2PChannels(
            self.global_rank, self.device, config.pipeline.timeout_s, describe=self._describe_rank
        )
        self._buffers = _Buffers()
        self._plan = _ReceivePlan()
        self._handlers: dict[type[PipeInstruction], Callable[[Any], None]] = {
            LoadMicroBatch: self._exec_load_micro_batch,
            ForwardPass: self._exec_forward_pass,
            BackwardPass: self._exec_backward_pass,
            BackwardInputPass: self._exec_backward_input_pass,
            BackwardWeightPass: self._exec_backward_weight_pass,
            SendActivation: self._exec_send_activations,
            RecvActivation: self._exec_recv_activations,
            SendGrad: self._exec_send_grads,
            RecvGrad: self._exec_recv_grads,
            ReduceTiedGrads: self._exec_reduce_tied_grads,
            ReduceGrads: self._exec_reduce_grads,
            OptimizerStep: self._exec_optimizer_step,
        }
        # Linear layers accumulate weight gradients in one GEMM, and schedules that split the
        # backward defer them to W (fp32 only: under autocast torch's own backward runs,
        # whole, inside I, and W has nothing to do).
        self._weight_store = WeightGradStore()
        self._weight_store.enabled = not (self.bf16 or self.fp16)
        route_linear_weight_grads(module, self._weight_store)
        self._linear_weights = [
            m.weight for m in module.modules() if type(m) is nn.Linear and m.weight.requires_grad
        ]
        self._training = True
        self._compute_loss = True
        self._return_logits = False
        self._logits: list[Any] = []
        self._batch_start = 0.0

        if training_data is not None:
            self.training_dataloader = self.deepspeed_io(training_data, collate_fn=collate_fn)
        self._log_timer = time.perf_counter()

    # -- set-up helpers -------------------------------------------------------------
    def _apply_pipeline_config(self) -> None:
        cfg = self.config.pipeline
        if cfg.activation_checkpoint_interval is not None:
            self.module.set_checkpoint_interval(cfg.activation_checkpoint_interval)
        if cfg.partition_method is not None:
            try:
                wanted = PartitionMethod.parse(cfg.partition_method)
            except ValueError as exc:
                raise ConfigError(f"pipeline.partition_method: {exc}") from None
            if wanted != self.module.partition_method:
                raise ConfigError(
                    f"pipeline.partition_method={cfg.partition_method!r} but the PipelineModule "
                    f"was partitioned with {str(self.module.partition_method)!r}; layers are cut "
                    "before the engine, so pass partition_method to PipelineModule (or drop the "
                    "key)"
                )
        if cfg.seed_layers is not None and cfg.seed_layers != self.module.seed_layers:
            raise ConfigError(
                f"pipeline.seed_layers={cfg.seed_layers} but the PipelineModule was built with "
                f"seed_layers={self.module.seed_layers}; layers are built before the engine, so "
                "pass seed_layers to PipelineModule (or drop the key)"
            )

    def _check_chunks(self) -> None:
        probe = self.schedule_cls(self.micro_batches, self.num_stages, self.stage_id)
        if probe.num_chunks != self.module.num_chunks:
            placement = "'v'" if probe.num_chunks == 2 and self._is_v(probe) else "'loop'"
            raise ConfigError(
                f"pipeline.schedule={self.config.pipeline.schedule!r} runs {probe.num_chunks} "
                f"model chunks per stage but the PipelineModule holds {self.module.num_chunks}; "
                f"build it with PipelineModule(..., virtual_stages={probe.num_chunks}, "
                f"placement={placement})"
            )
        for chunk in range(probe.num_chunks):
            if probe.virtual_stage(self.stage_id, chunk) != self.module.virtual_stage(
                self.stage_id, chunk
            ):
                raise ConfigError(
                    f"pipeline.schedule={self.config.pipeline.schedule!r} places chunk {chunk} "
                    f"of stage {self.stage_id} at virtual stage "
                    f"{probe.virtual_stage(self.stage_id, chunk)} but the PipelineModule placed "
                    f"it at {self.module.virtual_stage(self.stage_id, chunk)}; build the module "
                    f"with placement={'v' if self._is_v(probe) else 'loop'!r}"
                )
        self._probe = probe

    @staticmethod
    def _is_v(schedule: PipeSchedule) -> bool:
        return schedule.num_chunks == 2 and schedule.virtual_stage(0, 1) == 2 * schedule.stages - 1

    def _describe_rank(self, rank: int) -> str:
        coord = self.grid.topology().get_coord(rank)
        stage = getattr(coord, "pipe", 0)
        return f"stage {stage} (rank {rank})"

    # -- DeepSpeed's accessors ------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def train_batch_size(self) -> int:
        return self.train_batch_size_

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups] if self.optimizer else []

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def set_dataiterator(self, iterator: Iterator[Any] | None) -> None:
        """Use ``iterator`` for the micro-batches of later batches."""
        self.training_dataloader = None
        self.data_iterator = iterator

    def set_dataloader(self, loader: Any) -> None:
        self.training_dataloader = loader
        self.data_iterator = iter(loader)

    def set_batch_fn(self, fn: Callable[[Any], Any]) -> None:
        """Post-process every micro-batch with ``fn`` after it is read."""
        self.batch_fn = fn

    def reset_activation_shape(self) -> None:
        """Kept for DeepSpeed scripts: shapes are re-learned automatically when they change."""

    def deepspeed_io(self, dataset: Any, collate_fn: Callable[..., Any] | None = None) -> Any:
        """A DataLoader over ``dataset`` for this data-parallel rank."""
        from stagewise.runtime import RepeatingLoader

        sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(
            dataset,
            num_replicas=self.dp_world_size,
            rank=self.grid.get_data_parallel_rank(),
            shuffle=False,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            drop_last=True,
        )
        self.data_iterator = iter(RepeatingLoader(loader))
        return loader

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError(
            "forward() is not available on a pipeline engine: use engine.train_batch(data_iter) "
            "to train or engine.eval_batch(data_iter) to evaluate"
        )

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError(
            "backward() is not available on a pipeline engine: engine.train_batch(data_iter) "
            "runs forward, backward and the optimizer step"
        )

    def step(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError(
            "step() is not available on a pipeline engine: engine.train_batch(data_iter) "
            "steps the optimizer at the end of each batch"
        )

    __call__ = forward

    # -- the two entry points -------------------------------------------------------
    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """Train on one batch: ``gradient_accumulation_steps`` micro-batches per pipeline.

        Returns:
            The mean loss of the batch's micro-batches, averaged over data-parallel
            ranks, on every rank.
        """
        if not torch.is_grad_enabled():
            raise PipelineError("train_batch() needs gradients enabled; use eval_batch()")
        if self.optimizer is None:
            raise PipelineError(
                "train_batch() needs an optimizer: pass optimizer= to stagewise.initialize "
                'or set "optimizer" in the config'
            )
        if data_iter is not None:
            self.data_iterator = data_iter
        self.module.train()
        self._training = True
        self._compute_loss = True
        schedule = self.schedule_cls(self.micro_batches, self.num_stages, self.stage_id)
        self._run(schedule)
        self.agg_train_loss = self._aggregate_loss(reduce_dp=True)
        self.global_samples += self.train_batch_size_
        self._log_progress()
        return self.agg_train_loss

    def eval_batch(
        self,
        data_iter: Iterator[Any],
        return_logits: bool = False,
        compute_loss: bool = True,
        reduce_output: str | None = "avg",
        bcast_loss: bool = True,
        num_micro_batches: int | None = None,
    ) -> Any:
        """Evaluate one batch without gradients.

        Args:
            data_iter: yields ``(inputs, labels)`` micro-batches.
            return_logits: also return the last stage's output of every micro-batch
                (a list, one per micro-batch; None on other stages).
            compute_loss: apply ``loss_fn``; when False the "loss" is the model's output.
            reduce_output: ``'avg'`` averages over micro-batches and data-parallel
                ranks; None returns the list of per-micro-batch outputs.
            bcast_loss: share the result with every stage (else only the last has it).
            num_micro_batches: micro-batches to evaluate (default: as in training).
        """
        if reduce_output is not None and reduce_output.lower() != "avg":
            raise ValueError(f"reduce_output must be 'avg' or None, got {reduce_output!r}")
        micro_batches = self.micro_batches if num_micro_batches is None else num_micro_batches
        if micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {micro_batches}")
        saved_iter = self.data_iterator
        self.data_iterator = data_iter
        self.module.eval()
        self._training = False
        self._compute_loss = compute_loss
        self._return_logits = return_logits
        self._logits = []
        if self.module.num_chunks == 1:
            schedule: PipeSchedule = InferenceSchedule(
                micro_batches, self.num_stages, self.stage_id
            )
        else:
            schedule = self._chunked_inference_schedule(micro_batches)
        try:
            with torch.no_grad():
                self._run(schedule)
            outputs = self.micro_batch_losses
            result: Any
            if self._holds_loss():
                if reduce_output is None:
                    result = list(outputs)
                else:
                    result = self._reduce_outputs(outputs, micro_batches)
            else:
                result = None
            if bcast_loss and reduce_output is not None:
                result = self._broadcast_from_loss_stage(result)
        finally:
            self.data_iterator = saved_iter
            self._training = True
            self.module.train()
        logits = self._logits if self._holds_loss() else None
        self._logits = []
        self._return_logits = False
        if return_logits:
            return result, logits
        return result

    def _chunked_inference_schedule(self, micro_batches: int) -> PipeSchedule:
        return ChunkedInferenceSchedule(micro_batches, self.num_stages, self.stage_id, self._probe)

    # -- the interpreter ------------------------------------------------------------
    def _run(self, schedule: PipeSchedule) -> None:
        self._buffers = _Buffers()
        self._weight_store.clear()
        self.micro_batch_losses = []
        self._loss_for_backward: dict[Key, torch.Tensor] = {}
        self._batch_start = time.perf_counter()
        recording = self.record_timeline and self._training  # the last training batch's
        if recording:
            self.timeline = []
        steps = list(schedule.steps())
        self._plan = self._plan_receives(steps)
        for channel in self._plan.activations:
            self.p2p.post_recv_tensors(*channel)
        handlers = self._handlers
        for step in steps:
            for instruction in step:
                handler = handlers.get(type(instruction))
                if handler is None:
                    handler = self._find_handler(instruction)
                if recording:
                    start = time.perf_counter() - self._batch_start
                    handler(instruction)
                    end = time.perf_counter() - self._batch_start
                    self.timeline.append(
                        TimelineEvent(self.stage_id, repr(instruction), start, end)
                    )
                else:
                    handler(instruction)
        self.p2p.flush()

    def _find_handler(self, instruction: PipeInstruction) -> Callable[[Any], None]:
        for cls in type(instruction).__mro__:
            if cls in self._handlers:
                self._handlers[type(instruction)] = self._handlers[cls]
                return self._handlers[cls]
        raise PipelineError(
            f"no handler for instruction {instruction!r} ({type(instruction).__name__}); "
            f"the engine executes {sorted(c.__name__ for c in self._handlers)}"
        )

    def _plan_receives(self, steps: list[list[PipeInstruction]]) -> _ReceivePlan:
        plan = _ReceivePlan()
        for step in steps:
            for instr in step:
                if isinstance(instr, RecvActivation):
                    channel = self._activation_channel(instr.chunk_id)
                    plan.activations[channel] = plan.activations.get(channel, 0) + 1
                elif isinstance(instr, RecvGrad):
                    channel = self._grad_channel(instr.chunk_id)
                    plan.grads.setdefault(channel, deque()).append(
                        (instr.chunk_id, instr.buffer_id)
                    )
        return plan

    def _activation_channel(self, chunk: int) -> tuple[int, int]:
        """``(source rank, tag)`` of the activations this chunk receives."""
        virtual = self._virtual(chunk)
        return self._rank_of_virtual(virtual - 1), 2 * (virtual - 1)

    def _grad_channel(self, chunk: int) -> tuple[int, int]:
        """``(source rank, tag)`` of the gradients this chunk receives."""
        virtual = self._virtual(chunk)
        return self._rank_of_virtual(virtual + 1), 2 * virtual + 1

    def _post_next_grad(self, channel: tuple[int, int]) -> None:
        """Post the channel's next planned gradient receive once its output exists."""
        plan = self._plan
        queue = plan.grads.get(channel)
        if not queue or channel in plan.grad_posted:
            return
        key = queue[0]
        outputs = self._buffers.outputs.get(key)
        if outputs is None:
            return
        like = [t for t in _as_tuple(outputs) if t.is_floating_point()]
        self.p2p.post_recv_grads(like, *channel)
        plan.grad_posted[channel] = key

    # -- neighbours -------------------------------------------------------------------
    def _virtual(self, chunk: int) -> int:
        return self.module.virtual_stage(self.stage_id, chunk)

    def _rank_of_virtual(self, virtual: int) -> int:
        stage, _chunk = self._probe.locate(virtual)
        return self.grid.stage_to_global(stage)

    def _is_first_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == 0

    def _is_last_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == self.num_stages * self.module.num_chunks - 1

    def _holds_loss(self) -> bool:
        return any(self._is_last_virtual(c) for c in range(self.module.num_chunks))

    def _loss_stage_rank(self) -> int:
        stage, _ = self._probe.locate(self.num_stages * self.module.num_chunks - 1)
        return self.grid.stage_to_global(stage)

    # -- instruction handlers ---------------------------------------------------------
    def _next_batch(self) -> Any:
        if self.data_iterator is None:
            raise PipelineError(
                "no data: pass an iterator to train_batch(data_iter) / eval_batch(data_iter), "
                "or training_data= to stagewise.initialize"
            )
        batch = next(self.data_iterator)
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise PipelineError(
                f"a micro-batch must be a pair (inputs, labels), got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return batch

    def _exec_load_micro_batch(self, instr: BufferOpInstruction) -> None:
        chunk, key = instr.chunk_id, (instr.chunk_id, instr.buffer_id)
        first, last = self._is_first_virtual(chunk), self._is_last_virtual(chunk)
        # A stage holding both ends in different chunks (a V) reads each micro-batch once.
        other_end_here = any(
            self._is_first_virtual(c) for c in range(self.module.num_chunks) if c != chunk
        )
        if last and not first and other_end_here and instr.micro_batch_id in self._buffers.batches:
            batch = self._buffers.batches.pop(instr.micro_batch_id)
        else:
            batch = self._next_batch()
            if first and not last and self._holds_loss():
                self._buffers.batches[instr.micro_batch_id] = batch
        if first:
            inputs = _as_tuple(batch[0])
            self._buffers.inputs[key] = tuple(
                t.detach().to(self.device) if isinstance(t, torch.Tensor) else t for t in inputs
            )
        if last:
            self._buffers.labels[key] = _to_device(batch[1], self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.fp16 and self.config.fp16.auto_cast:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def _exec_forward_pass(self, instr: BufferOpInstruction) -> None:
        chunk, key = instr.chunk_id, (instr.chunk_id, instr.buffer_id)
        if key not in self._buffers.inputs:
            raise PipelineError(
                f"stage {self.stage_id}: {instr!r} has no input (no LoadMicroBatch or "
                "RecvActivation before it); the schedule is wrong"
            )
        inputs = self._buffers.inputs[key]
        x: Any = inputs[0] if len(inputs) == 1 else inputs
        with self._autocast():
            outputs = self.module(x, chunk_id=chunk)
            if self._is_last_virtual(chunk):
                if self._compute_loss and self.module.loss_fn is not None:
                    labels = self._buffers.labels.pop(key, None)
                    loss = self.module.loss_fn(outputs, labels)
                else:
                    loss = outputs
        if self._is_last_virtual(chunk):
            if self._return_logits:
                self._logits.append(outputs if not self._training else None)
            if isinstance(loss, torch.Tensor):
                self.micro_batch_losses.append(loss.detach())
            else:
                self.micro_batch_losses.append(loss)
            if self._training:
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise PipelineError(
                        "the loss of a micro-batch must be a scalar tensor to train; loss_fn "
                        f"returned {type(loss).__name__}"
                        + (
                            f" of shape {tuple(loss.shape)}"
                            if isinstance(loss, torch.Tensor)
                            else ""
                        )
                    )
                self._buffers.outputs[key] = loss
        else:
            self._buffers.outputs[key] = outputs
        if not self._training:
            del self._buffers.inputs[key]

    def _backward_roots(self, key: Key) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors to differentiate and their incoming gradients."""
        chunk = key[0]
        outputs = self._buffers.outputs.pop(key)
        if self._is_last_virtual(chunk):
            scale = 1.0 / self.micro_batches
            if self.loss_scaler is not None:
                scale *= self.loss_scaler.scale
            return [outputs * scale], []
        grads = self._buffers.output_grads.pop(key)
        floats = [t for t in _as_tuple(outputs) if t.is_floating_point()]
        roots, root_grads = [], []
        for out, grad in zip(floats, grads, strict=True):
            if out.requires_grad:
                roots.append(out)
                root_grads.append(grad)
        return roots, root_grads

    def _grad_inputs(self, key: Key) -> list[torch.Tensor]:
        """The floating-point inputs received from the previous stage (which want grads)."""
        if self._is_first_virtual(key[0]):
            return []
        return [t for t in self._buffers.inputs[key] if t.is_floating_point()]

    def _store_input_grads(self, key: Key, grads: list[torch.Tensor | None]) -> None:
        inputs = self._grad_inputs(key)
        self._buffers.input_grads[key] = [
            g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs, strict=True)
        ]
        self._buffers.inputs.pop(key, None)

    def _exec_backward_pass(self, instr: BufferOpInstruction) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        roots, root_grads = self._backward_roots(key)
        inputs = self._grad_inputs(key)
        if roots:
            torch.autograd.backward(roots, root_grads or None)
        self._store_input_grads(key, [t.grad for t in inputs])

    def _exec_backward_input_pass(self, instr: BufferOpInstruction) -> None:
        """The backward with linear layers' weight gradients deferred to ``W``."""
        key = (instr.chunk_id, instr.buffer_id)
        roots, root_grads = self._backward_roots(key)
        inputs = self._grad_inputs(key)
        if roots:
            with self._weight_store.capturing(key):
                torch.autograd.backward(roots, root_grads or None)
        self._store_input_grads(key, [t.grad for t in inputs])

    def _exec_backward_weight_pass(self, instr: BufferOpInstruction) -> None:
        """The deferred weight gradients of one micro-batch's ``I``."""
        self._weight_store.flush((instr.chunk_id, instr.buffer_id))

    def _exec_send_activations(self, instr: BufferOpInstruction) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        virtual = self._virtual(instr.chunk_id)
        outputs = _as_tuple(self._buffers.outputs[key])
        self.p2p.send_tensors(outputs, self._rank_of_virtual(virtual + 1), tag=2 * virtual)
        if self._training:
            self._post_next_grad(self._grad_channel(instr.chunk_id))

    def _exec_recv_activations(self, instr: BufferOpInstruction) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        channel = self._activation_channel(instr.chunk_id)
        tensors = self.p2p.recv_tensors(*channel)
        remaining = self._plan.activations.get(channel, 1) - 1
        self._plan.activations[channel] = remaining
        if remaining > 0:
            self.p2p.post_recv_tensors(*channel)
        if self._training:
            tensors = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
        self._buffers.inputs[key] = tuple(tensors)

    def _exec_send_grads(self, instr: BufferOpInstruction) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        virtual = self._virtual(instr.chunk_id)
        grads = self._buffers.input_grads.pop(key)
        self.p2p.send_grads(grads, self._rank_of_virtual(virtual - 1), tag=2 * (virtual - 1) + 1)

    def _exec_recv_grads(self, instr: BufferOpInstruction) -> None:
        key = (instr.chunk_id, instr.buffer_id)
        channel = self._grad_channel(instr.chunk_id)
        like = [t for t in _as_tuple(self._buffers.outputs[key]) if t.is_floating_point()]
        posted = self._plan.grad_posted.pop(channel, None)
        if posted is not None and posted != key:
            raise PipelineError(
                f"stage {self.stage_id}: {instr!r} found the receive posted for buffer {posted}; "
                "gradients must be received in the order the schedule lists them"
            )
        self._buffers.output_grads[key] = self.p2p.recv_grads(like, *channel)
        queue = self._plan.grads.get(channel)
        if queue:
            queue.popleft()
        self._post_next_grad(channel)

    # -- collectives, each bounded by the timeout ------------------------------------------
    def _wait(self, work: Any, what: str) -> None:
        who = f"stage {self.stage_id} (rank {self.global_rank})"
        wait_bounded(work, self.config.pipeline.timeout_s, who, what, "a peer may have died")

    def _all_reduce(self, tensor: torch.Tensor, group: Any, what: str, op: Any = None) -> None:
        work = dist.all_reduce(
            tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group, async_op=True
        )
        self._wait(work, what)

    def _exec_reduce_tied_grads(self, instr: PipeInstruction) -> None:
        for weight, group, _ranks in self.module.tied_weights():
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            self._all_reduce(weight.grad, group, "summing tied-weight gradients")

    def _exec_reduce_grads(self, instr: PipeInstruction) -> None:
        if self.dp_world_size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        group = self.grid.get_data_parallel_group()
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._all_reduce(flat, group, "averaging data-parallel gradients")
            flat /= self.dp_world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _local_grads(self) -> list[torch.Tensor]:
        """This rank's gradients, tied copies past the first stage excluded (counted once)."""
        return [
            p.grad
            for p in self.module.parameters()
            if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
        ]

    def _exec_optimizer_step(self, instr: PipeInstruction) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.loss_scaler is not None:
            overflow = torch.tensor(
                [0.0 if all(bool(torch.isfinite(g).all()) for g in grads) else 1.0],
                device=self.device,
            )
            self._all_reduce(overflow, None, "checking fp16 overflow", op=dist.ReduceOp.MAX)
            self.loss_scaler.update(bool(overflow.item()))
            if overflow.item():
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                logger.info(
                    "fp16 overflow: step skipped, loss scale now %g", self.loss_scaler.scale
                )
                return
            for grad in grads:
                grad.div_(self.loss_scaler.scale)
        if self.config.gradient_clipping > 0:
            self._clip_global_norm(self.config.gradient_clipping)
        self.optimizer.step()
        if self._weight_store.enabled:
            self._weight_store.keep_buffers(self._linear_weights)
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1

    def global_grad_norm(self) -> float:
        """The L2 norm of the gradients of the whole model (every stage, tied weights once)."""
        local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for grad in self._local_grads():
            local += grad.detach().double().pow(2).sum()
        if self.num_stages > 1 or self.grid.get_slice_parallel_world_size() > 1:
            self._all_reduce(local, self.grid.get_model_parallel_group(), "summing gradient norms")
        return float(local.sqrt().item())

    def _clip_global_norm(self, max_norm: float) -> None:
        total = self.global_grad_norm()
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)

    # -- losses ---------------------------------------------------------------------
    def _aggregate_loss(self, reduce_dp: bool) -> torch.Tensor:
        value = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self._holds_loss():
            total = torch.stack([loss.float().reshape(()) for loss in self.micro_batch_losses])
            value[0] = total.mean()
            if reduce_dp and self.dp_world_size > 1:
                self._all_reduce(value, self.grid.get_data_parallel_group(), "averaging the loss")
                value /= self.dp_world_size
        if self.num_stages > 1:
            work = dist.broadcast(
                value,
                src=self._loss_stage_rank(),
                group=self.grid.get_pipe_parallel_group(),
                async_op=True,
            )
            self._wait(work, "sharing the loss from the last stage")
        return value[0].clone()

    def _reduce_outputs(self, outputs: list[Any], micro_batches: int) -> Any:
        if isinstance(outputs[0], torch.Tensor):
            reduced: Any = sum(o.float() for o in outputs) / micro_batches
            if self.dp_world_size > 1:
                reduced = reduced.clone()
                self._all_reduce(reduced, self.grid.get_data_parallel_group(), "averaging outputs")
                reduced /= self.dp_world_size
            return reduced
        parts = [sum(o[i].float() for o in outputs) / micro_batches for i in range(len(outputs[0]))]
        if self.dp_world_size > 1:
            for part in parts:
                self._all_reduce(part, self.grid.get_data_parallel_group(), "averaging outputs")
                part /= self.dp_world_size
        return parts

    def _broadcast_from_loss_stage(self, result: Any) -> Any:
        """Share the loss stage's tensor (or list of tensors) with the whole pipeline."""
        if self.num_stages == 1:
            return result
        src = self._loss_stage_rank()
        mine = self.global_rank == src
        if mine and isinstance(result, list):
            count = torch.tensor([len(result)], dtype=torch.int64, device=self.device)
        else:
            count = torch.tensor([-1], dtype=torch.int64, device=self.device)
        self._broadcast(count, src, "sharing the evaluation result")
        if int(count.item()) < 0:
            return self._broadcast_tensor(result if mine else None, src)
        return [
            self._broadcast_tensor(result[i] if mine else None, src)
            for i in range(int(count.item()))
        ]

    def _broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        group = self.grid.get_pipe_parallel_group()
        self._wait(dist.broadcast(tensor, src=src, group=group, async_op=True), what)

    def _broadcast_tensor(self, value: torch.Tensor | None, src: int) -> torch.Tensor:
        header = torch.zeros(9, dtype=torch.int64, device=self.device)
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32, device=self.device).contiguous()
            if value.dim() > 8:
                raise PipelineError(f"cannot share an evaluation output of {value.dim()} dims")
            header[0] = value.dim()
            header[1 : 1 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
        self._broadcast(header, src, "sharing the evaluation result's shape")
        shape = tuple(int(v) for v in header[1 : 1 + int(header[0])].tolist())
        if value is None:
            value = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._broadcast(value, src, "sharing the evaluation result")
        return value

    def _log_progress(self) -> None:
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0 and self.global_rank == 0:
            now = time.perf_counter()
            elapsed = (now - self._log_timer) / every
            self._log_timer = now
            logger.info(
                "steps: %d loss: %.4f iter time (s): %.3f samples/sec: %.1f",
                self.global_steps,
                float(self.agg_train_loss) if self.agg_train_loss is not None else float("nan"),
                elapsed,
                self.train_batch_size_ / elapsed if elapsed > 0 else float("nan"),
            )

    # -- timelines ----------------------------------------------------------------------
    def gather_timeline(self) -> list[TimelineEvent] | None:
        """Every stage's recorded events of the last training batch, on the first stage.

        Needs ``pipeline.record_timeline``; every stage of the pipeline must call it.
        Returns None on the other stages.
        """
        if not self.record_timeline:
            raise PipelineError(
                'no timeline was recorded: set "pipeline": {"record_timeline": true} in the config'
            )
        if self.num_stages == 1:
            return list(self.timeline)
        group = self.grid.get_pipe_parallel_group()
        first = self.grid.stage_to_global(0)
        gathered: list[Any] | None = [None] * self.num_stages if self.stage_id == 0 else None
        dist.gather_object(self.timeline, gathered, dst=first, group=group)
        if gathered is None:
            return None
        return [event for events in gathered for event in events]

    def write_timeline(
        self,
        png: str | os.PathLike[str] | None = None,
        trace: str | os.PathLike[str] | None = None,
        title: str | None = None,
    ) -> list[TimelineEvent] | None:
        """Draw the last batch's real timeline (PNG) and/or write a Chrome trace (JSON).

        Every stage must call it; the first stage of each pipeline writes the files.
        """
        events = self.gather_timeline()
        if events is None:
            return None
        if png is not None:
            render_timeline(events, png, stages=self.num_stages, title=title)
        if trace is not None:
            write_chrome_trace(events, trace)
        return events

    # -- checkpoints (stagewise.checkpoint does the work) --------------------------------
    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
    ) -> bool:
        """Save weights (one file per layer), optimizer and engine state under ``save_dir/tag``.

        Every rank must call it. The checkpoint appears atomically: a crash mid-save
        leaves the previous one as ``latest``.
        """
        from stagewise.checkpoint import save_checkpoint

        return save_checkpoint(
            self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest
        )

    def load_checkpoint(
        self,
        load_dir: str | os.PathLike[str],
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Load a checkpoint saved with any number of stages; returns ``(path, client_state)``."""
        from stagewise.checkpoint import load_checkpoint

        return load_checkpoint(
            self,
            load_dir,
            tag=tag,
            load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only,
        )

    # -- state -------------------------------------------------------------------------
    def module_state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()
