"""Batch sizes as DeepSpeed relates them: any two of the three fix the third.

``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
* data_parallel``.
"""

from __future__ import annotations

from stagewise.errors import ConfigError

__all__ = ["resolve_batch"]


def resolve_batch(
    train: int | None, micro: int | None, gas: int | None, dp_world_size: int
) -> tuple[int, int, int]:
    """``(train_batch_size, micro_batch_size, gradient_accumulation_steps)``.

    Raises:
        ConfigError: when the given sizes are inconsistent or too few are given.
    """
    shown = (
        f"train_batch_size={train}, train_micro_batch_size_per_gpu={micro}, "
        f"gradient_accumulation_steps={gas}, data-parallel size={dp_world_size}"
    )
    if train is not None and micro is not None and gas is not None:
        if train != micro * gas * dp_world_size:
            raise ConfigError(
                f"inconsistent batch sizes: {shown}; train_batch_size must equal "
                f"micro x accumulation x data-parallel = {micro * gas * dp_world_size}"
            )
    elif train is not None and micro is not None:
        gas, rest = divmod(train, micro * dp_world_size)
        if rest or gas < 1:
            raise ConfigError(
                f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                f"of micro x data-parallel = {micro * dp_world_size}"
            )
    elif train is not None and gas is not None:
        micro, rest = divmod(train, gas * dp_world_size)
        if rest or micro < 1:
            raise ConfigError(
                f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                f"of accumulation x data-parallel = {gas * dp_world_size}"
            )
    elif micro is not None:
        gas = gas or 1
        train = micro * gas * dp_world_size
    elif train is not None:
        gas = 1
        micro, rest = divmod(train, dp_world_size)
        if rest or micro < 1:
            raise ConfigError(
                f"inconsistent batch sizes: {shown}; train_batch_size must be a multiple "
                f"of the data-parallel size {dp_world_size}"
            )
    else:
        raise ConfigError(
            f"give at least train_batch_size or train_micro_batch_size_per_gpu ({shown})"
        )
    train = micro * gas * dp_world_size
    return train, micro, gas
