"""A transformers causal LM as layer specs, and as a PipelineModule.

``source`` is a local model directory (``config.json`` and ``*.safetensors``, as
``save_pretrained`` writes it), a ``PretrainedConfig`` (random weights, seeded
per layer) or a built model (its weights are copied). Each rank builds only its
own layers, and a layer reads only its own tensors from the directory, so no
rank holds the whole model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from stagewise.hf._deps import require
from stagewise.hf.architectures import Architecture, architecture_of
from stagewise.hf.gpt2 import GPT2Layer, GPT2Positions
from stagewise.hf.layers import (
    ATTENTION_IMPLEMENTATIONS,
    FinalNorm,
    HFLayer,
    LMHead,
    TokenEmbedding,
    tied_lm_head,
)
from stagewise.hf.llama import LlamaLayer
from stagewise.hf.loss import causal_lm_loss
from stagewise.hf.weights import SafetensorsWeights, StateDictWeights, WeightSource
from stagewise.module import PipelineModule
from stagewise.spec import LayerSpec, TiedLayerSpec
from stagewise.topology import ProcessTopology

__all__ = ["METADATA_KEY", "HFModel", "layer_specs", "pipeline_module", "resolve"]

#: The key of ``PipelineModule.checkpoint_metadata`` (and of a manifest's "metadata").
METADATA_KEY = "hf"
METADATA_FORMAT = 1
TIED_KEY = "embed"
CONFIG_FILE = "config.json"

Source = str | os.PathLike[str] | Any  # a directory, a PretrainedConfig or a PreTrainedModel


@dataclass
class HFModel:
    """A resolved source: its config, architecture, weights and layer specs.

    Attributes:
        config: a copy of the ``transformers`` config, ``_attn_implementation`` set.
        arch: the supported architecture it is.
        weights: where the tensors are read from (None: random weights).
        where: the source, for messages (a directory, or a description).
        specs: the layer specs, in order.
        hf_prefixes: per layer, ``[state dict prefix, Hugging Face prefix]`` of its
            tensors, or None for a layer without tensors of its own (the tied head).
    """

    config: Any
    arch: Architecture
    weights: WeightSource | None
    where: str
    specs: list[LayerSpec]
    hf_prefixes: list[list[str] | None]

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def metadata(self) -> dict[str, Any]:
        """What export needs, JSON-able: the architecture, config and tensor names."""
        transformers = require("transformers")
        config = json.loads(self.config.to_json_string(use_diff=False))
        return {
            "format": METADATA_FORMAT,
            "architecture": self.arch.causal_lm,
            "model_type": self.arch.model_type,
            "config": config,
            "tie_word_embeddings": self.tied,
            "layers": self.hf_prefixes,
            "transformers_version": transformers.__version__,
        }


def _attn_implementation(config: Any, requested: str | None) -> str:
    if requested is not None:
        choice = requested
    else:
        current = getattr(config, "_attn_implementation", None)
        choice = current if current in ATTENTION_IMPLEMENTATIONS else "sdpa"
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={choice!r} is not supported by stagewise.hf; use one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    return choice


def _read_directory(path: str) -> tuple[Any, str]:
    """The config of a model directory; its architecture is checked before transformers reads it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a directory; pipeline_module takes a local model directory "
            "(written by save_pretrained), a PretrainedConfig or a built model, and never "
            "downloads"
        )
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{path} has no {CONFIG_FILE}; save the model with save_pretrained(DIR), which "
            f"writes {CONFIG_FILE} beside the weights"
        )
    with open(config_file, encoding="utf-8") as handle:
        raw = json.load(handle)

    declared = SimpleNamespace(
        model_type=raw.get("model_type"), architectures=raw.get("architectures")
    )
    architecture_of(declared, config_file)
    transformers = require("transformers")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return config, config_file


def resolve(
    source: Source,
    dtype: torch.dtype | None = torch.float32,
    attn_implementation: str | None = None,
) -> HFModel:
    """Read a source's config (and index its weights) and write its layer specs.

    Raises:
        ValueError: for an unsupported architecture (naming it and the supported ones).
        FileNotFoundError: for a path that is no model directory.
        WeightsError: for a directory without safetensors weights, or whose tensors are
            missing or shaped unlike its config (naming the file and the tensor).
    """
    transformers = require("transformers")
    weights: WeightSource | None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        config, where = _read_directory(path)
        arch = architecture_of(config, where)
        weights = SafetensorsWeights(path, base_prefix=arch.base_prefix)
        where = path
    elif isinstance(source, transformers.PretrainedConfig):
        config, where = source, f"the given {type(source).__name__}"
        arch = architecture_of(config, where)
        weights = None
    elif isinstance(source, nn.Module) and isinstance(
        getattr(source, "config", None), transformers.PretrainedConfig
    ):
        config, where = source.config, f"the given {type(source).__name__}"
        arch = architecture_of(config, where)
        weights = StateDictWeights(source.state_dict(), where, base_prefix=arch.base_prefix)
    else:
        raise TypeError(
            f"pipeline_module takes a model directory, a transformers PretrainedConfig or a "
            f"transformers model, got {type(source).__name__}"
        )
    config = copy.deepcopy(config)
    config._attn_implementation = _attn_implementation(config, attn_implementation)
    specs, prefixes = _layer_specs(config, arch, weights, dtype)
    model = HFModel(config, arch, weights, where, specs, prefixes)
    if weights is not None:
        check_weights(model)
    return model


