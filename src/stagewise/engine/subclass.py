"""DeepSpeed-style engine subclasses: ``_exec_*`` overrides and ``_INSTRUCTION_MAP`` entries.

The engine's own way to add or wrap an instruction's handler is
``engine.register_instruction(cls, handler)`` (``handler(instruction, batch)``;
it returns the handler it replaces). Projects written for DeepSpeed subclass
its ``PipelineEngine`` instead; :class:`DeepSpeedHooks` honours the two ways they
do it:

* overriding a built-in instruction's method (``_exec_forward_pass(self,
  buffer_id)`` and the other nine of :data:`EXEC_METHODS`); ``super().<method>``
  runs the built-in handler, so an override can wrap it. (DeepSpeed calls an
  override only when the subclass also puts it into ``_INSTRUCTION_MAP``; here
  the override alone is enough.)
* adding entries to ``_INSTRUCTION_MAP`` (instruction class -> function
  ``f(self, **fields)``), for a new instruction class or a built-in one, in a
  subclass's own map or in ``PipelineEngine._INSTRUCTION_MAP`` itself (as
  Megatron-DeepSpeed installs its ZB-H1 passes), before the engine is built.

Such methods are called with the instruction's fields that they name
(``buffer_id``, and ``micro_batch_id``, ``chunk_id`` or a new class's own), and
find the batch in flight as ``self.current_batch`` (a
:class:`~stagewise.engine.state.BatchState`: inputs, outputs, gradients per
``(chunk_id, buffer_id)``) and the instruction as ``self.current_instruction``.
A project may also swap DeepSpeed's training schedule class
(``stagewise.runtime.pipe.schedule.TrainSchedule = MySchedule``, as
Megatron-DeepSpeed does for ZB-H1): :func:`swapped_train_schedule` finds it and
the engine trains with it when ``pipeline.schedule`` is the default ``"1f1b"``.
DeepSpeed's private engine state (``pipe_buffers``, ``pipe_recv_buf``,
``grad_layer``, ``_exec_schedule``, the ``p2p`` module) is not mirrored.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from stagewise.config import Config
from stagewise.engine.interpreter import Handler, Interpreter
from stagewise.engine.parts import EngineParts
from stagewise.engine.state import BatchState
from stagewise.errors import ConfigError, PipelineError
from stagewise.module import PipelineModule
from stagewise.schedule import (
    BackwardPass,
    BufferOpInstruction,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

__all__ = ["EXEC_METHODS", "DeepSpeedHooks", "install_overrides", "swapped_train_schedule"]

#: DeepSpeed's engine method for each built-in instruction class.
EXEC_METHODS: dict[str, type[PipeInstruction]] = {
    "_exec_load_micro_batch": LoadMicroBatch,
    "_exec_forward_pass": ForwardPass,
    "_exec_backward_pass": BackwardPass,
    "_exec_send_activations": SendActivation,
    "_exec_recv_activations": RecvActivation,
    "_exec_send_grads": SendGrad,
    "_exec_recv_grads": RecvGrad,
    "_exec_reduce_tied_grads": ReduceTiedGrads,
    "_exec_reduce_grads": ReduceGrads,
    "_exec_optimizer_step": OptimizerStep,
}


def _fields(instr: PipeInstruction) -> dict[str, Any]:
    if dataclasses.is_dataclass(instr):
        return {f.name: getattr(instr, f.name) for f in dataclasses.fields(instr)}
    return dict(getattr(instr, "kwargs", {}))


def _caller(engine: Any, fn: Callable[..., Any]) -> Handler:
    """A handler that calls ``fn(engine, **fields it names)`` with the batch in flight."""
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = {p.name for p in params}

    def handler(instr: Any, batch: BatchState) -> None:
        fields = _fields(instr)
        kwargs = fields if takes_all else {k: v for k, v in fields.items() if k in names}
        engine._active.append((instr, batch))
        try:
            fn(engine, **kwargs)
        finally:
            engine._active.pop()

    return handler


class DeepSpeedHooks:
    """DeepSpeed's ``_exec_*`` methods on the engine, each running the built-in handler."""

    _INSTRUCTION_MAP: ClassVar[dict[type[PipeInstruction], Callable[..., Any]]]
    _active: list[tuple[PipeInstruction, BatchState]]
    _builtin_handlers: dict[type[PipeInstruction], Handler]

    @property
    def current_instruction(self) -> PipeInstruction:
        """The instruction whose ``_exec_*`` method runs now."""
        return self._current()[0]

    @property
    def current_batch(self) -> BatchState:
        """The batch in flight while an ``_exec_*`` method runs."""
        return self._current()[1]

    def _current(self) -> tuple[PipeInstruction, BatchState]:
        if not getattr(self, "_active", None):
            raise PipelineError(
                "an _exec_* method runs only inside train_batch/eval_batch, for the instruction "
                "the schedule gives it; call engine.train_batch(data_iter) instead"
            )
        return self._active[-1]

    def _run_builtin(self, cls: type[PipeInstruction], buffer_id: int | None = None) -> None:
        instr, batch = self._current()
        moved = buffer_id is not None and buffer_id != getattr(instr, "buffer_id", None)
        if type(instr) is not cls or moved:
            if issubclass(cls, BufferOpInstruction):
                fields = _fields(instr)
                if buffer_id is not None:
                    fields["buffer_id"] = buffer_id
                instr = cls(
                    buffer_id=fields["buffer_id"],
                    micro_batch_id=fields.get("micro_batch_id", -1),
                    chunk_id=fields.get("chunk_id", 0),
                )
            else:
                instr = cls()
        self._builtin_handlers[cls](instr, batch)

    def _exec_load_micro_batch(self, buffer_id: int) -> None:
        self._run_builtin(LoadMicroBatch, buffer_id)

    def _exec_forward_pass(self, buffer_id: int) -> None:
        self._run_builtin(ForwardPass, buffer_id)

    def _exec_backward_pass(self, buffer_id: int) -> None:
        self._run_builtin(BackwardPass, buffer_id)

    def _exec_send_activations(self, buffer_id: int) -> None:
        self._run_builtin(SendActivation, buffer_id)

    def _exec_recv_activations(self, buffer_id: int) -> None:
        self._run_builtin(RecvActivation, buffer_id)

    def _exec_send_grads(self, buffer_id: int) -> None:
        self._run_builtin(SendGrad, buffer_id)

    def _exec_recv_grads(self, buffer_id: int) -> None:
        self._run_builtin(RecvGrad, buffer_id)

    def _exec_reduce_tied_grads(self) -> None:
        self._run_builtin(ReduceTiedGrads)

    def _exec_reduce_grads(self) -> None:
        self._run_builtin(ReduceGrads)

    def _exec_optimizer_step(self) -> None:
        self._run_builtin(OptimizerStep)


