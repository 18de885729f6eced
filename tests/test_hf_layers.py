"""stagewise.hf's layers in one process: built models, random configs, masks, the reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import stagewise.hf
from hf_cases import CONFIGS, batches, hf_model, make_model_dir, reference_logits
from stagewise.hf import WeightsError, attention_bias, causal_lm_loss, layer_specs
from stagewise.hf.weights import SafetensorsWeights, parameters_on_meta
from stagewise.models.reference import build_reference


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_built_model_source_copies_its_weights(tmp_path: Path, name: str) -> None:
    model = hf_model(make_model_dir(name, tmp_path / "model"))
    pipeline = build_reference(layer_specs(model)).eval()
    data = batches(0, 2, 1, 0, padded=True)
    for (inputs, _), want in zip(data, reference_logits(model, data), strict=True):
        with torch.no_grad():
            torch.testing.assert_close(pipeline(inputs), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a copy: training the pipeline leaves the given model alone
        next(pipeline.parameters()).add_(1.0)
    for (inputs, _), want in zip(data, reference_logits(model, data), strict=True):
        with torch.no_grad():
            assert not torch.allclose(pipeline(inputs), want)


def test_config_source_is_seeded_per_layer_and_initialised_like_transformers() -> None:
    config = CONFIGS["llama"](initializer_range=0.05)
    first = build_reference(layer_specs(config), base_seed=7).state_dict()
    second = build_reference(layer_specs(config), base_seed=7).state_dict()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
    q_proj = first["1.layer.self_attn.q_proj.weight"]
    assert abs(float(q_proj.std()) - 0.05) < 0.01
    assert torch.equal(first["1.layer.input_layernorm.weight"], torch.ones(32))
    gpt2 = build_reference(layer_specs(CONFIGS["gpt2"]())).state_dict()
    # GPT-2's residual projections shrink with depth: std 0.02 / sqrt(2 * n_layer).
    assert abs(float(gpt2["2.block.attn.c_proj.weight"].std()) - 0.01) < 0.003
    assert float(gpt2["2.block.attn.c_proj.bias"].abs().max()) == 0.0


def test_attention_bias_causal_window_and_padding() -> None:
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    allowed = attention_bias(mask, 4, torch.float32, torch.device("cpu"), "sdpa", 2)
    assert allowed is not None
    expected_row0 = torch.tensor(
        [
            [False] * 4,
            [False, True, False, False],
            [False, True, True, False],
            [False, False, True, True],
        ]
    )
    assert torch.equal(allowed[0, 0], expected_row0)
    assert torch.equal(allowed[1, 0, 3], torch.tensor([False, False, True, False]))
    # No padding and no window in reach: SDPA's own is_causal does it.
    assert attention_bias(torch.ones(2, 4), 4, torch.float32, torch.device("cpu"), "sdpa") is None
    eager = attention_bias(None, 3, torch.float32, torch.device("cpu"), "eager")
    assert eager is not None and eager.shape == (1, 1, 3, 3)
    assert eager[0, 0, 0, 1] == torch.finfo(torch.float32).min and eager[0, 0, 1, 0] == 0


def test_causal_lm_loss_shifts_and_ignores() -> None:
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, -100]])
    # Position t predicts labels[t + 1]: pairs (0,2) (1,3) (2,4) and (4,1); -100 counts never.
    rows = torch.stack([logits[0, 0], logits[0, 1], logits[0, 2], logits[1, 0]])
    want = nn.functional.cross_entropy(rows, torch.tensor([2, 3, 4, 1]))
    torch.testing.assert_close(causal_lm_loss(logits, labels), want)
    with pytest.raises(ValueError, match=r"logits \(2, 4, 5\) do not match labels \(2, 3\)"):
        causal_lm_loss(logits, labels[:, :3])


def test_parameters_on_meta_builds_nothing_and_restores_registration() -> None:
    with pytest.raises(RuntimeError, match="boom"), parameters_on_meta():
        layer = nn.Linear(4, 4)
        assert layer.weight.is_meta
        raise RuntimeError("boom")
    assert not nn.Linear(4, 4).weight.is_meta


def test_reader_reads_only_what_is_asked_and_names_torn_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.tensor([True, False]),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = SafetensorsWeights(tmp_path)
    assert weights.names() == {"a", "b", "c"}
    assert weights.stored_shape("a") == (2, 3)
    got = weights.read({"x": "b", "y": "a"}, dtype=torch.float32)
    assert got["x"].dtype == torch.float32 and got["x"].tolist() == [1.5, -2.0]
    assert torch.equal(got["y"], tensors["a"])
    assert torch.equal(weights.read({"c": "c"})["c"], tensors["c"])
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises(WeightsError, match=r"tensor '.' in .*model.safetensors has byte range"):
        SafetensorsWeights(tmp_path)
    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(WeightsError, match=r"has dtype 'C64', which stagewise.hf cannot read"):
        SafetensorsWeights(tmp_path)


def test_supported_architectures_are_listed() -> None:
    assert sorted(stagewise.hf.ARCHITECTURES) == ["gpt2", "llama", "mistral", "qwen2"]