def _layer_specs(
    config: Any, arch: Architecture, weights: WeightSource | None, dtype: torch.dtype | None
) -> tuple[list[LayerSpec], list[list[str] | None]]:
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embed_prefix = f"{arch.base_prefix}{arch.embed}."
    padding_idx = getattr(config, "pad_token_id", None) if arch.layout == "llama" else None
    embed_args = (config, embed_prefix, weights, dtype)
    specs: list[LayerSpec] = []
    prefixes: list[list[str] | None] = []

    def add(spec: LayerSpec, local: str | None, hf_prefix: str) -> None:
        specs.append(spec)
        prefixes.append(None if local is None else [f"{local}.", hf_prefix])

    if tied:
        first: LayerSpec = TiedLayerSpec(
            TIED_KEY,
            TokenEmbedding,
            *embed_args,
            padding_idx=padding_idx,
            tied_weight_attr="embed.weight",
        )
    else:
        first = LayerSpec(TokenEmbedding, *embed_args, padding_idx=padding_idx)
    add(first, TokenEmbedding.local_name, embed_prefix)
    block_cls: type[HFLayer] = LlamaLayer
    if arch.layout == "gpt2":
        add(
            LayerSpec(GPT2Positions, config, "transformer.wpe.", weights, dtype),
            GPT2Positions.local_name,
            "transformer.wpe.",
        )
        block_cls = GPT2Layer
    for i in range(int(config.num_hidden_layers)):
        add(
            LayerSpec(block_cls, config, i, weights, dtype),
            block_cls.local_name,
            f"{arch.base_prefix}{arch.blocks}.{i}.",
        )
    norm_prefix = f"{arch.base_prefix}{arch.final_norm}."
    add(
        LayerSpec(FinalNorm, config, norm_prefix, weights, dtype), FinalNorm.local_name, norm_prefix
    )
    if tied:
        head: LayerSpec = TiedLayerSpec(
            TIED_KEY,
            TokenEmbedding,
            *embed_args,
            padding_idx=padding_idx,
            forward_fn=tied_lm_head,
            tied_weight_attr="embed.weight",
        )
        add(head, None, "")
    else:
        add(LayerSpec(LMHead, config, "lm_head.", weights, dtype), LMHead.local_name, "lm_head.")
    return specs, prefixes


def expected_tensors(model: HFModel) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{Hugging Face name: (shape, layer index)}`` of every tensor the layers hold.

    The layers are built on the meta device: no memory, nothing read.
    """
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for idx, (spec, prefixes) in enumerate(zip(model.specs, model.hf_prefixes, strict=True)):
        if prefixes is None:
            continue
        with torch.device("meta"):
            layer = spec.build()
        if not isinstance(layer, HFLayer):
            raise TypeError(f"layer {idx} built {type(layer).__name__}, not an HFLayer")
        state = layer.state_dict()
        for key, name in layer.hf_names().items():
            out[name] = (tuple(state[key].shape), idx)
    return out


def check_weights(model: HFModel) -> None:
    """Every tensor the layers need is in the source, with the config's shape.

    Only headers are read. Raises ``WeightsError`` naming the file and the tensor.
    """
    if model.weights is None:
        return
    config_where = (
        os.path.join(model.where, CONFIG_FILE) if os.path.isdir(model.where) else "its config"
    )
    fix = (
        f"the weights do not fit {config_where}: save the model and its config together "
        "(save_pretrained), or correct the config"
    )
    for name, (shape, idx) in expected_tensors(model).items():
        spec = model.specs[idx]
        model.weights.check(name, shape, f"layer {idx}, {spec.typename.__name__}", fix)


def layer_specs(
    source: Source,
    dtype: torch.dtype | None = torch.float32,
    attn_implementation: str | None = None,
) -> list[LayerSpec]:
    """The layer specs of a causal LM (see the module docstring for ``source``).

    Build them in one process with ``stagewise.models.reference.build_reference``,
    or cut them into stages with ``PipelineModule`` (as :func:`pipeline_module` does).
    """
    return resolve(source, dtype, attn_implementation).specs


def pipeline_module(
    source: Source,
    num_stages: int | None = None,
    topology: ProcessTopology | None = None,
    partition_method: str | Sequence[int] = "parameters",
    activation_checkpoint_interval: int = 0,
    *,
    dtype: torch.dtype | None = torch.float32,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PipelineModule:
    """A ``PipelineModule`` of a ``transformers`` causal LM (GPT-2, Llama, Mistral, Qwen2).

    Args:
        source: a local model directory (``config.json`` and ``*.safetensors``, sharded
            or not), a ``PretrainedConfig`` (random weights, seeded per layer) or a
            built model (its weights are copied).
        num_stages, topology, partition_method, activation_checkpoint_interval: as for
            ``PipelineModule``.
        dtype: the floating dtype of the parameters (default float32, for training;
            None keeps the stored dtype).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        **kwargs: passed to ``PipelineModule`` (``loss_fn`` defaults to
            :func:`~stagewise.hf.loss.causal_lm_loss`, ``seed_layers`` to True).

    Batches are ``(input_ids, labels)`` or ``((input_ids, attention_mask), labels)``,
    all ``(B, T)``; labels as ``transformers`` takes them (shifted inside the loss,
    ``-100`` ignored). ``module.checkpoint_metadata["hf"]`` records the config, so
    ``stagewise export --hf`` can write a ``from_pretrained`` directory.
    """
    model = resolve(source, dtype, attn_implementation)
    kwargs.setdefault("loss_fn", causal_lm_loss)
    kwargs.setdefault("seed_layers", True)
    module = PipelineModule(
        layers=model.specs,
        num_stages=num_stages,
        topology=topology,
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        **kwargs,
    )
    module.checkpoint_metadata[METADATA_KEY] = model.metadata()
    return module
