"""Instructions: the values a schedule yields and the engine executes.

A schedule is data. Each instruction is a frozen, hashable value with a short
text form (``repr``) that reads like a timeline cell and parses back with
:func:`parse_instruction`:

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

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
    "parse_instruction",
]


@dataclass(frozen=True, repr=False, slots=True)
class PipeInstruction:
    """Base class of every instruction; subclasses set ``code``."""

    code: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """The class name, as DeepSpeed's instructions expose it."""
        return type(self).__name__

    def __repr__(self) -> str:
        return self.code


@dataclass(frozen=True, repr=False, slots=True)
class OptimizerStep(PipeInstruction):
    """Step the optimizer (and the learning-rate scheduler)."""

    code: ClassVar[str] = "OPT"


@dataclass(frozen=True, repr=False, slots=True)
class ReduceGrads(PipeInstruction):
    """Average gradients over the data-parallel group."""

    code: ClassVar[str] = "RDG"


@dataclass(frozen=True, repr=False, slots=True)
class ReduceTiedGrads(PipeInstruction):
    """Sum the gradients of tied weights over the stages that share them."""

    code: ClassVar[str] = "RTG"


@dataclass(frozen=True, repr=False, slots=True)
class BufferOpInstruction(PipeInstruction):
    """An instruction that acts on one pipeline buffer (one micro-batch in flight).

    ``micro_batch_id`` defaults to ``buffer_id`` for DeepSpeed-style schedules that
    name only a buffer.
    """

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

    code: ClassVar[str] = "L"


@dataclass(frozen=True, repr=False, slots=True)
class ForwardPass(BufferOpInstruction):
    """Run this chunk's layers on the buffer's input (the last adds the loss)."""

    code: ClassVar[str] = "F"


@dataclass(frozen=True, repr=False, slots=True)
class BackwardPass(BufferOpInstruction):
    """The whole backward of one micro-batch: input and weight gradients."""

    code: ClassVar[str] = "B"


@dataclass(frozen=True, repr=False, slots=True)
class BackwardInputPass(BufferOpInstruction):
    """The input-gradient half of a split backward (zero-bubble schedules)."""

    code: ClassVar[str] = "I"


@dataclass(frozen=True, repr=False, slots=True)
class BackwardWeightPass(BufferOpInstruction):
    """The weight-gradient half of a split backward, run after its ``I``."""

    code: ClassVar[str] = "W"


@dataclass(frozen=True, repr=False, slots=True)
class SendActivation(BufferOpInstruction):
    """Send this chunk's forward output to the next virtual stage."""

    code: ClassVar[str] = "SA"


@dataclass(frozen=True, repr=False, slots=True)
class RecvActivation(BufferOpInstruction):
    """Receive this chunk's input from the previous virtual stage."""

    code: ClassVar[str] = "RA"


@dataclass(frozen=True, repr=False, slots=True)
class SendGrad(BufferOpInstruction):
    """Send the gradient of this chunk's input to the previous virtual stage."""

    code: ClassVar[str] = "SG"


@dataclass(frozen=True, repr=False, slots=True)
class RecvGrad(BufferOpInstruction):
    """Receive the gradient of this chunk's output from the next virtual stage."""

    code: ClassVar[str] = "RG"


_BUFFER_CLASSES: dict[str, type[BufferOpInstruction]] = {
    cls.code: cls
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
    )
}
_PLAIN_CLASSES: dict[str, type[PipeInstruction]] = {
    cls.code: cls for cls in (OptimizerStep, ReduceGrads, ReduceTiedGrads)
}
_TEXT = re.compile(r"^(SA|RA|SG|RG|L|F|B|I|W)(\d+)(?:c(\d+))?(?:b(\d+))?$")


def parse_instruction(text: str) -> PipeInstruction:
    """Parse the text form of an instruction (the inverse of ``repr``).

    >>> parse_instruction("F3c1")
    F3c1
    >>> parse_instruction("SA2b0").buffer_id
    0
    """
    text = text.strip()
    if text in _PLAIN_CLASSES:
        return _PLAIN_CLASSES[text]()
    match = _TEXT.match(text)
    if match is None:
        raise ValueError(
            f"cannot parse instruction {text!r}: expected e.g. 'F3', 'B3c1', 'SA2b0', "
            f"or one of {sorted(_PLAIN_CLASSES)}"
        )
    code, micro_batch, chunk, buffer = match.groups()
    mb = int(micro_batch)
    return _BUFFER_CLASSES[code](
        buffer_id=int(buffer) if buffer is not None else mb,
        micro_batch_id=mb,
        chunk_id=int(chunk) if chunk is not None else 0,
    )