DeepSpeedHooks._INSTRUCTION_MAP = {
    cls: getattr(DeepSpeedHooks, name) for name, cls in EXEC_METHODS.items()
}
# What the map held when defined: a project may update the class's own map in place
# (Megatron-DeepSpeed's PipelineEngine._INSTRUCTION_MAP.update({...})).
_BASE_MAP = dict(DeepSpeedHooks._INSTRUCTION_MAP)


def install_overrides(engine: DeepSpeedHooks, interpreter: Interpreter) -> list[str]:
    """Register the subclass's ``_exec_*`` overrides and ``_INSTRUCTION_MAP`` entries.

    Returns what was installed, e.g. ``["ForwardPass: _exec_forward_pass"]``.
    """
    engine._active = []
    installed = []
    own = type(engine)
    for name, cls in EXEC_METHODS.items():
        fn = getattr(own, name)
        if fn is not getattr(DeepSpeedHooks, name):
            interpreter.register(cls, _caller(engine, fn))
            installed.append(f"{cls.__name__}: {name}")
    for cls, fn in own._INSTRUCTION_MAP.items():
        if fn is not _BASE_MAP.get(cls):
            if not callable(fn):
                raise TypeError(
                    f"{own.__name__}._INSTRUCTION_MAP[{cls!r}] must be a function "
                    f"f(self, **fields), got {fn!r}"
                )
            interpreter.register(cls, _caller(engine, fn))
            installed.append(f"{getattr(cls, '__name__', cls)}: {getattr(fn, '__name__', fn)}")
    return installed


def swapped_train_schedule() -> type | None:
    """The class assigned to ``stagewise.runtime.pipe.schedule.TrainSchedule``, if swapped."""
    mirror = sys.modules.get("stagewise.runtime.pipe.schedule")
    chosen = getattr(mirror, "TrainSchedule", TrainSchedule)
    return None if chosen is TrainSchedule else chosen


def use_swapped_train_schedule(parts: EngineParts, config: Config, module: PipelineModule) -> None:
    """Train with a class assigned to DeepSpeed's ``TrainSchedule`` (one chunk per stage).

    Raises:
        ConfigError: the config asks for another schedule, or the module has chunks.
    """
    swapped = swapped_train_schedule()
    if swapped is None:
        return
    if config.pipeline.schedule != "1f1b" or module.num_chunks != 1:
        raise ConfigError(
            f"stagewise.runtime.pipe.schedule.TrainSchedule was replaced by "
            f"{swapped.__name__}, but pipeline.schedule={config.pipeline.schedule!r} "
            f"with {module.num_chunks} chunk(s) per stage; a swapped TrainSchedule "
            'replaces "1f1b" on one chunk per stage only'
        )
    parts.schedule_factory = swapped
