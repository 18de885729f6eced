"""The causal LM loss, with labels as ``transformers`` takes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]

#: Labels equal to this are left out of the loss (padding, prompts), as in transformers.
IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, ``model(input_ids, labels=labels).loss`` exactly.

    Position ``t`` predicts ``labels[:, t + 1]``: the loss shifts the labels by one
    itself, so ``labels`` is aligned with ``input_ids`` (often a copy of it, with
    ``-100`` where a token should not count). Computed in float32.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` int64 token ids or ``-100``.

    Returns:
        A scalar: the mean over the labels that are not ``-100`` (NaN when none is).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(
            "causal_lm_loss takes labels of shape (B, T) aligned with input_ids, got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal_lm_loss: logits {tuple(logits.shape)} do not match labels "
            f"{tuple(labels.shape)}; expected logits (B, T, V) and labels (B, T)"
        )
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): label of t is t+1
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # (B*T, V)
        shifted.reshape(-1).to(logits.device),  # (B*T,)
        ignore_index=IGNORE_INDEX,
    )
