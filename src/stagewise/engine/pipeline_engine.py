"""PipelineEngine: DeepSpeed's pipeline engine, as a short face over the engine's parts.

``train_batch`` asks the configured schedule for this stage's steps and hands
them to the :class:`~stagewise.engine.interpreter.Interpreter`, whose table
maps each instruction class to one handler of the parts built by
:func:`~stagewise.engine.parts.build_parts`. The schedule alone decides the
order of work; the engine never special-cases one.

Gradients: each micro-batch's loss is divided by the number of micro-batches
before its backward; data-parallel gradients are averaged (``ReduceGrads``);
tied weights' gradients are summed over the stages that share them
(``ReduceTiedGrads``); ``gradient_clipping`` clips the global norm over every
stage, tied weights counted once.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stagewise import checkpoint
from stagewise.config import Config
from stagewise.dist_utils import default_device
from stagewise.engine.checkpointing import checkpoint_view
from stagewise.engine.interpreter import Handler, Interpreter
from stagewise.engine.parts import build_parts, handler_table
from stagewise.engine.resilience import Resilience
from stagewise.engine.results import log_progress
from stagewise.engine.state import BatchState, RunMode, read_micro_batch
from stagewise.engine.subclass import (
    DeepSpeedHooks,
    install_overrides,
    use_swapped_train_schedule,
)
from stagewise.engine.timeline import gather_timeline, write_timeline
from stagewise.errors import PipelineError
from stagewise.loader import RepeatingLoader, data_parallel_loader
from stagewise.module import PipelineModule
from stagewise.schedule import InferenceSchedule, PipeInstruction, PipeSchedule, schedule_table
from stagewise.schedule.check import ScheduleFactory
from stagewise.schedule.chunked_inference import ChunkedInferenceSchedule
from stagewise.schedule.render import TimelineEvent

__all__ = ["PipelineEngine"]


class PipelineEngine(DeepSpeedHooks):
    """Trains a :class:`PipelineModule` with a pipeline schedule.

    Build it with :func:`stagewise.initialize`. Use :meth:`train_batch` and
    :meth:`eval_batch`; ``forward``/``backward``/``step`` are not available on a
    pipeline (as in DeepSpeed). :meth:`register_instruction` adds or wraps the
    handler of an instruction class; a subclass may also override DeepSpeed's
    ``_exec_*`` methods or extend ``_INSTRUCTION_MAP`` (:mod:`stagewise.engine.subclass`).
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
        self.module, self.config, self.grid = module, config, module.mpu()
        self.global_rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage_id = self.grid.get_stage_id()
        self.num_stages = self.grid.get_pipe_parallel_world_size()
        self.dp_world_size = self.grid.get_data_parallel_world_size()
        self.device = default_device()
        self.train_batch_size_, self.micro_batch_size, self.micro_batches = config.resolve_batch(
            self.dp_world_size
        )
        module.apply_pipeline_config(config.pipeline)
        self.parts = build_parts(
            module, config, self.grid, self.device, self.micro_batches, optimizer,
            model_parameters, lr_scheduler, self._describe_rank,
        )  # fmt: skip
        self.parts.reducer.broadcast_replicas()  # as DeepSpeed's initialize: replicas start equal
        self.optimizer, self.lr_scheduler = self.parts.optimizer, self.parts.lr_scheduler
        self.loss_scaler = self.parts.loss_scaler
        self._builtin_handlers = handler_table(self.parts)
        self.interpreter = Interpreter(self._builtin_handlers, self.stage_id, self.global_rank)
        install_overrides(self, self.interpreter)
        use_swapped_train_schedule(self.parts, self.config, self.module)
        self.batch_fn: Callable[[Any], Any] | None = None
        self.data_iterator: Iterator[Any] | None = None
        self.training_dataloader: Any = None
        self.agg_train_loss: torch.Tensor | None = None
        self.record_timeline = config.pipeline.record_timeline
        self.timeline: list[TimelineEvent] | None = [] if self.record_timeline else None
        if training_data is not None:
            self.training_dataloader = self.deepspeed_io(training_data, collate_fn=collate_fn)
        self._log_timer = time.perf_counter()
        self.resilience = Resilience(self)  # exit hooks, heartbeat, non-finite check, saver

    def _describe_rank(self, rank: int) -> str:
        return f"stage {getattr(self.grid.topology().get_coord(rank), 'pipe', 0)} (rank {rank})"

    # -- counters (restored by load_checkpoint) ---------------------------------------------
    @property
    def global_steps(self) -> int:
        """Batches trained: optimizer steps, taken or skipped (as DeepSpeed counts them)."""
        return self.parts.counters.global_steps

    @property
    def global_samples(self) -> int:
        return self.parts.counters.global_samples

    @property
    def skipped_steps(self) -> int:
        return self.parts.counters.skipped_steps

    # -- DeepSpeed's accessors ----------------------------------------------------------------
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

    def global_grad_norm(self) -> float:
        """The L2 norm of the whole model's gradients (every stage, tied weights once)."""
        return self.parts.reducer.global_norm()

    def set_dataiterator(self, iterator: Iterator[Any] | None) -> None:
        """Use ``iterator`` for the micro-batches of later batches."""
        self.training_dataloader, self.data_iterator = None, iterator

    def set_dataloader(self, loader: Any) -> None:
        self.training_dataloader, self.data_iterator = loader, iter(loader)

    def set_batch_fn(self, fn: Callable[[Any], Any]) -> None:
        """Post-process every micro-batch with ``fn`` after it is read."""
        self.batch_fn = fn

    def reset_activation_shape(self) -> None:
        """Kept for DeepSpeed scripts: shapes are re-learned automatically when they change."""

    def deepspeed_io(self, dataset: Any, collate_fn: Callable[..., Any] | None = None) -> Any:
        """A DataLoader over ``dataset`` for this data-parallel rank (and iterate it)."""
        loader = data_parallel_loader(
            dataset, self.micro_batch_size, self.dp_world_size,
            self.grid.get_data_parallel_rank(), collate_fn,
        )  # fmt: skip
        self.data_iterator = iter(RepeatingLoader(loader))
        return loader

    def module_state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def register_instruction(self, cls: type[PipeInstruction], handler: Handler) -> Handler | None:
        """Run ``handler(instruction, batch)`` for instructions of ``cls``; returns the one it
        replaces (so a caller can wrap a built-in). See :mod:`stagewise.engine.interpreter`."""
        return self.interpreter.register(cls, handler)

    def _unavailable(self, name: str, fix: str) -> PipelineError:
        return PipelineError(f"{name}() is not available on a pipeline engine: {fix}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unavailable(
            "forward", "use engine.train_batch(data_iter) to train or engine.eval_batch(data_iter)"
            " to evaluate",
        )  # fmt: skip

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unavailable(
            "backward",
            "engine.train_batch(data_iter) runs forward, backward and the optimizer step",
        )

    def step(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unavailable(
            "step", "engine.train_batch(data_iter) steps the optimizer at the end of each batch"
        )

    __call__ = forward

    # -- the two entry points ---------------------------------------------------------------
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
            self.data_iterator = self.resilience.adopt(data_iter)  # a resumed position
        self.module.train()
        mode = RunMode.train(self.micro_batches)
        schedule = self.parts.schedule_factory(self.micro_batches, self.num_stages, self.stage_id)
        batch = self._run(schedule, mode, self.data_iterator, self.parts.schedule_factory)
        self.agg_train_loss = self.parts.results.mean_loss(batch.losses, reduce_dp=True)
        self.parts.counters.global_samples += self.train_batch_size_
        self._log_timer = log_progress(
            self.config.steps_per_print, self.global_steps, self.global_rank, self.agg_train_loss,
            self.train_batch_size_, self._log_timer,
        )  # fmt: skip
        self.resilience.after_train_batch()  # checkpoint.every_steps
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
        mode = RunMode.evaluate(micro_batches, compute_loss, return_logits)
        factory: ScheduleFactory = InferenceSchedule
        if self.module.num_chunks > 1:
            factory = functools.partial(ChunkedInferenceSchedule, layout=self.parts.layout)
        self.module.eval()
        try:
            with torch.no_grad():
                schedule = factory(micro_batches, self.num_stages, self.stage_id)
                batch = self._run(schedule, mode, data_iter, factory)
        finally:
            self.module.train()
        return self.parts.results.evaluation(
            batch, micro_batches, reduce_output is not None, bcast_loss, return_logits
        )

    def _run(
        self,
        schedule: PipeSchedule,
        mode: RunMode,
        data: Iterator[Any] | None,
        factory: ScheduleFactory,
    ) -> BatchState:
        read = functools.partial(read_micro_batch, data, self.batch_fn)
        batch = BatchState(mode, read, step=self.global_steps + 1 if mode.training else None)
        steps = [list(step) for step in schedule.steps()]
        self.parts.weight_store.clear()
        self.parts.transfers.begin(steps, batch.outputs)
        record = self.record_timeline and mode.training  # the last training batch's
        events = self.interpreter.run(
            steps, batch, record=record, schedule=repr(schedule),
            table=lambda: schedule_table(factory, mode.micro_batches, self.num_stages),
        )  # fmt: skip
        self.parts.transfers.finish()
        if record:
            self.timeline = events
        return batch

    # -- timelines and checkpoints ------------------------------------------------------------
    def gather_timeline(self) -> list[TimelineEvent] | None:
        """Every stage's recorded events of the last training batch, on the first stage.

        Needs ``pipeline.record_timeline``; every stage must call it (None on the others).
        """
        return gather_timeline(self.timeline, self.grid)

    def write_timeline(
        self,
        png: str | os.PathLike[str] | None = None,
        trace: str | os.PathLike[str] | None = None,
        title: str | None = None,
    ) -> list[TimelineEvent] | None:
        """Draw the last batch's real timeline (PNG) and/or write a Chrome trace (JSON)."""
        return write_timeline(self.timeline, self.grid, png, trace, title)

    def checkpoint_view(self) -> checkpoint.CheckpointView:
        """What a checkpoint of this rank saves and loads (:mod:`stagewise.checkpoint`)."""
        return checkpoint_view(self.module, self.parts, self.device)

    def save_checkpoint(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
    ) -> bool:
        """Save weights (a file per layer), optimizer, engine state and the loader's position;
        every rank calls it. ``checkpoint.async``: returns once the state is copied."""
        return self.resilience.save(save_dir, tag, client_state or {}, save_latest)

    def wait_for_checkpoint(self) -> str | None:
        """Wait for an asynchronous save in flight (raising its error); the path committed."""
        return self.resilience.wait()

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
        return self.resilience.load(load_dir, tag, load_module_strict, load_optimizer_states,
                                    load_lr_scheduler_states, load_module_only)  # fmt: skip
