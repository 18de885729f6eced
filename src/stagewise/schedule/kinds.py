"""Instruction kinds: the one place that says what each kind of instruction is.

Every instruction class declares its :class:`Kind` (a class variable); the
checker, the simulator, the renderer, the pass-order schedules and
:func:`~stagewise.schedule.instructions.parse_instruction` all read what they need
from it, and nothing else encodes instruction types. The table below is that
source:

===================  ======  ========  ==============  ==========  ======  ==========
kind                 code    compute   transfer        carries     buffer  collective
===================  ======  ========  ==============  ==========  ======  ==========
``LOAD``             ``L``                                         yes
``FORWARD``          ``F``   yes                                   yes
``BACKWARD``         ``B``   yes                                   yes
``BACKWARD_INPUT``   ``I``   yes                                   yes
``BACKWARD_WEIGHT``  ``W``   yes                                   yes
``SEND_ACTIVATION``  ``SA``            send            activation  yes
``RECV_ACTIVATION``  ``RA``            receive         activation  yes
``SEND_GRAD``        ``SG``            send            gradient    yes
``RECV_GRAD``        ``RG``            receive         gradient    yes
``REDUCE_TIED``      ``RTG``                                               pipeline
``REDUCE_GRADS``     ``RDG``                                               data
``OPTIMIZER_STEP``   ``OPT``                                               pipeline
``CUSTOM``           (own)
===================  ======  ========  ==============  ==========  ======  ==========

``CUSTOM`` is for instructions a user defines (and registers a handler for in the
engine): the checker's rules ignore them and the simulator costs them nothing;
they carry no buffer semantics even when their class has a ``buffer_id``.

A *pipeline* collective waits for every stage (tied-weight reduction; the
optimizer step, with its global-norm clipping); ``RDG`` reduces over the
data-parallel group only, so the pipeline stages do not wait for each other in it.
``RTG``, ``RDG`` and ``OPT`` close a training batch (:attr:`Kind.closes_batch`).

>>> Kind.from_code("SG").carries, Kind.SEND_GRAD.is_send
('gradient', True)
>>> [kind.code for kind in Kind if kind.is_compute]
['F', 'B', 'I', 'W']
"""

from __future__ import annotations

import functools
from enum import IntEnum
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["Kind", "kind_mask"]

Carries = Literal["activation", "gradient"] | None


class _Traits(NamedTuple):
    code: str | None
    description: str
    compute: bool = False
    transfer: Literal["send", "recv"] | None = None
    carries: Carries = None
    buffer_op: bool = False
    collective: Literal["pipeline", "data"] | None = None
    closes_batch: bool = False
    backward: bool = False  # only a training batch has it


class Kind(IntEnum):
    """What an instruction does, as the checker and the simulator need to know it.

    Members are small integers, so a schedule can be held as a numpy array of
    kinds (see :mod:`stagewise.schedule.program`).
    """

    LOAD = 0
    FORWARD = 1
    BACKWARD = 2
    BACKWARD_INPUT = 3
    BACKWARD_WEIGHT = 4
    SEND_ACTIVATION = 5
    RECV_ACTIVATION = 6
    SEND_GRAD = 7
    RECV_GRAD = 8
    REDUCE_TIED = 9
    REDUCE_GRADS = 10
    OPTIMIZER_STEP = 11
    CUSTOM = 12

    @property
    def _traits(self) -> _Traits:
        return _TRAITS[self]

    @property
    def code(self) -> str | None:
        """The text form's prefix (``"F"``, ``"SA"``, ``"OPT"``); None for ``CUSTOM``."""
        return self._traits.code

    @property
    def description(self) -> str:
        """What the kind does, in a few words (legends, error messages)."""
        return self._traits.description

    @property
    def is_compute(self) -> bool:
        """A pass through the model: ``F``, ``B``, ``I`` or ``W``."""
        return self._traits.compute

    @property
    def is_send(self) -> bool:
        return self._traits.transfer == "send"

    @property
    def is_recv(self) -> bool:
        return self._traits.transfer == "recv"

    @property
    def is_transfer(self) -> bool:
        """A send or a receive between (virtual) stages."""
        return self._traits.transfer is not None

    @property
    def carries(self) -> Carries:
        """``"activation"`` or ``"gradient"`` for a transfer, else None."""
        return self._traits.carries

    @property
    def is_activation(self) -> bool:
        return self._traits.carries == "activation"

    @property
    def is_gradient(self) -> bool:
        return self._traits.carries == "gradient"

    @property
    def is_buffer_op(self) -> bool:
        """Acts on one pipeline buffer: has a buffer, a micro-batch and a chunk."""
        return self._traits.buffer_op

    @property
    def is_collective(self) -> bool:
        """Waits for every pipeline stage (``RTG``, ``OPT``)."""
        return self._traits.collective == "pipeline"

    @property
    def closes_batch(self) -> bool:
        """One of the reductions and the optimizer step that end a training batch."""
        return self._traits.closes_batch

    @property
    def is_backward(self) -> bool:
        """Only a training schedule has it (backward passes, gradient transfers, ``OPT``)."""
        return self._traits.backward

    @property
    def makes_input_grad(self) -> bool:
        """The pass that computes the gradient of the chunk's input (``B``, ``I``)."""
        return self in (Kind.BACKWARD, Kind.BACKWARD_INPUT)

    @property
    def frees_activation(self) -> bool:
        """The pass after which a micro-batch's activations on a chunk are gone (``B``, ``W``)."""
        return self in (Kind.BACKWARD, Kind.BACKWARD_WEIGHT)

    @classmethod
    def from_code(cls, code: str) -> Kind:
        """The kind whose text form starts with ``code``.

        Raises:
            ValueError: no built-in kind has that code; the message lists them.
        """
        kind = _BY_CODE.get(code)
        if kind is None:
            raise ValueError(
                f"no instruction kind has the code {code!r}: the codes are "
                f"{', '.join(sorted(_BY_CODE))}"
            )
        return kind


