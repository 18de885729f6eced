"""Hugging Face causal LMs as pipelines: GPT-2 and the Llama family, from a local directory and back.

Install the extra (``pip install 'stagewise[hf]'``: transformers and safetensors),
then, under ``torchrun --nproc_per_node 2``::

    import stagewise, stagewise.hf

    stagewise.init_distributed()
    model = stagewise.hf.pipeline_module("path/to/model", num_stages=2)
    engine, _, _, _ = stagewise.initialize(model=model, config={
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    loss = engine.train_batch(iter([((input_ids, attention_mask), labels)] * 4))
    engine.save_checkpoint("ckpt")

and back: ``stagewise export --hf ckpt out_dir`` (or :func:`export_hf`) writes a
directory that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads.

Nothing here imports ``transformers`` until it is used, so ``import stagewise.hf``
works without it; the first use raises an ImportError naming the extra.
"""

from __future__ import annotations

from stagewise.hf.architectures import ARCHITECTURES, Architecture
from stagewise.hf.build import METADATA_KEY, HFModel, layer_specs, pipeline_module, resolve
from stagewise.hf.export import export_hf, export_hf_main
from stagewise.hf.gpt2 import GPT2Layer, GPT2Positions
from stagewise.hf.layers import (
    FinalNorm,
    HFLayer,
    LMHead,
    TokenEmbedding,
    attention_bias,
    tied_lm_head,
)
from stagewise.hf.llama import LlamaLayer
from stagewise.hf.loss import IGNORE_INDEX, causal_lm_loss
from stagewise.hf.weights import SafetensorsWeights, StateDictWeights, WeightsError, WeightSource

__all__ = [
    "ARCHITECTURES",
    "IGNORE_INDEX",
    "METADATA_KEY",
    "Architecture",
    "FinalNorm",
    "GPT2Layer",
    "GPT2Positions",
    "HFLayer",
    "HFModel",
    "LMHead",
    "LlamaLayer",
    "SafetensorsWeights",
    "StateDictWeights",
    "TokenEmbedding",
    "WeightSource",
    "WeightsError",
    "attention_bias",
    "causal_lm_loss",
    "export_hf",
    "export_hf_main",
    "layer_specs",
    "pipeline_module",
    "resolve",
    "tied_lm_head",
]
