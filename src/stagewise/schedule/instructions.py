"""Instructions: the values a schedule yields and the engine executes.

A schedule is data. Each instruction is a frozen, hashable value with a short
text form (``repr``) that reads like a timeline cell and parses back with
:func:`parse_instruction`. Each class declares its :class:`~stagewise.schedule.kinds.Kind`
(``kind``, a class variable), which is everything the checker and the simulator
know about it; the text form's prefix is the kind's code:

==========  =================================  ==========================
text        class                              meaning
==========  =================================  ==========================
``L3``      :class:`LoadMicroBatch`            read micro-batch 3's data
``F3``      :class:`ForwardPass`               forward of micro-batch 3
``B3``      :class:`BackwardPass`              whole backward of micro-batch 3
``I3``      :class:`BackwardInputPass`         backward to the stage's input only
``W3``      :class:`BackwardWeightPass`        the deferred weight-gradient part
``SA3``     :class:`SendActivation`            send F3's output downstream
``RA3``     :class:`RecvActivation`            receive micro-batch 3's input
``SG3``     :class:`SendGrad`                  send the input gradient upstream
``RG3``     :class:`RecvGrad`                  receive the output gradient
``RTG``     :class:`ReduceTiedGrads`           sum tied-weight gradients
``RDG``     :class:`ReduceGrads`               average data-parallel gradients
``OPT``     :class:`OptimizerStep`             step the optimizer
==========  =================================  ==========================

Buffer instructions carry ``buffer_id`` (DeepSpeed's field, first and
positional, so ``ForwardPass(0)`` works as in DeepSpeed), the ``micro_batch_id``
they act on and the model ``chunk_id`` (virtual stage) for interleaved
schedules. The text form shows the micro-batch and, when non-zero, the chunk
(``F3c1``) and a buffer that differs from the micro-batch (``F3b1``).

Your own instructions (the engine runs them through a handler you register) are
classes with ``kind = Kind.CUSTOM`` and a ``code`` of their own: the checker's
rules pass over them and the simulator costs them nothing. A class without a
kind is an error when it is defined::

    @dataclass(frozen=True, repr=False)
    class SaveCheckpoint(PipeInstruction):
        kind: ClassVar[Kind] = Kind.CUSTOM
        code: ClassVar[str] = "CKPT"
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from stagewise.schedule.kinds import Kind

__all__ = [
    "BackwardInputPass",
    "BackwardPass",
    "BackwardWeightPass",
    "BufferOpInstruction",
    "ForwardPass",
    "LoadMicroBatch",
    "OptimizerStep",
    "PipeInstruction",
    "RecvActivation",
    "RecvGrad",
    "ReduceGrads",
    "ReduceTiedGrads",
    "SendActivation",
    "SendGrad",
    "instruction_class",
    "parse_instruction",
]


@dataclass(frozen=True, repr=False, slots=True)
class PipeInstruction:
    """Base class of every instruction; a concrete subclass declares its ``kind``.

    Attributes:
        kind: what the instruction does (a class variable).
        code: the prefix of its text form; the kind's code unless the class sets
            one (a ``CUSTOM`` class should).
    """

    kind: ClassVar[Kind]
    code: ClassVar[str] = ""
    #: set in the body of a base class that is never instantiated itself.
    _abstract: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        # explicit: slots=True rebuilds the class, which breaks a bare super() here
        super(PipeInstruction, cls).__init_subclass__(**kwargs)
        if cls.__dict__.get("_abstract", False):
            return
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, Kind):
            raise TypeError(
                f"instruction class {cls.__name__} has no kind (got {kind!r}): declare "
                f"'kind: ClassVar[Kind] = Kind.CUSTOM' for an instruction of your own "
                f"(the checker and the simulator pass over it), or subclass the built-in "
                f"instruction it behaves like"
            )
        base = globals().get("BufferOpInstruction")  # not yet defined for the first classes
        buffered = base is not None and issubclass(cls, base)
        if kind.is_buffer_op and not buffered:
            raise TypeError(
                f"instruction class {cls.__name__} has kind {kind.name}, which acts on a "
                f"buffer: subclass BufferOpInstruction (buffer_id, micro_batch_id, chunk_id)"
            )
        if buffered and not kind.is_buffer_op and kind != Kind.CUSTOM:
            raise TypeError(
                f"instruction class {cls.__name__} subclasses BufferOpInstruction but has "
                f"kind {kind.name}, which acts on no buffer: subclass PipeInstruction"
            )
        if "code" not in cls.__dict__:
            cls.code = kind.code if kind.code is not None else cls.__name__

    @property
    def name(self) -> str:
        """The class name, as DeepSpeed's instructions expose it."""
        return type(self).__name__

    def __repr__(self) -> str:
        return self.code


@dataclass(frozen=True, repr=False, slots=True)
class OptimizerStep(PipeInstruction):
    """Step the optimizer (and the learning-rate scheduler)."""

    kind: ClassVar[Kind] = Kind.OPTIMIZER_STEP


@dataclass(frozen=True, repr=False, slots=True)
class ReduceGrads(PipeInstruction):
    """Average gradients over the data-parallel group."""

    kind: ClassVar[Kind] = Kind.REDUCE_GRADS


@dataclass(frozen=True, repr=False, slots=True)
class ReduceTiedGrads(PipeInstruction):
    """Sum the gradients of tied weights over the stages that share them."""

    kind: ClassVar[Kind] = Kind.REDUCE_TIED


