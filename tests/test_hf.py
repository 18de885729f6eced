"""stagewise.hf over real processes: logits, training and export against transformers itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import stagewise.hf
from distributed import run_distributed
from hf_cases import (
    batches,
    hf_model,
    make_model_dir,
    pipeline_logits,
    pipeline_train,
    reference_logits,
    reference_train,
    tensors_read,
)
from stagewise.cli import main as cli_main

pytestmark = pytest.mark.slow


def _last(results: list[Any]) -> Any:
    return results[-1]


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logits_equal_transformers(tmp_path: Path, name: str, stages: int) -> None:
    model_dir = make_model_dir(name, tmp_path / "model")
    case = {"stages": stages}
    results = run_distributed(pipeline_logits, stages, model_dir, case, timeout=180)
    reference = hf_model(model_dir)
    for padded in (False, True):
        data = batches(0, 2, 1, 0, padded)
        want = reference_logits(reference, data)
        loss, logits = _last(results)[padded]
        assert len(logits) == len(want)
        for got, expected in zip(logits, want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        losses = []
        for inputs, labels in data:
            ids, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
            with torch.no_grad():
                losses.append(reference(ids, attention_mask=mask, labels=labels).loss)
        torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_rank_reads_only_its_own_layers(tmp_path: Path, name: str) -> None:
    model_dir = make_model_dir(name, tmp_path / "model")
    results = run_distributed(tensors_read, 2, model_dir, timeout=120)
    everything = set(_safetensors(tmp_path / "model"))
    for result in results:
        assert len(result["read"]) == len(set(result["read"]))  # each tensor once
        assert set(result["read"]) == result["held"]
        assert len(result["held"]) < len(everything)
    # Together the stages read the whole model (GPT-2's tied embedding on both ends).
    assert set(results[0]["read"]) | set(results[1]["read"]) == everything


@pytest.mark.parametrize("name", ["mistral", "qwen2", "llama_tied"])
def test_llama_family_logits_with_sliding_windows(tmp_path: Path, name: str) -> None:
    # Mistral: every layer slides a window of 3 over 7 tokens; Qwen2: only layers >= 1.
    model_dir = make_model_dir(name, tmp_path / "model")
    results = run_distributed(pipeline_logits, 2, model_dir, {"stages": 2}, timeout=180)
    reference = hf_model(model_dir)
    for padded in (False, True):
        want = reference_logits(reference, batches(0, 2, 1, 0, padded))
        for got, expected in zip(_last(results)[padded][1], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "dp", "ckpt_interval"),
    [("gpt2", 1, 0), ("gpt2", 2, 0), ("llama", 1, 0), ("llama", 2, 0), ("llama", 1, 1)],
    ids=[
        "tied-2stages",
        "tied-2stages-2dp",
        "untied-2stages",
        "untied-2stages-2dp",
        "untied-2stages-activation-checkpointing",
    ],
)
def test_training_losses_equal_transformers(
    tmp_path: Path, name: str, dp: int, ckpt_interval: int
) -> None:
    model_dir = make_model_dir(name, tmp_path / "model")
    case = {"stages": 2, "dp": dp, "steps": 5, "micro_batches": 2, "ckpt_interval": ckpt_interval}
    results = run_distributed(pipeline_train, 2 * dp, model_dir, case, timeout=240)
    want = torch.tensor(reference_train(model_dir, case))
    for result in results:
        torch.testing.assert_close(torch.tensor(result["losses"]), want, rtol=1e-5, atol=0.0)


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_save_pretrained_round_trips_bit_for_bit(tmp_path: Path, name: str) -> None:
    # A sharded source (index + several files), loaded on 2 stages, saved untrained, exported.
    model_dir = make_model_dir(name, tmp_path / "model", shard_size="30KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    ckpt = tmp_path / "ckpt"
    case = {"stages": 2, "steps": 0, "save": str(ckpt)}
    run_distributed(pipeline_train, 2, model_dir, case, timeout=180)
    manifest = json.loads(next(ckpt.glob("*/manifest.json")).read_text())
    assert manifest["metadata"]["hf"]["model_type"] == name
    out = tmp_path / "exported"
    assert cli_main(["export", "--hf", str(ckpt), str(out), "--max-shard-size", "40KB"]) == 0
    original, exported = _safetensors(tmp_path / "model"), _safetensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), f"{key} differs"
    assert (out / "model.safetensors.index.json").is_file()


def test_export_after_training_on_four_stages_loads_with_from_pretrained(tmp_path: Path) -> None:
    model_dir = make_model_dir("llama_tied", tmp_path / "model")
    ckpt = tmp_path / "ckpt"
    case = {"stages": 4, "steps": 2, "save": str(ckpt)}
    results = run_distributed(pipeline_train, 4, model_dir, case, timeout=240)
    out = stagewise.hf.export_hf(ckpt, tmp_path / "exported")
    assert out == os.fspath(tmp_path / "exported")
    model = hf_model(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    want = reference_logits(model, batches(99, 2, 1, 0, True))
    for got, expected in zip(_last(results)["eval"][1], want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The trained weights differ from the starting ones (the export is not the source).
    start = _safetensors(tmp_path / "model")["model.embed_tokens.weight"]
    assert not torch.equal(_safetensors(Path(out))["model.embed_tokens.weight"], start)
