"""A DeepSpeed pipeline script, moved to stagewise by changing its imports only.

Shaped as DeepSpeed's own pipeline example (DeepSpeedExamples'
``training/pipeline_parallelism``): argparse with ``add_config_arguments``, a
JSON config, ``set_random_seed``, an AlexNet-style CNN with in-place ReLUs cut
with ``partition_method='parameters'``, ``training_data=`` and ``train_batch()``,
``RepeatingLoader``. The images are random (CIFAR-10's shape, no download) and
the CNN is written in plain torch (no torchvision)::

    torchrun --nproc_per_node 2 examples/deepspeed_pipeline/train.py \\
        --deepspeed_config examples/deepspeed_pipeline/ds_config.json --steps 20

With ``import deepspeed`` (and ``deepspeed.*`` for the three ``stagewise.*``
imports) it runs on DeepSpeed unchanged, with the same losses
(``tests/test_deepspeed_example.py``). ``ds_config.json`` sets
``gradient_clipping`` to 0: DeepSpeed 0.19.8 clips by the norm of one stage's
gradients, stagewise by the norm of the whole model's, so with clipping on the
two part from the first step that clips.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import stagewise as deepspeed
from stagewise.accelerator import get_accelerator
from stagewise.pipe import PipelineModule
from stagewise.utils import RepeatingLoader


class RandomImages(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """CIFAR-10-shaped samples: a (3, 32, 32) image and a label in 0..9, fixed by ``seed``."""

    def __init__(self, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=gen)
        self.labels = torch.randint(0, 10, (size,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class AlexNet(nn.Module):
    """torchvision's AlexNet layout (features, avgpool, dropout classifier) at CIFAR size."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1),  # (B, 32, 32, 32)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (B, 64, 8, 8)
            nn.Conv2d(64, 96, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(96, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (B, 64, 4, 4)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))  # (B, 64, 2, 2)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(64 * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def join_layers(vision_model: AlexNet) -> list[Any]:
    """The CNN as a flat list of layers for PipelineModule (22 of them)."""
    return [
        *vision_model.features,
        vision_model.avgpool,
        lambda x: torch.flatten(x, 1),
        *vision_model.classifier,
    ]


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CIFAR-shaped random data")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("-s", "--steps", type=int, default=20, help="train this many batches")
    parser.add_argument("-p", "--pipeline-parallel-size", type=int, default=2, help="stages")
    parser.add_argument("--backend", type=str, default="gloo", help="distributed backend")
    parser.add_argument("--seed", type=int, default=1138, help="PRNG seed")
    parser.add_argument("--losses", help="write the losses to this JSON file (rank 0)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def train_pipe(args: argparse.Namespace, part: str = "parameters") -> None:
    deepspeed.runtime.utils.set_random_seed(args.seed)
    net = AlexNet(num_classes=10)
    net = PipelineModule(
        layers=join_layers(net),
        loss_fn=nn.CrossEntropyLoss(),
        num_stages=args.pipeline_parallel_size,
        partition_method=part,
        activation_checkpoint_interval=0,
    )
    trainset = RandomImages(size=64 * args.steps, seed=args.seed)
    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=net,
        model_parameters=[p for p in net.parameters() if p.requires_grad],
        training_data=trainset,
    )
    losses = [float(engine.train_batch()) for _ in range(args.steps)]

    evalset = RandomImages(size=16, seed=args.seed + 1)
    loader = torch.utils.data.DataLoader(
        evalset, batch_size=engine.train_micro_batch_size_per_gpu()
    )
    eval_loss = float(engine.eval_batch(iter(RepeatingLoader(loader))))
    if dist.get_rank() == 0:
        print(f"losses {losses[0]:.4f} -> {losses[-1]:.4f}, eval loss {eval_loss:.4f}")
        if args.losses:
            with open(args.losses, "w") as handle:
                json.dump(
                    {
                        "losses": losses,
                        "eval_loss": eval_loss,
                        "parts": [int(b) for b in net.parts],
                    },
                    handle,
                )


if __name__ == "__main__":
    args = get_args()
    deepspeed.init_distributed(dist_backend=args.backend)
    args.local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(args.local_rank)
    train_pipe(args)
