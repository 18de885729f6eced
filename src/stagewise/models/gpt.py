"""A small GPT written as layer specs, ready to be cut into pipeline stages.

The model is the familiar decoder-only transformer: learned token and position
embeddings, ``n_layer`` blocks of pre-LayerNorm causal self-attention and a
GELU MLP, a final LayerNorm, and an output head that reuses the token
embedding's weight (weight tying). As layer specs::

    TiedLayerSpec("embed", GPTEmbedding, config,
                  tied_weight_attr="wte.weight")                  # ids (B, T) -> (B, T, C)
    LayerSpec(Block, config) * n_layer                            # (B, T, C) -> (B, T, C)
    LayerSpec(FinalNorm, config)                                  # (B, T, C) -> (B, T, C)
    TiedLayerSpec("embed", GPTEmbedding, config, forward_fn=gpt_head,
                  tied_weight_attr="wte.weight")                  # (B, T, C) -> (B, T, V)

Train it over two pipeline stages::

    from stagewise import PipelineModule
    from stagewise.models.gpt import GPTConfig, gpt_layer_specs, gpt_loss

    config = GPTConfig(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = PipelineModule(gpt_layer_specs(config), num_stages=2, loss_fn=gpt_loss,
                           seed_layers=True, base_seed=1234)

and check it against :class:`GPT`, the same specs built in one process with
the same seeds. Weights are initialised inside each layer's constructor
(normal with std 0.02; residual output projections scaled by
``1 / sqrt(2 * n_layer)``), so the seed of the layer decides them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stagewise.models.reference import ReferenceModel
from stagewise.spec import LayerSpec, TiedLayerSpec

__all__ = [
    "DEMO_CONFIG",
    "DEMO_TRAINING",
    "GPT",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "DemoTraining",
    "FinalNorm",
    "GPTConfig",
    "GPTEmbedding",
    "generate",
    "gpt_head",
    "gpt_layer_specs",
    "gpt_loss",
]

_INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT."""

    # Number of token ids; 96 matches stagewise.data.CharTokenizer().
    vocab_size: int = 96
    # Longest sequence the model reads (the number of learned positions).
    block_size: int = 64
    # Number of transformer blocks.
    n_layer: int = 4
    # Attention heads per block; must divide n_embd.
    n_head: int = 4
    # Width of the residual stream (C).
    n_embd: int = 128
    # Dropout probability after embeddings, attention and MLP (0.0 = off, deterministic).
    dropout: float = 0.0
    # Whether Linear and LayerNorm layers carry a bias.
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={math.gcd(self.n_embd, self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must lie in [0, 1), got {self.dropout}")


def _init_linear(linear: nn.Linear, std: float = _INIT_STD) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class GPTEmbedding(nn.Module):
    """Token plus position embedding: ids ``(B, T)`` int64 to ``(B, T, C)``.

    Its ``wte`` weight doubles as the output head (see :func:`gpt_head`).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # (V, C)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # (block_size, C)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.wte.weight, mean=0.0, std=_INIT_STD)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=_INIT_STD)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Embed token ids ``idx`` of shape ``(B, T)``, ``T <= block_size``."""
        if idx.dim() != 2:
            raise ValueError(
                f"GPTEmbedding expects token ids of shape (B, T), got {tuple(idx.shape)}"
            )
        seq_len = idx.size(1)
        if seq_len > self.block_size:
            raise ValueError(
                f"sequence length {seq_len} exceeds block_size {self.block_size}; "
                "crop the input or raise GPTConfig.block_size"
            )
        pos = torch.arange(seq_len, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        return self.drop(x)


def gpt_head(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output head: logits from the tied token embedding, ``(B, T, C) -> (B, T, V)``."""
    if not isinstance(embedding, GPTEmbedding):
        raise TypeError(
            f"gpt_head is the forward_fn of a GPTEmbedding, got a {type(embedding).__name__}; "
            "tie it to a TiedLayerSpec that builds GPTEmbedding"
        )
    return x @ embedding.wte.weight.T  # (B, T, C) @ (C, V) -> (B, T, V)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees only positions ``<= t``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` of shape ``(B, T, C)``; returns ``(B, T, C)``."""
        batch, seq_len, width = x.shape
        head_dim = width // self.n_head
        q, k, v = self.c_attn(x).split(width, dim=2)  # 3 x (B, T, C)
        q = q.view(batch, seq_len, self.n_head, head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(batch, seq_len, self.n_head, head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(batch, seq_len, self.n_head, head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(batch, seq_len, width)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: ``C -> 4C -> GELU -> C``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        h = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.drop(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """One transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        for linear in (self.attn.c_attn, self.mlp.c_fc):
            _init_linear(linear)
        # Residual projections shrink with depth so the stream's variance stays put.
        residual_std = _INIT_STD / math.sqrt(2 * config.n_layer)
        for linear in (self.attn.c_proj, self.mlp.c_proj):
            _init_linear(linear, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``."""
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class FinalNorm(nn.Module):
    """The LayerNorm after the last block: ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the residual stream."""
        return self.ln_f(x)


def gpt_layer_specs(config: GPTConfig) -> list[LayerSpec]:
    """The GPT as ``n_layer + 3`` layer specs for ``PipelineModule(layers=...)``.

    The first and the last spec share the key ``"embed"``: one
    :class:`GPTEmbedding`, embedding tokens at the front and, through
    :func:`gpt_head`, producing logits at the back.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"gpt_layer_specs needs a GPTConfig, got {type(config).__name__}")
    return [
        TiedLayerSpec(
            "embed", GPTEmbedding, config, tied_weight_attr="wte.weight"
        ),  # ids (B, T) -> (B, T, C)
        *[LayerSpec(Block, config) for _ in range(config.n_layer)],  # (B, T, C) -> (B, T, C)
        LayerSpec(FinalNorm, config),  # (B, T, C) -> (B, T, C)
        # The output head is the token embedding: logits = x @ wte.weight.T (weight tying).
        TiedLayerSpec(
            "embed", GPTEmbedding, config, forward_fn=gpt_head, tied_weight_attr="wte.weight"
        ),  # (B, T, C) -> (B, T, V)
    ]


def gpt_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``(B, T, V)``, labels ``(B, T)``; ``-1`` is ignored."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"gpt_loss: logits {tuple(logits.shape)} do not match labels "
            f"{tuple(labels.shape)}; expected logits (B, T, V) and labels (B, T)"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),  # (B*T, V)
        labels.reshape(-1),  # (B*T,)
        ignore_index=-1,
    )


class GPT(ReferenceModel):
    """The GPT of :func:`gpt_layer_specs` in one process.

    Built with the pipeline's seeding (layer ``i`` after seeding with
    ``base_seed + i``), it has the same weights and gives the same outputs as
    ``PipelineModule(gpt_layer_specs(config), ..., seed_layers=True,
    base_seed=base_seed)`` on any number of stages. ``model(idx)`` maps token
    ids ``(B, T)`` to logits ``(B, T, V)``; ``model.loss_fn`` is :func:`gpt_loss`.
    """

    def __init__(self, config: GPTConfig, base_seed: int = 1234, seed_layers: bool = True) -> None:
        super().__init__(
            gpt_layer_specs(config), loss_fn=gpt_loss, seed_layers=seed_layers, base_seed=base_seed
        )
        self.config = config

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


@torch.no_grad()
def generate(
    model: Callable[[torch.Tensor], torch.Tensor],
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend token ids ``idx`` ``(B, T)`` by ``max_new_tokens`` sampled tokens.

    Args:
        model: maps ids ``(B, T)`` to logits ``(B, T, V)`` (a :class:`GPT` or
            any callable).
        idx: the prompt, int64 ``(B, T)`` with ``T >= 1``.
        max_new_tokens: how many tokens to append.
        temperature: divides the logits; ``0`` picks the most likely token.
        top_k: sample only among the ``top_k`` most likely tokens.
        block_size: the longest context the model takes; defaults to
            ``model.config.block_size`` where the model has one. Longer
            contexts are cropped to their last ``block_size`` tokens.
        generator: the random generator for sampling (default: torch's global one).

    Returns:
        ``(B, T + max_new_tokens)`` int64 token ids.
    """
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(f"generate needs a prompt of shape (B, T) with T >= 1, got {idx.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if block_size is None:
        config = getattr(model, "config", None)
        block_size = getattr(config, "block_size", None)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        for _ in range(max_new_tokens):
            context = idx if block_size is None else idx[:, -block_size:]  # (B, <=block_size)
            logits = model(context)[:, -1, :]  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)  # (B, V)
                next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (B, T + 1)
    finally:
        if was_training and isinstance(model, nn.Module):
            model.train()
    return idx


@dataclass(frozen=True)
class DemoTraining:
    """The training settings of ``stagewise demo``.

    Measured in one process with one thread, AdamW(lr, betas, weight_decay)
    and no gradient clipping, on the embedded corpus (``GPT(DEMO_CONFIG)``
    with base_seed 1234, data seed 0): validation loss 4.53 at the start, then
    3.20, 2.86, 2.64, 2.45, 2.27, 2.14, 1.96, 1.87, 1.77 after every 100 steps
    (0.39 of the start after 900) in about 54 s of compute. Two settings slow
    the escape from the plateau near the unigram loss (about 3.1): clipping the
    gradient norm at 1.0 (0.52 of the start after 900 steps) and AdamW's
    default beta2 of 0.999 (0.52 with clipping). Some seeds stay on the
    plateau longer (base_seed 1: 0.53 after 900 steps).
    """

    # Sequences per micro-batch (train_micro_batch_size_per_gpu).
    micro_batch_size: int
    # Micro-batches per optimizer step (gradient_accumulation_steps).
    micro_batches: int
    # Optimizer steps (train_batch calls).
    steps: int
    # AdamW learning rate, held constant.
    lr: float
    # AdamW (beta1, beta2).
    betas: tuple[float, float]
    # AdamW weight decay.
    weight_decay: float
    # Seed of the training data iterator (stagewise.data.RandomWindows).
    data_seed: int
    # Fixed validation micro-batches per evaluation (of micro_batch_size sequences each).
    val_batches: int
    # Global gradient-norm clipping (DeepSpeed's gradient_clipping); 0.0 turns it off.
    gradient_clipping: float = 0.0


#: The demo's model: a character-level GPT over stagewise.data's 96-symbol alphabet.
DEMO_CONFIG = GPTConfig(vocab_size=96, block_size=32, n_layer=4, n_head=4, n_embd=64)

#: The demo's training settings (seed the model with base_seed=1234).
DEMO_TRAINING = DemoTraining(
    micro_batch_size=16,
    micro_batches=4,
    steps=900,
    lr=1e-2,
    betas=(0.9, 0.99),
    weight_decay=0.01,
    data_seed=0,
    val_batches=8,
    gradient_clipping=0.0,
)
