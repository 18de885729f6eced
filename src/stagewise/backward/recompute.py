"""Activation checkpointing that recomputes once per backward, also when it is split.

``checkpoint(function, *args)`` runs ``function`` without keeping the tensors
its backward needs; the first time the backward needs one of them, the
function's forward runs again (with the RNG and autocast state of the first
run) and hands them back. It works when no input needs a gradient (token ids),
as torch's non-reentrant checkpoint does.

The difference is the lifetime of the recomputed tensors. A whole backward
needs each of them once, so each is dropped as soon as it has been used. A
split backward needs some twice: the input-gradient pass (``I``) and, later,
the weight-gradient pass (``W``) both read a linear layer's input. Forwards run
inside :func:`keeping_recomputed` keep every recomputed tensor until the graph
that needs them is freed (after ``W``), so the forward is recomputed once,
not once per pass as with ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from stagewise.errors import PipelineError

__all__ = ["checkpoint", "keeping_recomputed"]

_KEEP = [False]


@contextlib.contextmanager
def keeping_recomputed(keep: bool = True) -> Iterator[None]:
    """Forwards checkpointed inside this block keep their recomputed tensors until their
    graph is freed (for a split backward)."""
    previous, _KEEP[0] = _KEEP[0], keep
    try:
        yield
    finally:
        _KEEP[0] = previous


class _Frame:
    """One checkpointed call: how to run it again, and what it saved the second time."""

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.keep = _KEEP[0]
        self.count = 0
        self.recomputed: list[torch.Tensor | None] | None = None
        self.devices = sorted(
            {a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda}
        )
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.autocast: list[tuple[str, bool, torch.dtype]] = [
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in ("cpu", "cuda")
            if kind == "cpu" or torch.cuda.is_available()
        ]

    def pack(self, _tensor: torch.Tensor) -> tuple[_Frame, int]:
        self.count += 1
        return self, self.count - 1

    def _recompute(self) -> list[torch.Tensor | None]:
        saved: list[torch.Tensor] = []

        def collect(tensor: torch.Tensor) -> int:
            saved.append(tensor)
            return len(saved) - 1

        def refuse(_index: int) -> torch.Tensor:
            raise PipelineError("a checkpointed function ran a backward while recomputing")

        args = tuple(
            a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in self.args
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self.devices))
            torch.set_rng_state(self.cpu_rng)
            for device, state in zip(self.devices, self.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, device)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(collect, refuse))
            self.function(*args)
        # The recompute's graph holds ``collect`` (its pack hook), which holds
        # ``saved``: handing out the list itself would close a cycle through autograd
        # (tensor -> grad_fn -> hook -> list -> tensor) that no collector sees, and
        # every micro-batch whose tensors are kept would leak. Detached copies of the
        # references break it and let the recompute's graph go at once.
        recomputed: list[torch.Tensor | None] = [t.detach() for t in saved]
        saved.clear()
        if len(recomputed) != self.count:
            name = getattr(self.function, "__qualname__", repr(self.function))
            raise PipelineError(
                f"the checkpointed layers {name} saved {self.count} tensors for the backward "
                f"in their forward but {len(recomputed)} when recomputed: they must run the same "
                "operations every time (no data-dependent control flow under checkpointing)"
            )
        return recomputed

    def unpack(self, index: int) -> torch.Tensor:
        if self.recomputed is None:
            self.recomputed = self._recompute()
        tensor = self.recomputed[index]
        if tensor is None:
            raise PipelineError(
                "a checkpointed tensor was needed a second time after it was dropped; run "
                "forwards whose backward is split inside keeping_recomputed()"
            )
        if not self.keep:
            self.recomputed[index] = None
        return tensor


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` keeping only its inputs; recompute the rest in the backward."""
    if not torch.is_grad_enabled():
        return function(*args)
    frame = _Frame(function, args)
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, lambda h: h[0].unpack(h[1])):
        return function(*args)
