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
from tiny_gpt import TRAIN_SEED, gpt_specs, token_batches

from stagewise.models.gpt import gpt_loss


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
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.impl == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed as ds
        from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

        ds.init_distributed(dist_backend="gloo")
    else:
        import stagewise as ds
        from stagewise.pipe import LayerSpec, PipelineModule, TiedLayerSpec

        ds.init_distributed(dist_backend="gloo")

    layers = gpt_specs(LayerSpec, TiedLayerSpec, untied=args.untied)
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
        "gradient_clipping": args.clip,
    }
    engine, _, _, _ = ds.initialize(model=model, optimizer=optimizer, config=config)

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