@dataclass(frozen=True, repr=False, slots=True)
class BufferOpInstruction(PipeInstruction):
    """An instruction that acts on one pipeline buffer (one micro-batch in flight).

    ``micro_batch_id`` defaults to ``buffer_id`` for DeepSpeed-style schedules that
    name only a buffer.
    """

    _abstract: ClassVar[bool] = True

    buffer_id: int
    micro_batch_id: int = -1
    chunk_id: int = 0

    def __post_init__(self) -> None:
        if self.buffer_id < 0:
            raise ValueError(f"{self.name}: buffer_id must be >= 0, got {self.buffer_id}")
        if self.chunk_id < 0:
            raise ValueError(f"{self.name}: chunk_id must be >= 0, got {self.chunk_id}")
        if self.micro_batch_id < 0:
            object.__setattr__(self, "micro_batch_id", self.buffer_id)

    def __repr__(self) -> str:
        text = f"{self.code}{self.micro_batch_id}"
        if self.chunk_id:
            text += f"c{self.chunk_id}"
        if self.buffer_id != self.micro_batch_id:
            text += f"b{self.buffer_id}"
        return text


@dataclass(frozen=True, repr=False, slots=True)
class LoadMicroBatch(BufferOpInstruction):
    """Read the next micro-batch: inputs on the first stage, labels on the last."""

    kind: ClassVar[Kind] = Kind.LOAD


@dataclass(frozen=True, repr=False, slots=True)
class ForwardPass(BufferOpInstruction):
    """Run this chunk's layers on the buffer's input (the last adds the loss)."""

    kind: ClassVar[Kind] = Kind.FORWARD


@dataclass(frozen=True, repr=False, slots=True)
class BackwardPass(BufferOpInstruction):
    """The whole backward of one micro-batch: input and weight gradients."""

    kind: ClassVar[Kind] = Kind.BACKWARD


@dataclass(frozen=True, repr=False, slots=True)
class BackwardInputPass(BufferOpInstruction):
    """The input-gradient half of a split backward (zero-bubble schedules)."""

    kind: ClassVar[Kind] = Kind.BACKWARD_INPUT


@dataclass(frozen=True, repr=False, slots=True)
class BackwardWeightPass(BufferOpInstruction):
    """The weight-gradient half of a split backward, run after its ``I``."""

    kind: ClassVar[Kind] = Kind.BACKWARD_WEIGHT


@dataclass(frozen=True, repr=False, slots=True)
class SendActivation(BufferOpInstruction):
    """Send this chunk's forward output to the next virtual stage."""

    kind: ClassVar[Kind] = Kind.SEND_ACTIVATION


@dataclass(frozen=True, repr=False, slots=True)
class RecvActivation(BufferOpInstruction):
    """Receive this chunk's input from the previous virtual stage."""

    kind: ClassVar[Kind] = Kind.RECV_ACTIVATION


@dataclass(frozen=True, repr=False, slots=True)
class SendGrad(BufferOpInstruction):
    """Send the gradient of this chunk's input to the previous virtual stage."""

    kind: ClassVar[Kind] = Kind.SEND_GRAD


@dataclass(frozen=True, repr=False, slots=True)
class RecvGrad(BufferOpInstruction):
    """Receive the gradient of this chunk's output from the next virtual stage."""

    kind: ClassVar[Kind] = Kind.RECV_GRAD


#: the built-in class of every kind but CUSTOM.
_CLASS_OF: dict[Kind, type[PipeInstruction]] = {
    cls.kind: cls
    for cls in (
        LoadMicroBatch,
        ForwardPass,
        BackwardPass,
        BackwardInputPass,
        BackwardWeightPass,
        SendActivation,
        RecvActivation,
        SendGrad,
        RecvGrad,
        ReduceTiedGrads,
        ReduceGrads,
        OptimizerStep,
    )
}
if set(_CLASS_OF) != set(Kind) - {Kind.CUSTOM}:  # pragma: no cover - a kind without a class
    raise RuntimeError(f"kinds without a class: {sorted(set(Kind) - set(_CLASS_OF))}")

_PLAIN_CODES = {
    kind.code: kind for kind in _CLASS_OF if not kind.is_buffer_op and kind.code is not None
}
# longest codes first, so that "SA" is tried before a one-letter code
_BUFFER_CODES = sorted(
    (kind.code for kind in _CLASS_OF if kind.is_buffer_op and kind.code is not None),
    key=len,
    reverse=True,
)
_TEXT = re.compile(rf"^({'|'.join(_BUFFER_CODES)})(\d+)(?:c(\d+))?(?:b(\d+))?$")


def instruction_class(kind: Kind) -> type[PipeInstruction]:
    """The built-in instruction class of ``kind``.

    Raises:
        ValueError: ``kind`` is ``CUSTOM`` (no built-in class has it) or not a kind.
    """
    cls = _CLASS_OF.get(kind)
    if cls is None:
        raise ValueError(
            f"no built-in instruction class has kind {kind!r}: a CUSTOM instruction is "
            f"a class of your own"
        )
    return cls


def parse_instruction(text: str) -> PipeInstruction:
    """Parse the text form of an instruction (the inverse of ``repr``).

    >>> parse_instruction("F3c1")
    F3c1
    >>> parse_instruction("SA2b0").buffer_id
    0
    """
    text = text.strip()
    if text in _PLAIN_CODES:
        return _CLASS_OF[_PLAIN_CODES[text]]()
    match = _TEXT.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse instruction {text!r}: expected e.g. 'F3', 'B3c1', 'SA2b0', "
            f"or one of {sorted(_PLAIN_CODES)}"
        )
    code, micro_batch, chunk, buffer = match.groups()
    mb = int(micro_batch)
    cls = _CLASS_OF[Kind.from_code(code)]
    return cls(  # type: ignore[call-arg]
        buffer_id=int(buffer) if buffer is not None else mb,
        micro_batch_id=mb,
        chunk_id=int(chunk) if chunk is not None else 0,
    )
