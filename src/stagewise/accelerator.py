"""The mirror of ``deepspeed.accelerator``: ``get_accelerator()`` for CPU and CUDA scripts.

The accelerator is CUDA when the engine runs there (NCCL with a GPU, or before
the process group is up, a visible GPU) and the CPU otherwise;
``DS_ACCELERATOR=cpu`` or ``=cuda`` forces it, as it does for DeepSpeed. It
answers the calls a CPU or CUDA script makes (device names, ``device_count``,
``set_device``, ``synchronize``, seeds and RNG state, the communication
backend, dtype support, CUDA memory statistics). DeepSpeed's op builders and
other vendors' accelerators are not mirrored: asking for them is an
``AttributeError`` that says so.

>>> acc = get_accelerator()
>>> acc.device_name() in ("cpu", "cuda")
True
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Accelerator", "get_accelerator"]


def _kind() -> str:
    forced = os.environ.get("DS_ACCELERATOR", "").lower()
    if forced in ("cpu", "cuda"):
        return forced
    if not torch.cuda.is_available():
        return "cpu"
    if dist.is_initialized():
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    return "cuda"


class Accelerator:
    """The device a stagewise script runs on, with DeepSpeed's accelerator methods."""

    @property
    def _name(self) -> str:
        return _kind()

    def is_cuda(self) -> bool:
        return self._name == "cuda"

    # -- devices -----------------------------------------------------------------------
    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"`` / ``"cuda:N"``, or ``"cpu"`` (whatever the index)."""
        if self.is_cuda() and device_index is not None:
            return f"cuda:{device_index}"
        return self._name

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device(self.device_name(device_index))

    def current_device(self) -> int:
        """The current CUDA device's index; on the CPU, ``LOCAL_RANK`` (as DeepSpeed's)."""
        if self.is_cuda():
            return int(torch.cuda.current_device())
        return int(os.environ.get("LOCAL_RANK", "0"))

    def current_device_name(self) -> str:
        if self.is_cuda():
            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"

    def set_device(self, device_index: int) -> None:
        """Make ``device_index`` the current CUDA device (nothing to choose on the CPU)."""
        if self.is_cuda():
            torch.cuda.set_device(device_index)

    def device_count(self) -> int:
        return int(torch.cuda.device_count()) if self.is_cuda() else 1

    def is_available(self) -> bool:
        return bool(torch.cuda.is_available()) if self.is_cuda() else True

    def synchronize(self, device_index: int | None = None) -> None:
        """Wait for the device's queued work (the CPU has none queued)."""
        if self.is_cuda():
            torch.cuda.synchronize(device_index)

    # -- random numbers ------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        (torch.cuda.manual_seed if self.is_cuda() else torch.manual_seed)(seed)

    def manual_seed_all(self, seed: int) -> None:
        (torch.cuda.manual_seed_all if self.is_cuda() else torch.manual_seed)(seed)

    def initial_seed(self) -> int:
        return int(torch.cuda.initial_seed() if self.is_cuda() else torch.initial_seed())

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        if self.is_cuda():
            return torch.cuda.get_rng_state("cuda" if device_index is None else device_index)
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        if self.is_cuda():
            torch.cuda.set_rng_state(new_state, "cuda" if device_index is None else device_index)
        else:
            torch.set_rng_state(new_state)

    def random(self) -> Any:
        """The module whose RNG this device uses (``torch.random`` on the CPU)."""
        return torch.cuda.random if self.is_cuda() else torch.random

    # -- communication and dtypes -------------------------------------------------------
    def communication_backend_name(self) -> str:
        return "nccl" if self.is_cuda() else "gloo"

    def is_bf16_supported(self) -> bool:
        return bool(torch.cuda.is_bf16_supported()) if self.is_cuda() else True

    def is_fp16_supported(self) -> bool:
        return self.is_cuda()

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32]
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    # -- memory ------------------------------------------------------------------------
    def _cuda_only(self, name: str) -> None:
        if not self.is_cuda():
            raise NotImplementedError(
                f"get_accelerator().{name}() reports CUDA memory; on the CPU use the "
                "process's own statistics (e.g. resource.getrusage)"
            )

    def memory_allocated(self, device_index: int | None = None) -> int:
        self._cuda_only("memory_allocated")
        return int(torch.cuda.memory_allocated(device_index))

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        self._cuda_only("max_memory_allocated")
        return int(torch.cuda.max_memory_allocated(device_index))

    def memory_reserved(self, device_index: int | None = None) -> int:
        self._cuda_only("memory_reserved")
        return int(torch.cuda.memory_reserved(device_index))

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        self._cuda_only("reset_peak_memory_stats")
        torch.cuda.reset_peak_memory_stats(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        self._cuda_only("total_memory")
        index = torch.cuda.current_device() if device_index is None else device_index
        return int(torch.cuda.get_device_properties(index).total_memory)

    def empty_cache(self) -> None:
        """Release CUDA's cached blocks (the CPU keeps no cache)."""
        if self.is_cuda():
            torch.cuda.empty_cache()

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor.pin_memory() if self.is_cuda() else tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return bool(tensor.is_pinned()) if self.is_cuda() else False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self._name

    def range_push(self, msg: str) -> None:
        """Open an NVTX range on CUDA (nothing on the CPU)."""
        if self.is_cuda():
            torch.cuda.nvtx.range_push(msg)

    def range_pop(self) -> None:
        if self.is_cuda():
            torch.cuda.nvtx.range_pop()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        hint = (
            "DeepSpeed's op builders (fused kernels) are not mirrored; use torch's own ops"
            if "op_builder" in name or "extension" in name
            else "it is part of DeepSpeed's accelerator interface that stagewise does not mirror"
        )
        raise AttributeError(
            f"get_accelerator().{name}: {hint} (available: device_name, device, "
            "current_device, current_device_name, set_device, device_count, is_available, "
            "synchronize, manual_seed, manual_seed_all, initial_seed, get_rng_state, "
            "set_rng_state, communication_backend_name, is_bf16_supported, is_fp16_supported, "
            "supported_dtypes, memory_allocated, max_memory_allocated, memory_reserved, "
            "reset_peak_memory_stats, total_memory, empty_cache, pin_memory, is_pinned, "
            "on_accelerator, range_push, range_pop)"
        )

    def __repr__(self) -> str:
        return f"<stagewise accelerator: {self._name}>"


_ACCELERATOR = Accelerator()


def get_accelerator() -> Accelerator:
    """The accelerator of this process (DeepSpeed's ``get_accelerator``)."""
    return _ACCELERATOR
