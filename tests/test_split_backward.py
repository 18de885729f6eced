"""Routed linear layers: the same gradients as autograd's, deferred when asked, no history."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stagewise.backward.linear import WeightGradStore, route_linear_weight_grads


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_same_gradients_as_autograd(use_checkpoint: bool) -> None:
    stock, routed = _model(), _model()
    route_linear_weight_grads(routed, WeightGradStore())
    x = torch.randn(2, 5, 4, requires_grad=True)
    grads = []
    for model in (stock, routed):
        x.grad = None
        for _ in range(2):  # accumulation into an existing .grad too
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            out.square().sum().backward()
        grads.append([p.grad for p in model.parameters()] + [x.grad])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)


def test_deferred_until_flush_and_no_autograd_history() -> None:
    model = _model()
    store = WeightGradStore()
    assert route_linear_weight_grads(model, store) == 2
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4, requires_grad=True)
    reference(x).sum().backward()
    out = model(x)
    with store.capturing("mb0"):
        out.sum().backward()
    linear_params = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    assert all(p.grad is None for p in linear_params)  # deferred to W
    assert model[1].weight.grad is not None  # the norm's gradient came at once
    store.flush("mb0")
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        assert got.grad is not None and got.grad.grad_fn is None
        torch.testing.assert_close(got.grad, want.grad)
    assert store.pending == {}


def test_disabled_store_is_plain_linear() -> None:
    model = _model()
    store = WeightGradStore()
    store.enabled = False
    route_linear_weight_grads(model, store)
    out = model(torch.randn(3, 4))
    assert type(out.grad_fn).__name__ != "DeferredLinearBackward"
