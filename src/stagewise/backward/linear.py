"""Plain linear layers' weight gradients: accumulated in one GEMM, and deferred by a store.

A backward through a linear layer ``y = x W^T + b`` is two matrix products:
``dx = dy W`` (needed upstream at once) and ``dW = dy^T x`` (needed only by the
optimizer). For schedules that split the backward, in fp32, the engine routes
every plain ``nn.Linear`` through :class:`DeferredLinear`
(:func:`route_linear_weight_grads`): its backward computes ``dx`` and hands the
``dW``/``db`` products to a :class:`WeightGradStore`, keyed by the micro-batch
being differentiated; ``W`` runs the stored products. Every other parameter's
gradient is deferred by the general mechanism of :mod:`stagewise.backward.split`,
which leaves these layers to the store.

Outside a deferring block (a whole ``BackwardPass``) the products run at once.
Either way ``dW`` is added to ``.grad`` inside the GEMM (``grad.addmm_(dy^T, x)``)
instead of autograd's "compute ``dW`` into a new tensor, then add it": on one
CPU core that halves the cost of a 1024x1024 layer's weight gradient.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeferredLinear", "WeightGradStore", "route_linear_weight_grads"]


class WeightGradStore:
    """Deferred weight-gradient work, per micro-batch key."""

    def __init__(self) -> None:
        self.pending: dict[Hashable, list[Callable[[], None]]] = {}
        self.current: Hashable | None = None
        # Whether routed linear layers use the store (the engine turns it off under autocast).
        self.enabled = True
        # Last step's weight-gradient tensors, reused by the next step's first product.
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}

    def keep_buffers(self, params: Iterable[torch.Tensor]) -> None:
        """Keep the 2-D gradients of ``params`` to write the next step's into (call it before
        the optimizer sets them to None)."""
        for param in params:
            if param.grad is not None and param.grad.dim() == 2 and param.grad.grad_fn is None:
                self.buffers[param] = param.grad

    def defer(self, work: Callable[[], None]) -> None:
        """Keep ``work`` for the micro-batch being differentiated (run it now outside one)."""
        if self.current is None:
            work()
        else:
            self.pending.setdefault(self.current, []).append(work)

    @contextlib.contextmanager
    def capturing(self, key: Hashable) -> Iterator[None]:
        """Work deferred inside this block belongs to ``key``."""
        self.current = key
        try:
            yield
        finally:
            self.current = None

    def flush(self, key: Hashable) -> None:
        """Run ``key``'s deferred work (its weight gradients), recording no autograd history."""
        with torch.no_grad():
            for work in self.pending.pop(key, ()):
                work()

    def clear(self) -> None:
        self.pending.clear()
        self.current = None


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _accumulate_product(
    param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, store: WeightGradStore
) -> None:
    """``param.grad += a @ b`` inside one GEMM (no temporary the size of the weight).

    The first product of a step goes into the buffer the parameter's gradient had
    last step (:meth:`WeightGradStore.keep_buffers`), when there is one: a fresh
    allocation of that size costs page faults on the critical path.
    """
    if param.grad is None:
        buffer = store.buffers.pop(param, None)
        if (
            buffer is not None
            and buffer.shape == (a.shape[0], b.shape[1])
            and (buffer.dtype == a.dtype == param.dtype)
        ):
            param.grad = torch.mm(a, b, out=buffer)
        else:
            param.grad = a.mm(b).to(param.dtype)
    elif param.grad.dtype == a.dtype:
        param.grad.addmm_(a, b)
    else:
        param.grad.add_(a.mm(b).to(param.grad.dtype))


class DeferredLinear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients go to a store."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        store: WeightGradStore,
    ) -> torch.Tensor:
        # The parameters themselves, not saved tensors: under activation checkpointing a
        # saved tensor comes back as a recomputed alias, and .grad must land on the parameter.
        ctx.save_for_backward(x)
        ctx.weight = weight
        ctx.bias = bias
        ctx.store = store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None  # (..., in)

        def weight_grads() -> None:
            dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
            if weight.requires_grad:
                _accumulate_product(weight, dy.t(), x.reshape(-1, x.shape[-1]), ctx.store)
            if bias is not None and bias.requires_grad:
                _accumulate(bias, dy.sum(0))  # (out,)

        ctx.store.defer(weight_grads)
        return grad_x, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward``, with the weight gradient going through the layer's store."""
    store: WeightGradStore = self.__dict__["_stagewise_grad_store"]
    if store.enabled and torch.is_grad_enabled() and self.weight.requires_grad:
        out: torch.Tensor = DeferredLinear.apply(x, self.weight, self.bias, store)
        return out
    return F.linear(x, self.weight, self.bias)


def route_linear_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Route the weight gradients of every ``nn.Linear`` in ``module`` through ``store``.

    Each plain ``nn.Linear`` (not a subclass, which may have its own forward) gets a
    forward that calls :class:`DeferredLinear` while ``store.enabled``; otherwise it
    is ``F.linear`` as before. Returns how many layers were routed.
    """
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__dict__["_stagewise_grad_store"] = store
            layer.forward = types.MethodType(_linear_forward, layer)  # type: ignore[method-assign]
            count += 1
    return count
