"""The simulator's inputs: what each pass and transfer costs, what each activation weighs.

:class:`Costs` gives times, in any one unit:

* ``forward``, ``backward_input``, ``backward_weight``: a *number* is the time of
  one micro-batch through one stage's whole share of the model, and a schedule with
  ``k`` chunks per stage runs each chunk's pass in ``1/k`` of it (so makespans
  compare across schedules); a *sequence* gives each virtual stage's own time (its
  layers differ), one entry per virtual stage, in model order, used as given. A
  whole backward (``B``) costs ``backward_input + backward_weight``.
* ``send``: the time from a send's start to its message's arrival (latency +
  transfer); a number for every boundary, or one entry per boundary between
  virtual stages ``v`` and ``v + 1`` (``V - 1`` entries), for the activation going
  down it and the gradient coming back. :meth:`Costs.transfer_times` makes them from
  bytes, bandwidth and latency. The turn of a V placement is a boundary like any
  other (give it 0 when the two chunks share a device).

:class:`ActivationMemory` gives bytes, for the peak activation memory of each stage:
``activations[v]``, what one micro-batch's forward on virtual stage ``v`` keeps for
its backward, and ``inputs[v]``, the bytes of that virtual stage's input (what
activation checkpointing keeps instead). The model, per chunk and micro-batch:

* the forward makes ``activations[v]`` live; the micro-batch then keeps
  ``activations[v]``, or only ``inputs[v]`` with checkpointing;
* a whole backward ``B`` frees what was kept; with checkpointing it first
  recomputes the rest (``activations[v] - inputs[v]`` live during the pass);
* an input-gradient pass ``I`` frees nothing (without checkpointing), or recomputes
  the rest and keeps it for the ``W`` (with checkpointing); ``W`` frees everything;
* an inference batch keeps nothing after each forward.

A stage's peak is the most bytes live at once over its program, during a pass
included. A *number* for ``activations`` is a stage's whole share (each of ``k``
chunks keeps ``1/k``); a number for ``inputs`` is every virtual stage's input.

>>> Costs(forward=2, send=0.5).per_virtual_stage("forward", 4, chunks=2).tolist()
[1.0, 1.0, 1.0, 1.0]
>>> Costs.transfer_times([4e6, 2e6], bandwidth=1e9, latency=1e-5)
(0.00401, 0.00201)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from stagewise.schedule.kinds import Kind, kind_mask

__all__ = [
    "OP_OF",
    "ActivationMemory",
    "Costs",
    "SimOp",
    "peak_activation_bytes",
    "peak_activations",
    "sim_op",
]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.signedinteger[Any]]
Value = float | tuple[float, ...]


class SimOp(IntEnum):
    """What the simulator does with an instruction (see :func:`sim_op`)."""

    FORWARD = 0
    BACKWARD = 1
    BACKWARD_INPUT = 2
    BACKWARD_WEIGHT = 3
    SEND = 4  # buffered: arrives ``send`` later
    RECV = 5  # blocks until its message has arrived
    FREE = 6  # takes no time


def sim_op(kind: Kind) -> SimOp:
    """The simulator's decision for one instruction kind: what it costs, how it waits.

    Every kind is decided here, ``CUSTOM`` included (free); anything else is an
    error, never a silent zero.

    Raises:
        ValueError: ``kind`` is not a :class:`~stagewise.schedule.kinds.Kind`.
    """
    if kind == Kind.FORWARD:
        return SimOp.FORWARD
    if kind == Kind.BACKWARD:
        return SimOp.BACKWARD
    if kind == Kind.BACKWARD_INPUT:
        return SimOp.BACKWARD_INPUT
    if kind == Kind.BACKWARD_WEIGHT:
        return SimOp.BACKWARD_WEIGHT
    if kind in (Kind.SEND_ACTIVATION, Kind.SEND_GRAD):
        return SimOp.SEND
    if kind in (Kind.RECV_ACTIVATION, Kind.RECV_GRAD):
        return SimOp.RECV
    if kind in (Kind.LOAD, Kind.REDUCE_TIED, Kind.REDUCE_GRADS, Kind.OPTIMIZER_STEP, Kind.CUSTOM):
        return SimOp.FREE
    raise ValueError(f"the simulator has no cost for instruction kind {kind!r}")


#: the decision per kind value, for arrays of kinds.
OP_OF = np.array([sim_op(kind) for kind in Kind], np.int64)


def _normalise(owner: str, name: str, value: Any, allow_none: bool = False) -> Any:
    """A finite number >= 0, or a non-empty tuple of them."""
    if value is None and allow_none:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        values = tuple(value.tolist() if isinstance(value, np.ndarray) else value)
        if not values:
            raise ValueError(f"{owner}.{name} must not be an empty sequence")
        for i, item in enumerate(values):
            _check_number(f"{owner}.{name}[{i}]", item)
        return values
    _check_number(f"{owner}.{name}", value)
    return value


def _check_number(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    if not value >= 0 or value == math.inf:
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")


_UNITS = {"virtual stages": "virtual stage", "boundaries": "boundary"}


def _table(owner: str, name: str, value: Value, size: int, divide: int, what: str) -> Floats:
    """``value`` as one entry per ``what`` (a number is divided by ``divide``)."""
    if isinstance(value, tuple):
        if len(value) != size:
            raise ValueError(
                f"{owner}.{name} has {len(value)} entries but the schedule has {size} "
                f"{what}: give one per {_UNITS[what]}, or one number"
            )
        return np.array(value, np.float64)
    return np.full(size, value / divide if divide != 1 else value, np.float64)


@dataclass(frozen=True)
class Costs:
    """Time per pass and per transfer (see the module doc for numbers vs sequences).

    Attributes:
        forward: one forward (``F``) of one micro-batch.
        backward_input: the input-gradient half (``I``) of a backward.
        backward_weight: the weight-gradient half (``W``); a whole backward (``B``)
            costs ``backward_input + backward_weight``.
        send: from a send's start to its message's arrival (latency + transfer).
    """

    forward: Value = 1
    backward_input: Value = 1
    backward_weight: Value = 1
    send: Value = 0

    def __post_init__(self) -> None:
        for name in ("forward", "backward_input", "backward_weight", "send"):
            object.__setattr__(self, name, _normalise("Costs", name, getattr(self, name)))

    @property
    def backward(self) -> Value:
        """A whole backward: ``backward_input + backward_weight`` (per entry for sequences)."""
        a, b = self.backward_input, self.backward_weight
        if isinstance(a, tuple) or isinstance(b, tuple):
            size = len(a) if isinstance(a, tuple) else len(b)  # type: ignore[arg-type]
            left = a if isinstance(a, tuple) else (a,) * size
            right = b if isinstance(b, tuple) else (b,) * size
            if len(left) != len(right):
                raise ValueError(
                    f"Costs.backward_input has {len(left)} entries and backward_weight "
                    f"{len(right)}: give both per virtual stage"
                )
            return tuple(x + y for x, y in zip(left, right, strict=True))
        return a + b

    def per_virtual_stage(self, name: str, virtual_stages: int, chunks: int) -> Floats:
        """``name``'s time on each virtual stage (a number is split over ``chunks``)."""
        if name not in ("forward", "backward_input", "backward_weight"):
            raise ValueError(f"Costs has no per-virtual-stage time {name!r}")
        return _table("Costs", name, getattr(self, name), virtual_stages, chunks, "virtual stages")

    def per_boundary(self, virtual_stages: int) -> Floats:
        """The transfer time of each boundary ``v -> v + 1`` (``virtual_stages - 1`` of them)."""
        if virtual_stages == 1 and isinstance(self.send, tuple):
            raise ValueError("Costs.send has entries but one virtual stage has no boundary")
        return _table("Costs", "send", self.send, virtual_stages - 1, 1, "boundaries")

    @staticmethod
    def transfer_times(
        boundary_bytes: Sequence[float], bandwidth: float, latency: float = 0.0
    ) -> tuple[float, ...]:
        """``latency + bytes / bandwidth`` per boundary, for ``Costs(send=...)``.

        Args:
            boundary_bytes: the bytes of the activation crossing each boundary (its
                gradient has the same size).
            bandwidth: bytes per time unit, > 0.
            latency: time per message, >= 0.
        """
        if not bandwidth > 0 or bandwidth == math.inf:
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
        _check_number("latency", latency)
        for i, size in enumerate(boundary_bytes):
            _check_number(f"boundary_bytes[{i}]", size)
        return tuple(latency + size / bandwidth for size in boundary_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in (
                ("forward", self.forward),
                ("backward_input", self.backward_input),
                ("backward_weight", self.backward_weight),
                ("send", self.send),
            )
        }


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes one micro-batch keeps per virtual stage (the model is in the module doc).

    Attributes:
        activations: what one micro-batch's forward on a virtual stage keeps for its
            backward: one entry per virtual stage, or one number for a stage's whole
            share (each of ``k`` chunks keeps ``1/k``).
        inputs: each virtual stage's input bytes (what checkpointing keeps); one
            entry per virtual stage, or one number for all. Needed with checkpointing.
        checkpointing: keep only each virtual stage's input between its forward and
            its backward, and recompute the rest there.
    """

    activations: Value
    inputs: Value | None = None
    checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "activations", _normalise("ActivationMemory", "activations", self.activations)
        )
        object.__setattr__(
            self, "inputs", _normalise("ActivationMemory", "inputs", self.inputs, allow_none=True)
        )
        if self.checkpointing and self.inputs is None:
            raise ValueError(
                "ActivationMemory(checkpointing=True) needs inputs=: the bytes of each "
                "virtual stage's input, which is what checkpointing keeps"
            )

    def tables(self, virtual_stages: int, chunks: int) -> tuple[Floats, Floats]:
        """``(activations, kept)`` per virtual stage: what a forward makes, what stays."""
        made = _table(
            "ActivationMemory", "activations", self.activations, virtual_stages, chunks,
            "virtual stages",
        )  # fmt: skip
        if not self.checkpointing:
            return made, made
        inputs = self.activations if self.inputs is None else self.inputs  # never None here
        kept = _table("ActivationMemory", "inputs", inputs, virtual_stages, 1, "virtual stages")
        if np.any(kept > made):
            v = int(np.flatnonzero(kept > made)[0])
            raise ValueError(
                f"ActivationMemory: virtual stage {v}'s input ({kept[v]:g} bytes) is more than "
                f"its activations ({made[v]:g}); the activations include the input"
            )
        return made, kept


# -- memory accounting over a program's compute passes ----------------------------------
def _segment_max(values: Any, segment: Ints, empty: float = 0) -> list[Any]:
    """The maximum of ``values`` over each stage's segment (``empty`` for one without any)."""
    out = np.full(len(segment) - 1, empty, dtype=values.dtype)
    nonempty = np.flatnonzero(np.diff(segment) > 0)
    if nonempty.size:
        out[nonempty] = np.maximum.reduceat(values, segment[:-1][nonempty])
    return out.tolist()


