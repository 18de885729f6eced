"""The wire format of a transfer between stages: a tuple of tensors as ONE flat message.

The tuple's tensors are packed, byte for byte, into a single flat ``uint8``
buffer (any dtype: float, bf16, int64, bool, ...), each aligned to 16 bytes.
Shapes and dtypes travel as a separate, fixed-size metadata message only the
first time a channel is used and again when they change, so variable sequence
lengths work without a ``dynamic_shape`` flag:

* steady state: ``[flag=0 | tensor bytes]``, sized from the known metadata;
* shapes changed: the sender first sends a message of the *old* size whose
  flag is 1, then the new metadata, then the data. The receiver, which posted
  a receive of the old size, sees the flag and follows.

Gradients travel without header or metadata: their layout is that of the
floating-point tensors of the activation they belong to, which the receiver
already holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FLAG_DATA",
    "FLAG_META_FOLLOWS",
    "HEADER",
    "META_LEN",
    "TensorMeta",
    "decode_meta",
    "encode_meta",
    "metas_of",
    "pack",
    "payload_size",
    "read_flag",
    "stale_message",
    "unpack",
]

_DTYPES: list[torch.dtype] = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_ALIGN = 16
HEADER = 8  # one int64 flag in front of the data
META_LEN = 512  # int64 slots in a metadata message
FLAG_DATA = 0
FLAG_META_FOLLOWS = 1


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor in a transfer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def payload_size(metas: Sequence[TensorMeta], header: int = HEADER) -> int:
    """Bytes of a packed transfer of tensors with ``metas``."""
    offset = _aligned(header) if header else 0
    for meta in metas:
        offset += _aligned(meta.nbytes)
    return offset


def metas_of(tensors: Sequence[torch.Tensor]) -> tuple[TensorMeta, ...]:
    """The metadata of a tuple of tensors, checking every dtype can travel."""
    metas = []
    for tensor in tensors:
        if tensor.dtype not in _DTYPE_CODE:
            raise TypeError(
                f"cannot send a tensor of dtype {tensor.dtype} between stages; supported: "
                f"{[str(d) for d in _DTYPES]}"
            )
        metas.append(TensorMeta(tuple(tensor.shape), tensor.dtype))
    return tuple(metas)


def pack(
    tensors: Sequence[torch.Tensor], flag: int = FLAG_DATA, header: bool = True
) -> torch.Tensor:
    """Pack ``tensors`` into one flat byte buffer (with a flag header when ``header``)."""
    metas = metas_of(tensors)
    head = HEADER if header else 0
    device = tensors[0].device if tensors else torch.device("cpu")
    flat = torch.empty(payload_size(metas, head), dtype=torch.uint8, device=device)
    offset = 0
    if header:
        flat[:HEADER].view(torch.int64).fill_(flag)
        offset = _aligned(HEADER)
    for tensor, meta in zip(tensors, metas, strict=True):
        nbytes = meta.nbytes
        if nbytes:
            src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            flat[offset : offset + nbytes].copy_(src)
        offset += _aligned(nbytes)
    return flat


def unpack(
    flat: torch.Tensor, metas: Sequence[TensorMeta], header: bool = True
) -> list[torch.Tensor]:
    """Views of ``flat`` as the tensors described by ``metas`` (the inverse of :func:`pack`)."""
    offset = _aligned(HEADER) if header else 0
    out = []
    for meta in metas:
        nbytes = meta.nbytes
        chunk = flat[offset : offset + nbytes]
        out.append(chunk.view(meta.dtype).view(meta.shape))
        offset += _aligned(nbytes)
    return out


def encode_meta(metas: Sequence[TensorMeta]) -> torch.Tensor:
    values = [len(metas)]
    for meta in metas:
        values += [_DTYPE_CODE[meta.dtype], len(meta.shape), *meta.shape]
    if len(values) > META_LEN:
        raise ValueError(
            f"the tensors sent between stages need {len(values)} metadata slots, more than "
            f"{META_LEN}; send fewer tensors (or fewer dimensions) from one stage to the next"
        )
    out = torch.zeros(META_LEN, dtype=torch.int64)
    out[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return out


def decode_meta(encoded: torch.Tensor) -> tuple[TensorMeta, ...]:
    values = encoded.tolist()
    count, pos, metas = values[0], 1, []
    for _ in range(count):
        dtype, ndim = _DTYPES[values[pos]], values[pos + 1]
        shape = tuple(values[pos + 2 : pos + 2 + ndim])
        metas.append(TensorMeta(shape, dtype))
        pos += 2 + ndim
    return tuple(metas)


def read_flag(flat: torch.Tensor) -> int:
    """The flag in front of an activation message."""
    return int(flat[:HEADER].view(torch.int64).item())


def stale_message(metas: Sequence[TensorMeta], device: torch.device) -> torch.Tensor:
    """A message of the old layout's size that says "new metadata follows"."""
    stale = torch.zeros(payload_size(metas), dtype=torch.uint8, device=device)
    stale[:HEADER].view(torch.int64).fill_(FLAG_META_FOLLOWS)
    return stale
