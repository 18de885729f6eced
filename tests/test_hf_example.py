"""examples/finetune_hf.py under torchrun on a tiny random GPT-2 with a byte-level tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_cases import CONFIGS
from stagewise.data import embedded_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_hf.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def byte_level_tokenizer() -> Any:
    """A tokenizer of the 256 byte symbols plus an end-of-text token, built without download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_hf", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_fallback_and_its_vocabulary_check() -> None:
    example = _example()
    tokens = example.encode_text("héllo", None, vocab_size=256)
    assert tokens.tolist() == list("héllo".encode())
    with pytest.raises(ValueError, match=r"vocab_size is 61; byte-level fallback needs"):
        example.encode_text("hello", None, vocab_size=61)


@pytest.mark.slow
def test_finetune_example_under_torchrun(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = byte_level_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. Ünïcode survives: ✓."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    config = CONFIGS["gpt2"](vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_text()[1][:20000], encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(EXAMPLE), str(model_dir), str(corpus), "--out", str(out), "--steps", "4",
            "--seq-len", "16", "--micro-batch-size", "2", "--micro-batches", "2",
            "--lr", "3e-3", "--save-every", "2", "--val-batches", "2",
        ],
        capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fine-tuning: 100%" in proc.stderr  # the progress bar reached the end
    results = json.loads((out / "losses.json").read_text())
    assert len(results["train"]) == 4 and all(v == v for v in results["train"])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert (out / "checkpoints" / "global_step2" / "manifest.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    reloaded = AutoTokenizer.from_pretrained(out / "hf")
    ids = reloaded("fox", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.size(1), len(tokenizer))