_TRAITS: dict[Kind, _Traits] = {
    Kind.LOAD: _Traits("L", "load a micro-batch", buffer_op=True),
    Kind.FORWARD: _Traits("F", "forward", compute=True, buffer_op=True),
    Kind.BACKWARD: _Traits("B", "backward (whole)", compute=True, buffer_op=True, backward=True),
    Kind.BACKWARD_INPUT: _Traits(
        "I", "backward, input gradient", compute=True, buffer_op=True, backward=True
    ),
    Kind.BACKWARD_WEIGHT: _Traits(
        "W", "backward, weight gradient", compute=True, buffer_op=True, backward=True
    ),
    Kind.SEND_ACTIVATION: _Traits(
        "SA", "send an activation", transfer="send", carries="activation", buffer_op=True
    ),
    Kind.RECV_ACTIVATION: _Traits(
        "RA", "receive an activation", transfer="recv", carries="activation", buffer_op=True
    ),
    Kind.SEND_GRAD: _Traits(
        "SG",
        "send a gradient",
        transfer="send",
        carries="gradient",
        buffer_op=True,
        backward=True,
    ),
    Kind.RECV_GRAD: _Traits(
        "RG",
        "receive a gradient",
        transfer="recv",
        carries="gradient",
        buffer_op=True,
        backward=True,
    ),
    Kind.REDUCE_TIED: _Traits(
        "RTG", "reduce tied-weight gradients", collective="pipeline", closes_batch=True
    ),
    Kind.REDUCE_GRADS: _Traits(
        "RDG", "reduce data-parallel gradients", collective="data", closes_batch=True
    ),
    Kind.OPTIMIZER_STEP: _Traits(
        "OPT",
        "optimizer step",
        collective="pipeline",
        closes_batch=True,
        backward=True,
    ),
    Kind.CUSTOM: _Traits(None, "custom instruction"),
}
if set(_TRAITS) != set(Kind):  # pragma: no cover - a new member without its traits
    raise RuntimeError(f"kinds without traits: {sorted(set(Kind) - set(_TRAITS))}")

_BY_CODE: dict[str, Kind] = {kind.code: kind for kind in Kind if kind.code is not None}


@functools.cache
def kind_mask(trait: str) -> npt.NDArray[np.bool_]:
    """A boolean array indexed by kind value: ``kind_mask("is_compute")[kinds]``.

    ``trait`` is the name of one of :class:`Kind`'s boolean properties. The
    array is read-only and cached.
    """
    values = [getattr(kind, trait) for kind in Kind]
    if not all(isinstance(value, bool) for value in values):
        raise ValueError(f"Kind.{trait} is not a boolean property of every kind")
    mask = np.array(values, dtype=bool)
    mask.flags.writeable = False
    return mask
