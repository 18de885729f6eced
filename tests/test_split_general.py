"""The general split backward: I computes input gradients only, W every parameter's.

For GPT blocks with attention, embeddings and norms, in fp32, under bf16 autocast
and with activation checkpointing, the gradients of ``I`` then ``W`` equal those
of one whole backward, and ``I`` leaves every parameter's gradient to ``W``.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch import nn

from stagewise.backward import WeightGradStore, checkpoint, input_pass, keeping_recomputed
from stagewise.backward.linear import DeferredLinear, route_linear_weight_grads
from stagewise.models.gpt import Block, FinalNorm, GPTConfig

CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


class Stage(nn.Module):
    """A middle stage of a GPT: positions added, two blocks, the norm, a tied-style head."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(CONFIG.block_size, CONFIG.n_embd)
        self.blocks = nn.Sequential(Block(CONFIG), Block(CONFIG))
        self.norm = FinalNorm(CONFIG)
        self.vocab = nn.Embedding(CONFIG.vocab_size, CONFIG.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.pos(torch.arange(x.shape[1]))  # (B, T, C)
        h = self.norm(self.blocks(h))
        return h @ self.vocab.weight.t()  # (B, T, V)


class Shared(nn.Module):
    """One weight used twice, on both sides of a split: the backward cannot be split."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def _gradients(
    model: nn.Module,
    split: bool,
    bf16: bool = False,
    ckpt: bool = False,
    shape: tuple[int, ...] = (2, 8, CONFIG.n_embd),
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(input gradient, parameter gradients after I, parameter gradients at the end)."""
    torch.manual_seed(1)
    x = torch.randn(*shape).requires_grad_()
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast, keeping_recomputed(split):
        out = checkpoint(model, x) if ckpt else model(x)
    grad = torch.randn(out.shape).to(out.dtype)
    params = list(model.parameters())
    if not split:
        out.backward(grad)
        assert x.grad is not None
        return x.grad, [p.grad for p in params], [p.grad for p in params]
    (input_grad,), weights = input_pass([out], [grad], [x], frozenset(map(id, params)))
    after_input = [p.grad for p in params]
    weights.run()
    assert input_grad is not None
    return input_grad, after_input, [p.grad for p in params]


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_split_equals_whole_backward_on_gpt_blocks(bf16: bool, ckpt: bool) -> None:
    torch.manual_seed(0)
    model = Stage()
    want_x, _, want = _gradients(model, split=False, bf16=bf16, ckpt=ckpt)
    got_x, after_input, got = _gradients(model, split=True, bf16=bf16, ckpt=ckpt)
    assert all(g is None for g in after_input), "I computed a parameter's gradient"
    torch.testing.assert_close(got_x, want_x)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        assert g is not None and w is not None, name
        torch.testing.assert_close(g, w, msg=f"gradient of {name}")


def test_checkpointed_forward_is_recomputed_once_for_both_passes() -> None:
    torch.manual_seed(0)
    model = Stage()
    calls = {"n": 0}

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out: torch.Tensor = model(x)
        return out

    x = torch.randn(2, 8, CONFIG.n_embd).requires_grad_()
    with keeping_recomputed():
        out = checkpoint(counted, x)
    (_,), weights = input_pass(
        [out], [torch.ones_like(out)], [x], frozenset(map(id, model.parameters()))
    )
    weights.run()
    assert calls["n"] == 2  # the forward, and one recomputation for I and W together


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_checkpointed_micro_batches_free_what_they_recomputed(split: bool) -> None:
    # kept recomputed tensors once formed a cycle through autograd's hooks that no
    # collector saw: every split micro-batch leaked its activations
    torch.manual_seed(0)
    model = Stage()
    counts = []
    for _ in range(4):
        _gradients(model, split=split, bf16=True, ckpt=True)
        counts.append(_live_tensors())
    assert counts[-1] == counts[0], f"live tensors grew over micro-batches: {counts}"


def test_without_inputs_the_weight_pass_is_the_whole_backward() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    out = model(torch.tensor([[1, 2, 3]]))
    grads, weights = input_pass([out.sum()], None, [], frozenset(map(id, model.parameters())))
    assert grads == [] and all(p.grad is None for p in model.parameters())
    weights.run()
    assert all(p.grad is not None for p in model.parameters())


def test_a_weight_used_on_both_sides_is_deferred_whole_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stagewise.backward.split._warned", False)
    torch.manual_seed(0)
    model = Shared()
    want_x, _, want = _gradients(model, split=False, shape=(3, 8))
    with caplog.at_level(logging.WARNING, logger="stagewise.backward.split"):
        got_x, after_input, got = _gradients(model, split=True, shape=(3, 8))
    assert "used on both sides of a split" in caplog.text
    assert all(g is None for g in after_input)  # still deferred, through the whole graph
    torch.testing.assert_close(got_x, want_x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_deferred_linears_are_left_to_their_store() -> None:
    torch.manual_seed(0)
    routed = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    plain = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    plain.load_state_dict(routed.state_dict())
    store = WeightGradStore()
    route_linear_weight_grads(routed, store)
    x = torch.randn(5, 4, requires_grad=True)
    plain(x).square().sum().backward()
    want_x = x.grad
    x.grad = None
    out = routed(x).square().sum()
    with store.capturing("mb"):
        (got_x,), weights = input_pass(
            [out], None, [x], frozenset(map(id, routed.parameters())), frozenset({DeferredLinear})
        )
    weights.run()  # the norm
    store.flush("mb")  # the linear layers, in one GEMM each
    torch.testing.assert_close(got_x, want_x)
    for got, want in zip(routed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)
