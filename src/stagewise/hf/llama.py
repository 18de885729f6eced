"""Llama and the families sharing its decoder layout (Mistral, Qwen2) as pipeline layers.

The layer list for ``num_hidden_layers`` decoder layers::

    TokenEmbedding   model.embed_tokens    ids (B, T) [+ mask] -> (B, T, C) [+ mask]
    LlamaLayer x n   model.layers.{i}      the family's DecoderLayer with its rotary
                                           positions and causal (+ window, + padding) mask
    FinalNorm        model.norm            RMSNorm, (B, T, C) -> (B, T, C)
    head             lm_head               LMHead, or tied to embed_tokens -> (B, T, V)

Each :class:`LlamaLayer` computes the rotary ``cos``/``sin`` of positions
``0..T-1`` itself (what the model computes once and hands every layer), so only
the hidden state and the padding mask travel between stages. Sliding-window
attention (Mistral's ``sliding_window``, Qwen2's ``layer_types``) is part of the
mask each layer builds.
"""

from __future__ import annotations

from typing import Any

import torch

from stagewise.hf.layers import (
    HFLayer,
    StageValue,
    attention_bias,
    join_stage_value,
    split_stage_value,
)
from stagewise.hf.weights import WeightSource

__all__ = ["LlamaLayer", "sliding_window_of"]


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The attention window of decoder layer ``layer_idx`` (None: full causal attention).

    With ``config.layer_types`` (Qwen2, recent Mistral) a layer of type
    ``"sliding_attention"`` gets ``config.sliding_window``; without it, every layer
    does when the config has a ``sliding_window`` (Mistral).
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if layer_types[layer_idx] != "sliding_attention":
            return None
    if window is None:
        return None
    return int(window)


class LlamaLayer(HFLayer):
    """One decoder layer of the Llama family: ``(B, T, C)`` [+ mask (B, T)] -> the same.

    Args:
        config: a ``LlamaConfig``, ``MistralConfig`` or ``Qwen2Config`` (its
            ``_attn_implementation``: ``"sdpa"`` or ``"eager"``).
        layer_idx: the layer's index ``i`` (``model.layers.{i}``).
        weights, dtype: as for :class:`~stagewise.hf.layers.HFLayer`.
    """

    local_name = "layer"

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(config, f"model.layers.{layer_idx}.")
        block_cls = self.arch.block_class()
        self.layer_idx = layer_idx
        self.attn_implementation = str(config._attn_implementation)
        self.sliding_window = sliding_window_of(config, layer_idx)
        self.layer = self._load(lambda: block_cls(config, layer_idx), config, weights, dtype)
        # Rotary frequencies are buffers computed from the config (not in the checkpoint).
        self.rotary = self.arch.rotary_class()(config=config)

    def forward(self, x: Any) -> StageValue:
        """``(B, T, C)`` [+ mask (B, T)] -> ``(B, T, C)`` [+ mask]."""
        hidden, mask = split_stage_value(x, "LlamaLayer")
        seq_len = hidden.size(1)
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)  # (1, T)
        cos_sin = self.rotary(hidden, position_ids)  # 2 x (1, T, head_dim)
        bias = attention_bias(
            mask,
            seq_len,
            hidden.dtype,
            hidden.device,
            self.attn_implementation,
            self.sliding_window,
        )  # (B, 1, T, T) or None
        out = self.layer(
            hidden,
            attention_mask=bias,
            position_ids=position_ids,
            position_embeddings=cos_sin,
        )
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T, C)
        return join_stage_value(hidden, mask)
