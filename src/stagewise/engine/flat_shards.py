"""Parameters laid end to end and cut into equal parts: the arithmetic of ZeRO-1 (no processes).

A :class:`FlatSpace` is one param group's trainable parameters of one dtype,
flattened in order into one index space of ``numel`` elements, padded to
``parts * part_size`` and cut into ``parts`` equal parts (DeepSpeed cuts its
flat buffers the same way). Part ``r`` is what data-parallel rank ``r``
optimizes. Nothing here is flattened in memory: a part is read from (and
written to) the parameters' own tensors piece by piece.

:func:`shard_state` and :func:`unshard_state` turn per-parameter optimizer
state (an unsharded optimizer's) into one part's state and back. A state value
is *elementwise* when it has one element per parameter element (Adam's
moments, SGD's momentum) and *replicated* otherwise (Adam's step count), which
every part holds whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from stagewise.errors import CheckpointError

__all__ = ["FlatSpace", "shard_state", "unshard_state"]


class FlatSpace:
    """Trainable parameters of one dtype, end to end, cut into ``parts`` equal parts.

    Args:
        params: the parameters, in the optimizer's order (contiguous tensors).
        parts: how many parts (the data-parallel size).
    """

    def __init__(self, params: Sequence[torch.Tensor], parts: int) -> None:
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self.params = list(params)
        self.offsets: list[int] = []
        total = 0
        for param in self.params:
            if not param.is_contiguous():
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} is not contiguous; ZeRO-1 reads "
                    "and writes parameters as flat ranges: make it contiguous before building "
                    "the engine"
                )
            self.offsets.append(total)
            total += param.numel()
        self.numel = total
        self.parts = parts
        self.part_size = -(-total // parts)  # (numel / parts) rounded up: the last is padded

    def bounds(self, part: int) -> tuple[int, int]:
        """``(lo, hi)`` of ``part`` in the padded index space."""
        return part * self.part_size, (part + 1) * self.part_size

    def segments(self, lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
        """The pieces of parameters inside ``[lo, hi)``: ``(param, start, stop, at)``.

        ``param`` indexes :attr:`params`; ``start:stop`` is the piece in the
        parameter's flat view; ``at`` is where it begins relative to ``lo``.
        Padding past :attr:`numel` belongs to no parameter.
        """
        hi = min(hi, self.numel)
        for index, (param, offset) in enumerate(zip(self.params, self.offsets, strict=True)):
            end = offset + param.numel()
            if end <= lo or param.numel() == 0:
                continue
            if offset >= hi:
                break
            start, stop = max(lo, offset), min(hi, end)
            yield index, start - offset, stop - offset, start - lo

    @torch.no_grad()
    def read(self, tensors: Sequence[torch.Tensor | None], lo: int, out: torch.Tensor) -> None:
        """Copy ``[lo, lo + len(out))`` of ``tensors`` (one per parameter) into ``out``.

        A missing tensor (a parameter without a gradient) and padding read as zeros.
        """
        out.zero_()
        for index, start, stop, at in self.segments(lo, lo + out.numel()):
            tensor = tensors[index]
            if tensor is not None:
                out[at : at + stop - start].copy_(tensor.reshape(-1)[start:stop])

    @torch.no_grad()
    def write(self, values: torch.Tensor, lo: int) -> None:
        """Copy ``values`` into the parameters' elements ``[lo, lo + len(values))``."""
        for index, start, stop, at in self.segments(lo, lo + values.numel()):
            self.params[index].view(-1)[start:stop].copy_(values[at : at + stop - start])


def _elementwise_keys(space: FlatSpace, states: Sequence[dict[str, Any]]) -> set[str]:
    """The state keys with one element per parameter element."""
    keys: set[str] = set()
    all_scalar = all(p.dim() == 0 for p in space.params)
    for param, state in zip(space.params, states, strict=True):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            # With only 0-dim parameters, a 0-dim "step" is the step count.
            if param.dim() > 0 or (all_scalar and key != "step"):
                keys.add(key)
    return keys


def shard_state(
    space: FlatSpace, part: int, states: Sequence[dict[str, Any]], device: torch.device
) -> dict[str, Any]:
    """Part ``part``'s optimizer state from per-parameter states (an unsharded optimizer's).

    Raises:
        CheckpointError: when the parameters of one part do not share their step:
            some have state and others none, or their replicated values differ.
    """
    with_state = [i for i, state in enumerate(states) if state]
    if not with_state:
        return {}
    if len(with_state) != len(states):
        raise CheckpointError(
            f"{len(states) - len(with_state)} of {len(states)} parameters of one ZeRO-1 "
            "param group have no optimizer state in the checkpoint while the others have: "
            "ZeRO-1 steps a group's parameters together; load with load_optimizer_states=False "
            "or without zero_optimization"
        )
    elementwise = _elementwise_keys(space, states)
    lo, hi = space.bounds(part)
    out: dict[str, Any] = {}
    first = states[0]
    for key in first:
        if key in elementwise:
            sample = first[key]
            flat = torch.zeros(hi - lo, dtype=sample.dtype, device=device)
            space.read([state[key] for state in states], lo, flat)
            out[key] = flat
            continue
        value = first[key]
        for index, state in enumerate(states[1:], start=1):
            other = state.get(key)
            same = (
                torch.equal(other, value)
                if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)
                else other == value
            )
            if not same:
                raise CheckpointError(
                    f"optimizer state {key!r} differs between parameters of one ZeRO-1 param "
                    f"group ({value!r} for the first, {other!r} for parameter {index}); ZeRO-1 "
                    "keeps one per group: load with load_optimizer_states=False or without "
                    "zero_optimization"
                )
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def unshard_state(
    space: FlatSpace, full: dict[str, Any], elementwise: set[str]
) -> list[dict[str, Any]]:
    """Per-parameter states from a whole group's state.

    ``full`` holds the ``elementwise`` keys as flat tensors over the padded index
    space (every part's, end to end) and the other keys as every part holds them.
    """
    states: list[dict[str, Any]] = []
    for param, offset in zip(space.params, space.offsets, strict=True):
        state: dict[str, Any] = {}
        for key, value in full.items():
            if key in elementwise:
                state[key] = value[offset : offset + param.numel()].reshape(param.shape).clone()
            else:
                state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        states.append(state)
    return states
