"""Train the demo's GPT over pipeline stages: a plain script, launched by torchrun.

One machine::

    torchrun --nproc_per_node 2 examples/train_gpt.py --steps 50

Two "nodes" (here two torchrun agents on one machine, c10d rendezvous on loopback)::

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d \\
        --rdzv_endpoint 127.0.0.1:29400 --rdzv_id demo examples/train_gpt.py   # twice

It is a DeepSpeed pipeline script with its imports changed: layer specs ->
``PipelineModule`` -> ``initialize`` -> ``train_batch``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import torch

import stagewise
from stagewise.data import load_corpus
from stagewise.models.gpt import DEMO_CONFIG, DEMO_TRAINING, gpt_layer_specs, gpt_loss
from stagewise.pipe import PipelineModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEMO_TRAINING.steps)
    parser.add_argument("--stages", type=int, default=None, help="default: the world size")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--n-layer", type=int, default=DEMO_CONFIG.n_layer)
    parser.add_argument("--n-embd", type=int, default=DEMO_CONFIG.n_embd)
    parser.add_argument("--losses", help="write the per-step losses to this JSON file (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    stagewise.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    corpus = load_corpus()
    config = replace(
        DEMO_CONFIG, vocab_size=corpus.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd
    )
    model = PipelineModule(
        layers=gpt_layer_specs(config),
        num_stages=args.stages or world,
        loss_fn=gpt_loss,
        seed_layers=True,
        partition_method="parameters",
    )
    engine, _, _, _ = stagewise.initialize(
        model=model,
        config={
            "train_micro_batch_size_per_gpu": DEMO_TRAINING.micro_batch_size,
            "gradient_accumulation_steps": DEMO_TRAINING.micro_batches,
            "optimizer": {"type": "AdamW", "params": {"lr": DEMO_TRAINING.lr}},
            "steps_per_print": 10,
            "pipeline": {"schedule": args.schedule},
        },
    )
    grid = engine.grid
    data = corpus.train_batches(
        DEMO_TRAINING.micro_batch_size,
        config.block_size,
        seed=DEMO_TRAINING.data_seed,
        rank=grid.get_data_parallel_rank(),
        world_size=grid.get_data_parallel_world_size(),
    )
    losses = [float(engine.train_batch(data)) for _ in range(args.steps)]
    if rank == 0:
        logging.info("final loss %.4f after %d steps", losses[-1], args.steps)
        if args.losses:
            with open(args.losses, "w") as handle:
                json.dump(losses, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
