"""GPT-2 (``GPT2LMHeadModel``) as pipeline layers.

The layer list for ``n_layer`` blocks::

    TokenEmbedding   transformer.wte      ids (B, T) [+ mask] -> (B, T, C) [+ mask]
    GPT2Positions    transformer.wpe      + learned positions, embedding dropout
    GPT2Layer x n    transformer.h.{i}    transformers' GPT2Block, causal (+ padding) mask
    FinalNorm        transformer.ln_f     (B, T, C) -> (B, T, C)
    head             lm_head              tied to wte, or LMHead when untied -> (B, T, V)

Positions are ``0..T-1`` for every row, as ``GPT2LMHeadModel`` uses them when
it is given no ``position_ids``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stagewise.hf.layers import (
    HFLayer,
    StageValue,
    attention_bias,
    join_stage_value,
    split_stage_value,
)
from stagewise.hf.weights import WeightSource

__all__ = ["GPT2Layer", "GPT2Positions"]


class GPT2Positions(HFLayer):
    """Adds GPT-2's learned position embeddings, then embedding dropout: ``(B, T, C)``.

    ``T`` must not exceed ``config.n_positions``.
    """

    local_name = "wpe"

    def __init__(
        self,
        config: Any,
        hf_prefix: str = "transformer.wpe.",
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(config, hf_prefix)
        positions, width = int(config.max_position_embeddings), int(config.hidden_size)
        self.max_positions = positions
        self.wpe = self._load(lambda: nn.Embedding(positions, width), config, weights, dtype)
        self.drop = nn.Dropout(float(config.embd_pdrop))

    def forward(self, x: Any) -> StageValue:
        """``(B, T, C)`` [+ mask] -> ``(B, T, C)`` [+ mask]."""
        hidden, mask = split_stage_value(x, "GPT2Positions")
        seq_len = hidden.size(1)
        if seq_len > self.max_positions:
            raise ValueError(
                f"sequence length {seq_len} exceeds the model's n_positions "
                f"({self.max_positions}); crop the input to at most {self.max_positions} tokens"
            )
        pos = torch.arange(seq_len, device=hidden.device).unsqueeze(0)  # (1, T)
        hidden = self.drop(hidden + self.wpe(pos))  # (B, T, C) + (1, T, C)
        return join_stage_value(hidden, mask)


class GPT2Layer(HFLayer):
    """One ``transformers`` ``GPT2Block``: ``(B, T, C)`` [+ mask] -> the same.

    Args:
        config: the ``GPT2Config`` (its ``_attn_implementation``: ``"sdpa"`` or ``"eager"``).
        layer_idx: the block's index ``i`` (``transformer.h.{i}``).
        weights, dtype: as for :class:`~stagewise.hf.layers.HFLayer`.
    """

    local_name = "block"

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(config, f"transformer.h.{layer_idx}.")
        block_cls = self.arch.block_class()
        self.layer_idx = layer_idx
        self.attn_implementation = str(config._attn_implementation)
        self.block = self._load(
            lambda: block_cls(config, layer_idx=layer_idx), config, weights, dtype
        )

    def forward(self, x: Any) -> StageValue:
        """``(B, T, C)`` [+ mask (B, T)] -> ``(B, T, C)`` [+ mask]."""
        hidden, mask = split_stage_value(x, "GPT2Layer")
        bias = attention_bias(
            mask, hidden.size(1), hidden.dtype, hidden.device, self.attn_implementation
        )  # (B, 1, T, T) or None
        out = self.block(hidden, attention_mask=bias)
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T, C)
        return join_stage_value(hidden, mask)
