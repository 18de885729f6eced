"""Train a tied-embedding GPT a few steps with DeepSpeed's engine and save a checkpoint.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 \\
        tests/interop/ds_save_checkpoint.py --save-dir ckpt --out ds_eval.json

The model, seeds and evaluation batches are those of ``tests/checkpoint_cases.py``
(``ds_gpt_specs``, ``ds_eval_batches``), written here with DeepSpeed's classes.
After training, DeepSpeed saves with ``engine.save_checkpoint(save_dir)`` and
rank 0 writes the per-step losses and the evaluation loss of the saved weights
as JSON to ``--out``; stagewise must load the layer files
(``load_module_only=True``) and get the same evaluation loss.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from stagewise.models.gpt import Block, FinalNorm, GPTConfig, GPTEmbedding, gpt_head, gpt_loss

CONFIG = GPTConfig(vocab_size=48, block_size=16, n_layer=4, n_head=2, n_embd=32)


def eval_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for index in range(4):
        gen = torch.Generator().manual_seed(7000 + index)
        tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def train_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for index in range(4):
        gen = torch.Generator().manual_seed(100 * step + index)
        tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size + 1), generator=gen)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    deepspeed.init_distributed(dist_backend="gloo")
    layers = [
        TiedLayerSpec("embed", GPTEmbedding, CONFIG, tied_weight_attr="wte.weight"),
        *[LayerSpec(Block, CONFIG) for _ in range(CONFIG.n_layer)],
        LayerSpec(FinalNorm, CONFIG),
        TiedLayerSpec(
            "embed", GPTEmbedding, CONFIG, forward_fn=gpt_head, tied_weight_attr="wte.weight"
        ),
    ]
    model = PipelineModule(
        layers=layers,
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
        "gradient_clipping": 0.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    losses = [float(engine.train_batch(iter(train_batches(step)))) for step in range(args.steps)]
    engine.save_checkpoint(args.save_dir)
    eval_loss = float(engine.eval_batch(iter(eval_batches())))
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"losses": losses, "eval_loss": eval_loss}, handle)


if __name__ == "__main__":
    main()
