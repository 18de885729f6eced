"""The small tied-embedding GPT that the DeepSpeed interop scripts and tests share.

``gpt_specs(LayerSpec, TiedLayerSpec)`` takes the spec classes as arguments, so
the same list is built with DeepSpeed's classes or with stagewise's: the only
difference between the two runs is where the classes come from.
"""

from __future__ import annotations

from typing import Any

import torch

from stagewise.models.gpt import Block, FinalNorm, GPTConfig, GPTEmbedding, gpt_head, gpt_loss

CONFIG = GPTConfig(vocab_size=48, block_size=16, n_layer=4, n_head=2, n_embd=32)
TRAIN_SEED = 100  # batch `step` is token_batches(TRAIN_SEED * step)
EVAL_SEED = 7000


def gpt_specs(layer_spec: Any, tied_layer_spec: Any, untied: bool = False) -> list[Any]:
    """Embedding, blocks, final norm, and the head tied to the embedding (``untied``: not)."""
    attr = "wte.weight"
    return [
        tied_layer_spec("embed", GPTEmbedding, CONFIG, tied_weight_attr=attr),
        *[layer_spec(Block, CONFIG) for _ in range(CONFIG.n_layer)],
        layer_spec(FinalNorm, CONFIG),
        tied_layer_spec(
            "head" if untied else "embed",
            GPTEmbedding,
            CONFIG,
            forward_fn=gpt_head,
            tied_weight_attr=attr,
        ),
    ]


def token_batches(
    seed: int, count: int = 4, size: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` micro-batches of ``(inputs, labels)``, the same on every rank."""
    out = []
    for index in range(count):
        gen = torch.Generator().manual_seed(seed + index)
        tokens = torch.randint(0, CONFIG.vocab_size, (size, CONFIG.block_size + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def train_engine(
    api: Any, pipe: Any, clip: float = 0.0, untied: bool = False, zero_stage: int = 0
) -> Any:
    """The 2-stage engine both scripts train: ``api`` is ``deepspeed`` or ``stagewise``,
    ``pipe`` its ``.pipe`` module (the only difference between the two runs). With more
    than 2 processes the rest are data-parallel replicas; ``zero_stage`` 1 shards the
    optimizer state over them (SGD: an optimizer DeepSpeed's ZeRO has not tested)."""
    model = pipe.PipelineModule(
        layers=gpt_specs(pipe.LayerSpec, pipe.TiedLayerSpec, untied=untied),
        num_stages=2,
        loss_fn=gpt_loss,
        seed_layers=True,
        base_seed=1234,
        partition_method="uniform",
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "steps_per_print": 1000,
        "gradient_clipping": clip,
    }
    if zero_stage:
        config["zero_optimization"] = {"stage": zero_stage}
        config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = api.initialize(model=model, optimizer=optimizer, config=config)
    return engine
