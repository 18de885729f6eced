"""The GPT as layer specs, and the one-process reference built from any spec list."""

from __future__ import annotations

import itertools
import math
import pickle
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.models import (
    DEMO_CONFIG,
    DEMO_TRAINING,
    GPT,
    GPTConfig,
    ReferenceModel,
    build_reference,
    generate,
    gpt_head,
    gpt_layer_specs,
    gpt_loss,
    seed_everything,
)
from stagewise.models.gpt import Block, FinalNorm, GPTEmbedding
from stagewise.spec import LayerSpec, TiedLayerSpec

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _ids(batch: int = 3, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed)
    )


def test_specs_layout() -> None:
    specs = gpt_layer_specs(TINY)
    assert len(specs) == TINY.n_layer + 3
    first, last = specs[0], specs[-1]
    assert isinstance(first, TiedLayerSpec) and isinstance(last, TiedLayerSpec)
    assert first.key == last.key == "embed"
    assert first.typename is last.typename is GPTEmbedding
    assert first.forward_fn is None and last.forward_fn is gpt_head
    assert last.tied_weight_attr == ["wte.weight"]
    assert [s.typename for s in specs[1:-1]] == [Block] * TINY.n_layer + [FinalNorm]


def test_specs_pickle_for_spawned_processes() -> None:
    specs = pickle.loads(pickle.dumps(gpt_layer_specs(TINY)))
    assert specs[-1].forward_fn is gpt_head


def test_tied_embedding_is_one_parameter() -> None:
    model = GPT(TINY)
    embed = model.tied_modules["embed"]
    assert isinstance(embed, GPTEmbedding)
    wte = embed.wte.weight
    assert sum(p is wte for p in model.parameters()) == 1
    names = [name for name, _ in model.named_parameters()]
    assert names.count("tied_modules.embed.wte.weight") == 1
    assert not any(name.startswith(str(len(model) - 1) + ".") for name in names)
    v, c, t, n = TINY.vocab_size, TINY.n_embd, TINY.block_size, TINY.n_layer
    block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    assert model.num_parameters() == v * c + t * c + n * block + 2 * c


def test_head_uses_token_embedding_and_both_ends_get_gradient() -> None:
    model = GPT(TINY)
    ids = _ids() % 5  # tokens 5.. never appear in the input
    embed = model.tied_modules["embed"]
    assert isinstance(embed, GPTEmbedding)
    x = embed(ids)
    for i in range(1, TINY.n_layer + 2):
        x = getattr(model, str(i))(x)
    torch.testing.assert_close(model(ids), x @ embed.wte.weight.T)
    # The gradient of the tied weight sums both uses: input rows and the output head.
    model(ids).sum().backward()
    grad = embed.wte.weight.grad
    assert grad is not None
    assert grad[5:].abs().sum() > 0  # rows only the output head uses


def test_forward_shape_and_causality() -> None:
    model = GPT(TINY).eval()
    ids = _ids()
    logits = model(ids)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])


def test_seeded_build_is_deterministic_and_per_layer() -> None:
    a, b = GPT(TINY), GPT(TINY)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    c = GPT(TINY, base_seed=99)
    assert not torch.equal(
        a.state_dict()["1.attn.c_attn.weight"], c.state_dict()["1.attn.c_attn.weight"]
    )
    # Layer i depends only on base_seed + i: a stage that builds layers 2.. alone agrees.
    specs = gpt_layer_specs(TINY)
    for i in range(1, len(specs) - 1):
        seed_everything(1234 + i)
        alone = specs[i].build()
        for name, value in alone.state_dict().items():
            assert torch.equal(value, a.state_dict()[f"{i}.{name}"]), (i, name)
    seed_everything(1234)
    embed = specs[0].build()
    torch.testing.assert_close(embed.state_dict(), a.tied_modules["embed"].state_dict())


