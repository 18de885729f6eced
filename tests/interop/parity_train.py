"""Train the same tied-embedding GPT specs with DeepSpeed's engine or stagewise's.

The only difference between the two runs is the imports, as for a user moving
a script over::

    torchrun --nproc_per_node 2 tests/interop/parity_train.py --impl deepspeed --out ds.json
    torchrun --nproc_per_node 2 tests/interop/parity_train.py --impl stagewise --out sw.json

Rank 0 writes the per-step losses as JSON to ``--out``. DeepSpeed runs on CPU
with ``DS_ACCELERATOR=cpu`` and gloo.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tiny_gpt import TRAIN_SEED, token_batches, train_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["deepspeed", "stagewise"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--clip",
        type=float,
        default=0.0,
        help="gradient_clipping (DeepSpeed 0.19.8 computes the norm from stage 0's gradients "
        "only, so its clipped steps differ from the true global norm that stagewise uses)",
    )
    parser.add_argument("--dump", help="save each rank's weights to DUMP.<rank>.pt at the end")
    parser.add_argument(
        "--untied", action="store_true", help="give the head its own key (no tied weights)"
    )
    parser.add_argument("--zero", type=int, default=0, help="zero_optimization.stage")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.impl == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed as ds
        import deepspeed.pipe as pipe

        ds.init_distributed(dist_backend="gloo")
    else:
        import stagewise as ds
        import stagewise.pipe as pipe

        ds.init_distributed(dist_backend="gloo")

    engine = train_engine(ds, pipe, clip=args.clip, untied=args.untied, zero_stage=args.zero)
    model = engine.module

    losses = [
        float(engine.train_batch(iter(token_batches(TRAIN_SEED * step))))
        for step in range(args.steps)
    ]
    if args.dump:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, f"{args.dump}.{torch.distributed.get_rank()}.pt")
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"impl": args.impl, "losses": losses}, handle)


if __name__ == "__main__":
    main()
