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
from tiny_gpt import EVAL_SEED, TRAIN_SEED, token_batches, train_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.pipe

    deepspeed.init_distributed(dist_backend="gloo")
    engine = train_engine(deepspeed, deepspeed.pipe)
    losses = [
        float(engine.train_batch(iter(token_batches(TRAIN_SEED * step))))
        for step in range(args.steps)
    ]
    engine.save_checkpoint(args.save_dir)
    eval_loss = float(engine.eval_batch(iter(token_batches(EVAL_SEED))))
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"losses": losses, "eval_loss": eval_loss}, handle)


if __name__ == "__main__":
    main()
