"""The transformers causal LMs stagewise.hf cuts into stages, and where their parts live.

Two layouts serve them all:

* ``"gpt2"``: learned positions, pre-LayerNorm blocks (``GPT2LMHeadModel``);
* ``"llama"``: rotary positions, RMSNorm decoder layers (``LlamaForCausalLM`` and
  the families that share its decoder layout: ``MistralForCausalLM``,
  ``Qwen2ForCausalLM``).

Each entry names the ``transformers`` classes of one block, its final norm and
its rotary embedding, imported only when a layer is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from stagewise.hf._deps import require

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "supported_list"]


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type`` and the names of its parts."""

    # config.model_type, e.g. "llama".
    model_type: str
    # The causal LM class that from_pretrained builds, e.g. "LlamaForCausalLM".
    causal_lm: str
    # The layout of the layer specs: "gpt2" or "llama".
    layout: str
    # The transformers module holding the classes below.
    module: str
    # The class of one decoder block.
    block: str
    # The class of the final norm ("" for nn.LayerNorm).
    norm: str
    # The class of the rotary embedding ("" when positions are learned).
    rotary: str
    # Prefix of the base model's tensors in the causal LM's state dict.
    base_prefix: str
    # Name of the token embedding below base_prefix.
    embed: str
    # Name of the decoder blocks' list below base_prefix.
    blocks: str
    # Name of the final norm below base_prefix.
    final_norm: str

    def classes(self) -> Any:
        """The imported ``transformers`` module of this architecture."""
        require("transformers")
        return importlib.import_module(self.module)

    def block_class(self) -> Any:
        return getattr(self.classes(), self.block)

    def norm_class(self) -> Any:
        return getattr(self.classes(), self.norm)

    def rotary_class(self) -> Any:
        return getattr(self.classes(), self.rotary)


def _llama_like(model_type: str, prefix: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        causal_lm=f"{prefix}ForCausalLM",
        layout="llama",
        module=f"transformers.models.{model_type}.modeling_{model_type}",
        block=f"{prefix}DecoderLayer",
        norm=f"{prefix}RMSNorm",
        rotary=f"{prefix}RotaryEmbedding",
        base_prefix="model.",
        embed="embed_tokens",
        blocks="layers",
        final_norm="norm",
    )


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        model_type="gpt2",
        causal_lm="GPT2LMHeadModel",
        layout="gpt2",
        module="transformers.models.gpt2.modeling_gpt2",
        block="GPT2Block",
        norm="",
        rotary="",
        base_prefix="transformer.",
        embed="wte",
        blocks="h",
        final_norm="ln_f",
    ),
    "llama": _llama_like("llama", "Llama"),
    "mistral": _llama_like("mistral", "Mistral"),
    "qwen2": _llama_like("qwen2", "Qwen2"),
}


def supported_list() -> str:
    """``"GPT2LMHeadModel (model_type 'gpt2'), ..."`` for error messages."""
    return ", ".join(f"{a.causal_lm} (model_type {a.model_type!r})" for a in ARCHITECTURES.values())


def architecture_of(config: Any, where: str) -> Architecture:
    """The entry for a ``transformers`` config.

    Raises:
        ValueError: for any other architecture, naming it, ``where`` it came from and
            the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    declared = list(getattr(config, "architectures", None) or [])
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        name = declared[0] if declared else "a model"
        raise ValueError(
            f"{where} describes {name} (model_type {model_type!r}), which stagewise.hf does not "
            f"support; it supports {supported_list()}. Use one of those, or write the model's "
            "layer specs yourself (see stagewise.models.gpt)"
        )
    # A head other than the LM head (ForSequenceClassification, ...) has other weights.
    other = [a for a in declared if "For" in a and not a.endswith("ForCausalLM")]
    if other:
        raise ValueError(
            f"{where} describes {other[0]} (model_type {model_type!r}); stagewise.hf builds the "
            f"causal LM {arch.causal_lm} only: load that class's weights (e.g. save "
            f"{arch.causal_lm}.from_pretrained(...) with save_pretrained)"
        )
    if getattr(config, "add_cross_attention", False):
        raise ValueError(
            f"{where} has add_cross_attention=True; stagewise.hf pipelines decoder-only models: "
            "set add_cross_attention=False"
        )
    return arch
