"""The CIFAR-sized AlexNet of DeepSpeed's pipeline tests, trained on random images.

DeepSpeed's ``tests/unit/alexnet_model.py`` trains this network on CIFAR-10,
downloaded with torchvision; here the images are random (CIFAR's shape, a
fixed seed), so nothing is downloaded and torchvision is not needed.
``train_cifar`` otherwise does what DeepSpeed's does: seed with
``set_random_seed``, evaluation mode (no dropout), ``local_rank`` in the config,
``initialize(training_data=...)``, ``train_batch()`` per step, the losses
averaged over the ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stagewise
import stagewise.comm as dist
from stagewise.runtime.pipe.module import LayerSpec, PipelineModule
from stagewise.runtime.utils import set_random_seed

__all__ = ["AlexNet", "AlexNetPipe", "AlexNetPipeSpec", "cifar_trainset", "train_cifar"]

SAMPLES = 1024


class AlexNet(nn.Module):
    """Five convolutions (in-place ReLUs, three poolings) and a linear classifier, 32x32 in."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=5),  # (B, 64, 8, 8)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # (B, 64, 4, 4)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # (B, 192, 2, 2)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # (B, 256, 1, 1)
        )
        self.classifier = nn.Linear(256, num_classes)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.classifier(self.features(x).flatten(1)), y)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.size(0), -1)


class AlexNetPipe(AlexNet):
    def to_layers(self) -> list[Any]:
        return [*self.features, _flatten, self.classifier]


class AlexNetPipeSpec(PipelineModule):
    """The same network as layer specs (each rank builds its own stage only)."""

    def __init__(self, num_classes: int = 10, **kwargs: Any) -> None:
        specs = [
            LayerSpec(nn.Conv2d, 3, 64, kernel_size=11, stride=4, padding=5),
            LayerSpec(nn.ReLU, inplace=True),
            LayerSpec(nn.MaxPool2d, kernel_size=2, stride=2),
            LayerSpec(nn.Conv2d, 64, 192, kernel_size=5, padding=2),
            F.relu,
            LayerSpec(nn.MaxPool2d, kernel_size=2, stride=2),
            LayerSpec(nn.Conv2d, 192, 384, kernel_size=3, padding=1),
            F.relu,
            LayerSpec(nn.Conv2d, 384, 256, kernel_size=3, padding=1),
            F.relu,
            LayerSpec(nn.Conv2d, 256, 256, kernel_size=3, padding=1),
            F.relu,
            LayerSpec(nn.MaxPool2d, kernel_size=2, stride=2),
            _flatten,
            LayerSpec(nn.Linear, 256, num_classes),
        ]
        super().__init__(layers=specs, loss_fn=nn.CrossEntropyLoss(), **kwargs)


class RandomCifar(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """CIFAR-10's shapes: normalised (3, 32, 32) images and labels in 0..9."""

    def __init__(self, size: int = SAMPLES, fp16: bool = False, seed: int = 20) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=gen).clamp(-1, 1)
        if fp16:
            self.images = self.images.half()
        self.labels = torch.randint(0, 10, (size,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def cifar_trainset(fp16: bool = False) -> RandomCifar:
    return RandomCifar(fp16=fp16)


def train_cifar(
    model: PipelineModule,
    config: dict[str, Any],
    num_steps: int = 400,
    average_dp_losses: bool = True,
    fp16: bool = True,
    seed: int = 123,
) -> list[float]:
    with torch.random.fork_rng():
        set_random_seed(seed)
        model.eval()  # no dropout
        trainset = cifar_trainset(fp16=fp16)
        config["local_rank"] = dist.get_rank()
        engine, _, _, _ = stagewise.initialize(
            config=config,
            model=model,
            model_parameters=[p for p in model.parameters()],
            training_data=trainset,
        )
        losses = [float(engine.train_batch()) for _ in range(num_steps)]
        if average_dp_losses:
            loss_tensor = torch.tensor(losses)
            dist.all_reduce(loss_tensor)
            losses = (loss_tensor / dist.get_world_size()).tolist()
    return losses
