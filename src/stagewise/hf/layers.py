"""The layers every supported causal LM shares: token embedding, final norm, LM head.

What passes between layers (and so between stages) is the hidden state
``(B, T, C)``, followed by the padding mask ``(B, T)`` (bool or int, 1 = a real
token) when the batch has one::

    input_ids (B, T)            or (input_ids (B, T), attention_mask (B, T))
    -> TokenEmbedding ->  hidden (B, T, C)  or (hidden (B, T, C), attention_mask (B, T))
    -> blocks (each builds its causal mask from the padding mask) -> ...
    -> FinalNorm -> hidden (B, T, C) -> LMHead / tied_lm_head -> logits (B, T, V)

Every layer holds one ``transformers`` (or torch) module under one attribute
(:attr:`HFLayer.local_name`) whose tensors are those of the causal LM under
:attr:`HFLayer.hf_prefix`: the layer's state dict key ``"block.ln_1.weight"``
is the model's ``"transformer.h.3.ln_1.weight"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from stagewise.hf.architectures import ARCHITECTURES, Architecture
from stagewise.hf.weights import WeightSource, load_module

__all__ = [
    "FinalNorm",
    "HFLayer",
    "LMHead",
    "StageValue",
    "TokenEmbedding",
    "attention_bias",
    "init_weights",
    "join_stage_value",
    "split_stage_value",
    "tied_lm_head",
]

#: What one layer hands the next: the hidden state, with the padding mask when there is one.
StageValue = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def split_stage_value(x: Any, layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden (B, T, C), padding mask (B, T) or None)`` from a layer's input."""
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        hidden, mask = x
        if isinstance(hidden, torch.Tensor) and isinstance(mask, torch.Tensor):
            return hidden, mask
    raise TypeError(
        f"{layer} takes the hidden state (B, T, C) or (hidden, attention_mask (B, T)); got "
        f"{_describe(x)}"
    )


def join_stage_value(hidden: torch.Tensor, mask: torch.Tensor | None) -> StageValue:
    """The inverse of :func:`split_stage_value`."""
    return hidden if mask is None else (hidden, mask)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}: " + ", ".join(_describe(v) for v in x)
    return type(x).__name__