def _held(delta: Any, segment: Ints) -> Any:
    """The running sum of ``delta`` along each stage's segment (after each entry)."""
    total = np.cumsum(delta)
    base = np.concatenate([[0], total])[segment[:-1]]
    return total - np.repeat(base, np.diff(segment))


def peak_activations(kind: Ints, segment: Ints, training: bool) -> list[int]:
    """Per stage, the most (chunk, micro-batch) activations held, from its compute passes."""
    delta = (kind == Kind.FORWARD).astype(np.int32) - kind_mask("frees_activation")[kind]
    peaks = [max(0, int(p)) for p in _segment_max(_held(delta, segment), segment)]
    if not training:  # inference frees each micro-batch's activations after its forward
        peaks = [min(p, 1) for p in peaks]
    return peaks


def peak_activation_bytes(
    kind: Ints, made: Floats, kept: Floats, segment: Ints, training: bool
) -> list[float]:
    """Per stage, the most activation bytes live at once (the model in the module doc).

    ``kind`` holds the compute passes in program order, stage segment by segment
    (``segment[s]:segment[s + 1]``); ``made`` and ``kept`` the bytes each pass's
    micro-batch makes and keeps on its virtual stage.
    """
    a, k = made, kept
    extra = np.zeros(len(kind))
    delta = np.zeros(len(kind))
    forward = kind == Kind.FORWARD
    extra[forward] = a[forward]
    if training:
        delta[forward] = k[forward]
        whole = kind == Kind.BACKWARD
        extra[whole], delta[whole] = (a - k)[whole], -k[whole]
        half = kind == Kind.BACKWARD_INPUT
        extra[half], delta[half] = (a - k)[half], (a - k)[half]
        weight = kind == Kind.BACKWARD_WEIGHT
        delta[weight] = -a[weight]
    during = _held(delta, segment) - delta + extra  # held before the pass, plus its own
    return [max(0.0, float(p)) for p in _segment_max(during, segment)]
