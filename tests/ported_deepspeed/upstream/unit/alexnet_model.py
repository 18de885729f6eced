"""DeepSpeed's ``unit.alexnet_model``: the CIFAR AlexNet, trained here on random images."""

from ported_deepspeed.alexnet import (
    AlexNet,
    AlexNetPipe,
    AlexNetPipeSpec,
    cifar_trainset,
    train_cifar,
)

__all__ = ["AlexNet", "AlexNetPipe", "AlexNetPipeSpec", "cifar_trainset", "train_cifar"]