def attention_bias(
    padding_mask: torch.Tensor | None,
    seq_len: int,
    dtype: torch.dtype,
    device: torch.device,
    implementation: str,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """The 4-D attention mask a ``transformers`` block takes, built as its model builds it.

    Query ``q`` sees key ``k`` when ``k <= q`` (causal), ``k > q - sliding_window``
    (when there is a window) and ``padding_mask[b, k]`` is set.

    Args:
        padding_mask: ``(B, T)``, nonzero for real tokens, or None (no padding).
        implementation: ``"sdpa"`` gives a bool mask ``(B, 1, T, T)`` (True = attend), or
            None where SDPA's own ``is_causal`` does the same (no padding, no window in
            reach), as ``transformers`` does; ``"eager"`` gives an additive float mask
            (0 or the dtype's minimum).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by stagewise.hf; "
            f"use one of {ATTENTION_IMPLEMENTATIONS}"
        )
    has_padding = padding_mask is not None and not bool(padding_mask.bool().all())
    window_reaches = sliding_window is not None and seq_len >= sliding_window
    if implementation == "sdpa" and not has_padding and not window_reaches:
        return None
    q = torch.arange(seq_len, device=device).view(seq_len, 1)  # (T, 1)
    k = torch.arange(seq_len, device=device).view(1, seq_len)  # (1, T)
    allowed = k <= q  # (T, T)
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    allowed = allowed.view(1, 1, seq_len, seq_len)  # (1, 1, T, T)
    if has_padding and padding_mask is not None:
        allowed = allowed & padding_mask.bool().view(-1, 1, 1, seq_len)  # (B, 1, T, T)
    else:
        batch = 1 if padding_mask is None else padding_mask.size(0)
        allowed = allowed.expand(batch, 1, seq_len, seq_len)
    if implementation == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)  # (B, 1, T, T)


def init_weights(module: nn.Module, config: Any, arch: Architecture) -> None:
    """Random weights as ``transformers`` initialises the model (under the caller's seed).

    Linear (and GPT-2's Conv1D) and embedding weights are normal with std
    ``config.initializer_range``, biases zero, norms one (bias zero); an embedding's
    padding row is zero. GPT-2's residual projections (``c_proj``) get std divided
    by ``sqrt(2 * n_layer)``.
    """
    std = float(config.initializer_range)
    with torch.no_grad():
        for name, sub in module.named_modules():
            weight = getattr(sub, "weight", None)
            bias = getattr(sub, "bias", None)
            if isinstance(sub, nn.Embedding):
                sub.weight.normal_(0.0, std)
                if sub.padding_idx is not None:
                    sub.weight[sub.padding_idx].zero_()
            elif isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D":
                scale = 1.0
                if arch.layout == "gpt2" and name.endswith("c_proj"):
                    scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
                if isinstance(weight, torch.Tensor):
                    weight.normal_(0.0, std * scale)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()
            elif isinstance(sub, nn.LayerNorm) or type(sub).__name__.endswith("RMSNorm"):
                if isinstance(weight, torch.Tensor):
                    weight.fill_(1.0)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()


class HFLayer(nn.Module):
    """One layer of a pipelined causal LM, holding one module under :attr:`local_name`.

    Subclasses take ``(config, hf_prefix, weights=None, dtype=torch.float32, ...)``:

    Args:
        config: the model's ``transformers`` config.
        hf_prefix: the held module's name in the causal LM, with a trailing dot.
        weights: where its tensors are read from; None initialises it at random
            (under the pipeline's per-layer seed).
        dtype: the floating dtype of its parameters (None: as stored).
    """

    #: The attribute holding the module; state dict keys start with it.
    local_name: ClassVar[str] = "module"

    def __init__(self, config: Any, hf_prefix: str) -> None:
        super().__init__()
        self.hf_prefix = hf_prefix
        self.arch = ARCHITECTURES[config.model_type]

    def _load(
        self,
        build: Callable[[], nn.Module],
        config: Any,
        weights: WeightSource | None,
        dtype: torch.dtype | None,
    ) -> nn.Module:
        """Build the held module and give it its weights (see :func:`load_module`)."""
        return load_module(
            build,
            weights,
            self.hf_prefix,
            dtype,
            lambda m: init_weights(m, config, self.arch),
            f"{type(self).__name__} {self.hf_prefix.rstrip('.')}",
        )

    def hf_names(self) -> dict[str, str]:
        """``{state dict key: Hugging Face tensor name}`` of this layer."""
        local = self.local_name + "."
        return {
            key: self.hf_prefix + key[len(local) :]
            for key in self.state_dict()
            if key.startswith(local)
        }

    def extra_repr(self) -> str:
        return f"hf_prefix={self.hf_prefix!r}"


class TokenEmbedding(HFLayer):
    """Token ids to hidden states: ``(B, T)`` int ``->`` ``(B, T, C)``.

    Takes ``input_ids`` or ``(input_ids, attention_mask)`` and passes the mask on.
    Its ``embed.weight`` ``(V, C)`` doubles as the LM head when the model ties them
    (:func:`tied_lm_head`).
    """

    local_name = "embed"

    def __init__(
        self,
        config: Any,
        hf_prefix: str,
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__(config, hf_prefix)
        vocab, width = int(config.vocab_size), int(config.hidden_size)
        self.embed = cast(
            nn.Embedding,
            self._load(
                lambda: nn.Embedding(vocab, width, padding_idx=padding_idx), config, weights, dtype
            ),
        )

    def forward(self, x: Any) -> StageValue:
        """``input_ids (B, T)`` or ``(input_ids, attention_mask)`` -> ``(B, T, C)`` [+ mask]."""
        ids, mask = split_stage_value(x, "TokenEmbedding")
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"TokenEmbedding takes integer token ids of shape (B, T), got "
                f"{_describe(ids)}; a batch is (input_ids, labels) or "
                "((input_ids, attention_mask), labels)"
            )
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has "
                f"{tuple(ids.shape)}; give one mask value per token"
            )
        hidden = self.embed(ids)  # (B, T, C)
        return join_stage_value(hidden, mask)


def tied_lm_head(embedding: nn.Module, x: Any) -> torch.Tensor:
    """The LM head tied to the token embedding: ``(B, T, C) @ (C, V) -> (B, T, V)``.

    The ``forward_fn`` of the last ``TiedLayerSpec`` of a model with
    ``tie_word_embeddings``.
    """
    if not isinstance(embedding, TokenEmbedding):
        raise TypeError(
            f"tied_lm_head is the forward_fn of a TokenEmbedding, got {type(embedding).__name__}"
        )
    hidden, _ = split_stage_value(x, "tied_lm_head")
    return F.linear(hidden, embedding.embed.weight)  # (B, T, V)


class FinalNorm(HFLayer):
    """The norm after the last block: ``(B, T, C) -> (B, T, C)``; the padding mask ends here.

    GPT-2's ``LayerNorm`` (``ln_f``) or the Llama family's ``RMSNorm`` (``norm``).
    """

    local_name = "norm"

    def __init__(
        self,
        config: Any,
        hf_prefix: str,
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(config, hf_prefix)
        width = int(config.hidden_size)
        if self.arch.layout == "gpt2":
            eps = float(config.layer_norm_epsilon)
            self.norm = self._load(lambda: nn.LayerNorm(width, eps=eps), config, weights, dtype)
        else:
            norm_cls = self.arch.norm_class()
            eps = float(config.rms_norm_eps)
            self.norm = self._load(lambda: norm_cls(width, eps=eps), config, weights, dtype)

    def forward(self, x: Any) -> torch.Tensor:
        """``(B, T, C)`` [+ mask] -> ``(B, T, C)``."""
        hidden, _ = split_stage_value(x, "FinalNorm")
        result: torch.Tensor = self.norm(hidden)
        return result


class LMHead(HFLayer):
    """The untied output head: ``(B, T, C) -> (B, T, V)`` logits (``lm_head``, no bias)."""

    local_name = "head"

    def __init__(
        self,
        config: Any,
        hf_prefix: str = "lm_head.",
        weights: WeightSource | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__(config, hf_prefix)
        vocab, width = int(config.vocab_size), int(config.hidden_size)
        self.head = self._load(lambda: nn.Linear(width, vocab, bias=False), config, weights, dtype)

    def forward(self, x: Any) -> torch.Tensor:
        """``(B, T, C) -> (B, T, V)``."""
        hidden, _ = split_stage_value(x, "LMHead")
        logits: torch.Tensor = self.head(hidden)
        return logits
