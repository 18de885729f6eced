"""stagewise.hf over real processes: logits, training and export against transformers itself.

One pipeline run per (model, stage count) serves several tests (``_run`` caches it):
on 1, 2 and 4 stages it evaluates; on 2 stages it reads a sharded directory and
saves the untrained model (the bit-for-bit round trip); on 4 stages it then trains
two steps and saves (export after training).
"""

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
    pipeline_run,
    pipeline_train,
    reference_logits,
    reference_train,
)
from stagewise.cli import main as cli_main

pytestmark = pytest.mark.slow

_RUNS: dict[tuple[str, int], tuple[Path, list[Any]]] = {}


def _run(name: str, stages: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """``(directory, the last rank's result)`` of ``pipeline_run`` (see the module docstring)."""
    if (name, stages) not in _RUNS:
        root = tmp_path_factory.mktemp(f"{name}-{stages}stages")
        make_model_dir(name, root / "model", shard_size="30KB" if stages == 2 else None)
        case: dict[str, Any] = {"stages": stages}
        if stages == 2:
            case["save"] = str(root / "ckpt")
        if stages == 4:
            case.update(train_steps=2, trained_save=str(root / "trained"))
        results = run_distributed(pipeline_run, stages, str(root / "model"), case, timeout=240)
        _RUNS[name, stages] = (root, results)
    return _RUNS[name, stages]


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logits_equal_transformers(
    tmp_path_factory: pytest.TempPathFactory, name: str, stages: int
) -> None:
    root, results = _run(name, stages, tmp_path_factory)
    reference = hf_model(str(root / "model"))
    for padded in (False, True):
        data = batches(0, 2, 1, 0, padded)
        want = reference_logits(reference, data)
        loss, logits = results[-1][padded]
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
def test_each_rank_reads_only_its_own_layers(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    root, results = _run(name, 2, tmp_path_factory)
    assert (root / "model" / "model.safetensors.index.json").is_file()  # sharded
    everything = set(_safetensors(root / "model"))
    for result in results:
        assert len(result["read"]) == len(set(result["read"]))  # each tensor once
        assert set(result["read"]) == result["held"]
        assert len(result["held"]) < len(everything)
    # Together the stages read the whole model (GPT-2's tied embedding on both ends).
    assert set(results[0]["read"]) | set(results[1]["read"]) == everything


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_save_pretrained_round_trips_bit_for_bit(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    # A sharded source (index + several files), loaded on 2 stages, saved untrained, exported.
    root, _ = _run(name, 2, tmp_path_factory)
    manifest = json.loads(next((root / "ckpt").glob("*/manifest.json")).read_text())
    assert manifest["metadata"]["hf"]["model_type"] == name
    out = root / "exported"
    args = ["export", "--hf", str(root / "ckpt"), str(out), "--max-shard-size", "40KB"]
    assert cli_main(args) == 0
    original, exported = _safetensors(root / "model"), _safetensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), f"{key} differs"
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    ("name", "cls"), [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")]
)
def test_export_after_training_on_four_stages_loads_with_from_pretrained(
    tmp_path_factory: pytest.TempPathFactory, name: str, cls: str
) -> None:
    root, results = _run(name, 4, tmp_path_factory)
    out = stagewise.hf.export_hf(root / "trained", root / "exported")
    assert out == os.fspath(root / "exported")
    model = hf_model(out)
    assert type(model).__name__ == cls
    assert model.config.tie_word_embeddings == (name == "gpt2")
    want = reference_logits(model, batches(99, 2, 1, 0, True))
    for got, expected in zip(results[-1]["trained"][1], want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The trained weights differ from the starting ones (the export is not the source).
    start, trained = _safetensors(root / "model"), _safetensors(Path(out))
    assert sorted(start) == sorted(trained)
    assert not any(
        torch.equal(trained[key], value)
        for key, value in start.items()
        if key.endswith("q_proj.weight") or key.endswith("c_attn.weight")
    )


@pytest.mark.parametrize("name", ["mistral", "qwen2", "llama_tied"])
def test_llama_family_logits_with_sliding_windows(tmp_path: Path, name: str) -> None:
    # Mistral: every layer slides a window of 3 over 7 tokens; Qwen2: only layers >= 1.
    model_dir = make_model_dir(name, tmp_path / "model")
    results = run_distributed(pipeline_run, 2, model_dir, {"stages": 2}, timeout=180)
    reference = hf_model(model_dir)
    for padded in (False, True):
        want = reference_logits(reference, batches(0, 2, 1, 0, padded))
        for got, expected in zip(results[-1][padded][1], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "dp", "ckpt_interval"),
    [("gpt2", 1, 0), ("gpt2", 2, 0), ("llama", 1, 1), ("llama", 2, 0)],
    ids=[
        "tied-2stages",
        "tied-2stages-2dp",
        "untied-2stages-activation-checkpointing",
        "untied-2stages-2dp",
    ],
)
def test_training_losses_equal_transformers(
    tmp_path: Path, name: str, dp: int, ckpt_interval: int
) -> None:
    model_dir = make_model_dir(name, tmp_path / "model")
    case = {"stages": 2, "dp": dp, "steps": 5, "micro_batches": 2, "ckpt_interval": ckpt_interval}
    results = run_distributed(pipeline_train, 2 * dp, model_dir, case, timeout=240)
    want = torch.tensor(reference_train(model_dir, case))
    for losses in results:
        torch.testing.assert_close(torch.tensor(losses), want, rtol=1e-5, atol=0.0)
