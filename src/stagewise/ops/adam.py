"""The mirror of ``deepspeed.ops.adam``: ``FusedAdam`` and ``DeepSpeedCPUAdam`` as torch's Adam.

Both take DeepSpeed's arguments and defaults (``weight_decay`` 0, decoupled
weight decay unless ``adam_w_mode``/``adamw_mode`` is false) and run
``torch.optim.Adam``'s step, which is the math of DeepSpeed's kernels (the last
bits of rounding aside).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]


def _check_bias_correction(name: str, bias_correction: bool) -> None:
    if not bias_correction:
        raise ValueError(
            f"{name}(bias_correction=False) is not supported: torch's Adam always corrects "
            "the bias; drop the argument"
        )


class FusedAdam(torch.optim.Adam):
    """DeepSpeed's ``FusedAdam`` (arguments and defaults), stepping as ``torch.optim.Adam``.

    ``adam_w_mode`` (default True) decouples the weight decay, as ``AdamW``;
    False adds it to the gradient (L2), as ``Adam``. ``set_grad_none`` is the
    ``set_to_none`` default of ``zero_grad``. ``amsgrad`` works (DeepSpeed's kernel
    refuses it).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
    ) -> None:
        _check_bias_correction("FusedAdam", bias_correction)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=adam_w_mode,
        )
        self.adam_w_mode = int(adam_w_mode)
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)


class DeepSpeedCPUAdam(FusedAdam):
    """DeepSpeed's ``DeepSpeedCPUAdam`` (arguments and defaults), stepping as ``torch.optim.Adam``.

    ``fp32_optimizer_states`` is accepted: the states are the parameters' dtype
    (fp32 for stagewise's fp32 weights).
    """

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
    ) -> None:
        _check_bias_correction("DeepSpeedCPUAdam", bias_correction)
        super().__init__(
            model_params,
            lr=lr,
            betas=betas,
            eps=eps,
            adam_w_mode=adamw_mode,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
        )
