"""stagewise.hf's errors name the file, the tensor or the architecture, and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stagewise.hf
from hf_cases import CONFIGS, make_model_dir
from stagewise.errors import CheckpointError
from stagewise.hf import WeightsError, export_hf, pipeline_module


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    from transformers import BertConfig, GPT2Config

    BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    listed = r"supports GPT2LMHeadModel \(model_type 'gpt2'\), LlamaForCausalLM .*Qwen2ForCausalLM"
    with pytest.raises(
        ValueError, match=rf"config.json describes a model \(model_type 'bert'\).*{listed}"
    ):
        pipeline_module(tmp_path, num_stages=1)
    with pytest.raises(ValueError, match=rf"BertConfig describes a model .*'bert'.*{listed}"):
        pipeline_module(BertConfig(), num_stages=1)
    classifier = GPT2Config(architectures=["GPT2ForSequenceClassification"])
    with pytest.raises(
        ValueError, match=r"GPT2ForSequenceClassification .*causal LM GPT2LMHeadModel"
    ):
        pipeline_module(classifier, num_stages=1)


def test_directory_without_weights(tmp_path: Path) -> None:
    CONFIGS["llama"]().save_pretrained(tmp_path)
    with pytest.raises(
        WeightsError, match=rf"{tmp_path} holds no weights \(no \*.safetensors.*save_pretrained"
    ):
        pipeline_module(tmp_path, num_stages=1)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        WeightsError, match=r"holds pytorch_model.bin but no \*.safetensors.*reads safetensors only"
    ):
        pipeline_module(tmp_path, num_stages=1)
    with pytest.raises(FileNotFoundError, match=r"has no config.json; save the model"):
        pipeline_module(tmp_path / "..", num_stages=1)
    with pytest.raises(FileNotFoundError, match=r"is not a directory.*never downloads"):
        pipeline_module(tmp_path / "gpt2-from-the-hub", num_stages=1)


def _edit_config(directory: str, **changes: object) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    model_dir = make_model_dir("llama", tmp_path / "model")
    _edit_config(model_dir, intermediate_size=128)
    with pytest.raises(
        WeightsError,
        match=(
            r"tensor 'model.layers.0.mlp.gate_proj.weight' in .*model.safetensors has shape "
            r"\(64, 32\) but the config makes it \(128, 32\) \(layer 1, LlamaLayer\); the "
            r"weights do not fit .*config.json: save the model and its config together"
        ),
    ):
        pipeline_module(model_dir, num_stages=1)
    _edit_config(model_dir, intermediate_size=64, num_hidden_layers=3)
    with pytest.raises(
        WeightsError,
        match=r"has no tensor 'model.layers.2.self_attn.q_proj.weight' \(needed by layer 3, LlamaLayer\)",
    ):
        pipeline_module(model_dir, num_stages=1)


def test_sharded_index_naming_a_missing_file(tmp_path: Path) -> None:
    model_dir = make_model_dir("gpt2", tmp_path / "model", shard_size="30KB")
    shard = sorted(Path(model_dir).glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"maps tensor .* to {shard.name}, which is missing"):
        pipeline_module(model_dir, num_stages=1)


def test_attention_implementation_must_be_sdpa_or_eager(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"attn_implementation='flash_attention_2' is not supported"
    ):
        pipeline_module(CONFIGS["gpt2"](), num_stages=1, attn_implementation="flash_attention_2")


def test_export_needs_a_stagewise_hf_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist"):
        export_hf(tmp_path / "nothing", tmp_path / "out")
    tag = tmp_path / "ckpt" / "global_step1"
    tag.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step1")
    (tag / "manifest.json").write_text(json.dumps({"format": "stagewise-checkpoint"}))
    with pytest.raises(CheckpointError, match=r"records no Hugging Face model.*pipeline_module"):
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert stagewise.hf.export_hf_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1


def test_stagewise_imports_without_transformers(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None  # as if it were not installed\n"
        "import stagewise, stagewise.hf\n"
        "try:\n"
        "    stagewise.hf.pipeline_module('model', num_stages=1)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "stagewise.hf needs the 'transformers' package" in proc.stdout
    assert "pip install 'stagewise[hf]'" in proc.stdout