def test_init_follows_nanogpt() -> None:
    config = GPTConfig(vocab_size=64, block_size=64, n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    block = Block(config)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    no_bias = Block(GPTConfig(n_embd=32, n_head=2, bias=False))
    assert no_bias.attn.c_attn.bias is None and no_bias.ln_1.bias is None


def test_initial_loss_is_near_uniform() -> None:
    model = GPT(TINY)
    loss = gpt_loss(model(_ids(batch=16)), _ids(batch=16, seed=5))
    assert loss.item() == pytest.approx(math.log(TINY.vocab_size), abs=0.15)


def test_loss_decreases_in_a_few_steps() -> None:
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids(batch=8, seq=TINY.block_size + 1, seed=1)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = gpt_loss(model(inputs), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_loss_ignores_minus_one_and_checks_shapes() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -1], [0, -1, 4]])
    keep = labels.flatten() != -1
    expected = nn.functional.cross_entropy(logits.reshape(-1, 5)[keep], labels.flatten()[keep])
    torch.testing.assert_close(gpt_loss(logits, labels), expected)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) do not match labels \(2, 4\)"):
        gpt_loss(logits, torch.zeros(2, 4, dtype=torch.long))


def test_generate() -> None:
    model = GPT(TINY)
    prompt = _ids(batch=2, seq=3)
    out = generate(model, prompt, 12, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 15) and out.dtype == torch.long
    assert torch.equal(out[:, :3], prompt)
    again = generate(model, prompt, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # past block_size 8: the context is cropped
    greedy = generate(model, prompt, 5, temperature=0.0)
    assert torch.equal(greedy, generate(model, prompt, 5, top_k=1))
    # Any callable works; block_size then has to be given to crop.
    plain = generate(lambda x: model(x), prompt, 5, temperature=0.0, block_size=TINY.block_size)
    assert torch.equal(plain, greedy)
    assert model.training  # restored
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, prompt, 1, temperature=-1.0)


def test_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"GPTConfig\.n_layer must be a positive int, got 0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="sequence length 9 exceeds block_size 8"):
        GPT(TINY)(_ids(seq=9))
    with pytest.raises(TypeError, match="needs a GPTConfig"):
        gpt_layer_specs({"n_layer": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward_fn of a GPTEmbedding"):
        gpt_head(nn.Linear(2, 2), torch.zeros(1, 2))


def test_demo_settings_are_consistent() -> None:
    assert DEMO_CONFIG.vocab_size == 96
    assert DEMO_TRAINING.micro_batches >= 2 and DEMO_TRAINING.steps > 0
    assert len(gpt_layer_specs(DEMO_CONFIG)) == DEMO_CONFIG.n_layer + 3


def test_reference_runs_any_spec_list() -> None:
    torch.manual_seed(0)
    relu = nn.ReLU()
    specs: list[LayerSpec | nn.Module | Callable[..., Any]] = [
        TiedLayerSpec("lin", nn.Linear, 4, 4),
        LayerSpec(nn.Linear, 4, 4),
        relu,
        lambda x: x * 2,
        TiedLayerSpec("lin", nn.Linear, 4, 4, forward_fn=lambda m, x: x @ m.weight),
    ]
    model = build_reference(specs, base_seed=7)
    assert isinstance(model, ReferenceModel) and len(model) == 5
    assert sorted(model.state_dict()) == [
        "1.bias",
        "1.weight",
        "tied_modules.lin.bias",
        "tied_modules.lin.weight",
    ]
    x = torch.randn(2, 4)
    lin, mid = model.tied_modules["lin"], getattr(model, "1")
    assert isinstance(lin, nn.Linear) and isinstance(mid, nn.Linear)
    torch.testing.assert_close(model(x), (relu(mid(lin(x))) * 2) @ lin.weight)
    seed_everything(7 + 1)
    torch.testing.assert_close(mid.weight, nn.Linear(4, 4).weight)


def test_reference_seeds_python_numpy_and_torch() -> None:
    build_reference([LayerSpec(nn.Linear, 2, 2)] * 3, base_seed=40)
    after = (random.random(), np.random.rand(), torch.initial_seed())
    seed_everything(42)  # the last layer's seed
    assert after == (random.random(), np.random.rand(), 42)


def test_reference_rejects_bad_layers() -> None:
    with pytest.raises(TypeError, match="layer 1 is a int"):
        build_reference([nn.ReLU(), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="wrap a single layer in a list"):
        ReferenceModel(LayerSpec(nn.ReLU))  # type: ignore[arg-type]
