"""Point-to-point transfer of tensor tuples between pipeline stages.

Every transfer is ONE message: the tuple's tensors are packed, byte for byte,
into a single flat ``uint8`` buffer (any dtype: float, bf16, int64, bool, ...).
Shapes and dtypes travel as a separate metadata message only the first time a
channel is used and again when they change, so variable sequence lengths work
without a ``dynamic_shape`` flag:

* steady state: ``[flag=0 | tensor bytes]``, sized from the known metadata;
* shapes changed: the sender first sends a message of the *old* size whose
  flag is 1, then the new metadata, then the data. The receiver, which posted
  a receive of the old size, sees the flag and follows.

Gradients travel on their own channel without metadata: their layout is that
of the floating-point tensors of the activation they belong to, which the
receiver already holds.

Sends are asynchronous (the buffer is kept alive until the send completes);
receives block, but every wait is bounded by ``timeout_s`` and a peer that
died or went silent raises :class:`~stagewise.errors.PeerError` naming it.
Transfers to the same rank (a V schedule's turn) go through a local queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stagewise.dist_utils import wait_bounded
from stagewise.errors import PeerError

__all__ = ["P2PChannels", "TensorMeta", "pack", "unpack"]

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
_HEADER = 8  # one int64 flag in front of the data
_META_LEN = 512  # int64 slots in a metadata message
_FLAG_DATA = 0
_FLAG_META_FOLLOWS = 1


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


def payload_size(metas: Sequence[TensorMeta], header: int = _HEADER) -> int:
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
    tensors: Sequence[torch.Tensor], flag: int = _FLAG_DATA, header: bool = True
) -> torch.Tensor:
    """Pack ``tensors`` into one flat byte buffer (with a flag header when ``header``)."""
    metas = metas_of(tensors)
    head = _HEADER if header else 0
    device = tensors[0].device if tensors else torch.device("cpu")
    flat = torch.empty(payload_size(metas, head), dtype=torch.uint8, device=device)
    offset = 0
    if header:
        flat[:_HEADER].view(torch.int64).fill_(flag)
        offset = _aligned(_HEADER)
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
    offset = _aligned(_HEADER) if header else 0
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
    if len(values) > _META_LEN:
        raise ValueError(
            f"the tensors sent between stages need {len(values)} metadata slots, more than "
            f"{_META_LEN}; send fewer tensors (or fewer dimensions) from one stage to the next"
        )
    out = torch.zeros(_META_LEN, dtype=torch.int64)
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


@dataclass
class _Channel:
    metas: tuple[TensorMeta, ...] | None = None
    local: deque[list[torch.Tensor]] = field(default_factory=deque)
    # A receive posted ahead of its instruction: (work, buffer, the layout it will hold).
    posted: tuple[Any, torch.Tensor, tuple[TensorMeta, ...]] | None = None


class P2PChannels:
    """Tagged point-to-point channels from this rank to its pipeline neighbours.

    Args:
        rank: this process's global rank.
        device: where received tensors live.
        timeout_s: the longest any single wait may take.
        describe: names a global rank for error messages (e.g. ``"stage 1 (rank 3)"``).
    """

    def __init__(
        self,
        rank: int,
        device: torch.device,
        timeout_s: float,
        describe: Callable[[int], str] = lambda r: f"rank {r}",
    ) -> None:
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.describe = describe
        self._channels: dict[tuple[str, int, int], _Channel] = {}
        self._pending: list[tuple[Any, torch.Tensor, int, str]] = []

    def _channel(self, direction: str, peer: int, tag: int) -> _Channel:
        key = (direction, peer, tag)
        if key not in self._channels:
            self._channels[key] = _Channel()
        return self._channels[key]

    # -- waits with a bound ------------------------------------------------------------
    def _wait(self, work: Any, peer: int, what: str) -> None:
        wait_bounded(
            work, self.timeout_s, self.describe(self.rank), f"{what} {self.describe(peer)}"
        )

    def _isend(self, flat: torch.Tensor, peer: int, tag: int, what: str) -> None:
        work = dist.isend(flat, dst=peer, tag=tag)
        self._pending.append((work, flat, peer, what))
        if len(self._pending) > 64:
            self.flush(keep_last=16)

    def _recv(self, flat: torch.Tensor, peer: int, tag: int, what: str) -> None:
        work = dist.irecv(flat, src=peer, tag=tag)
        self._wait(work, peer, what)

    def flush(self, keep_last: int = 0) -> None:
        """Wait for sends issued so far (all but the ``keep_last`` newest)."""
        while len(self._pending) > keep_last:
            work, _flat, peer, what = self._pending.pop(0)
            self._wait(work, peer, what)

    # -- activations: tuples of any dtype, with metadata when the shapes change ------
    def send_tensors(self, tensors: Sequence[torch.Tensor], dst: int, tag: int) -> None:
        """Send ``tensors`` to ``dst`` on channel ``tag`` without waiting."""
        channel = self._channel("send", dst, tag)
        if dst == self.rank:
            channel.local.append([t.detach() for t in tensors])
            return
        metas = metas_of(tensors)
        what = "sending activations to"
        if channel.metas is not None and channel.metas != metas:
            stale = torch.zeros(payload_size(channel.metas), dtype=torch.uint8, device=self.device)
            stale[:_HEADER].view(torch.int64).fill_(_FLAG_META_FOLLOWS)
            self._isend(stale, dst, tag, what)
        if channel.metas != metas:
            self._isend(encode_meta(metas).to(self.device), dst, tag, what)
            channel.metas = metas
        self._isend(pack(tensors), dst, tag, what)

    def recv_tensors(self, src: int, tag: int) -> list[torch.Tensor]:
        """Receive a tuple of tensors from ``src`` on channel ``tag`` (blocking, bounded)."""
        channel = self._channel("recv", src, tag)
        if src == self.rank:
            return [t.clone() for t in self._pop_local(tag, "receive")]
        what = "receiving activations from"
        if channel.posted is not None:
            work, flat, metas = channel.posted
            channel.posted = None
            self._wait(work, src, what)
        else:
            metas = channel.metas if channel.metas is not None else self._recv_meta(src, tag, what)
            flat = torch.empty(payload_size(metas), dtype=torch.uint8, device=self.device)
            self._recv(flat, src, tag, what)
        if int(flat[:_HEADER].view(torch.int64).item()) == _FLAG_META_FOLLOWS:
            metas = self._recv_meta(src, tag, what)
            flat = torch.empty(payload_size(metas), dtype=torch.uint8, device=self.device)
            self._recv(flat, src, tag, what)
        channel.metas = metas
        return unpack(flat, metas)

    def _pop_local(self, tag: int, what: str) -> list[torch.Tensor]:
        """The oldest tensors this rank sent itself on channel ``tag`` (a V schedule's turn)."""
        mine = self._channel("send", self.rank, tag)
        if not mine.local:
            raise PeerError(
                f"{self.describe(self.rank)}: {what} from itself on channel {tag} before the "
                "matching send; the schedule orders them wrongly"
            )
        return list(mine.local.popleft())

    def post_recv_tensors(self, src: int, tag: int) -> None:
        """Post the next activation receive of a channel ahead of its instruction.

        The data then lands as soon as it is sent, instead of waiting for the receive
        (gloo moves a message only once its receive is posted). At most one receive
        per channel is posted ahead, of the last known size: when the shapes change,
        the sender's "metadata follows" message has that size, and the rest is read
        after it.
        """
        channel = self._channel("recv", src, tag)
        if src == self.rank or channel.metas is None or channel.posted is not None:
            return
        flat = torch.empty(payload_size(channel.metas), dtype=torch.uint8, device=self.device)
        channel.posted = (dist.irecv(flat, src=src, tag=tag), flat, channel.metas)

    def post_recv_grads(self, like: Sequence[torch.Tensor], src: int, tag: int) -> None:
        """Post the next gradient receive of a channel (shaped like ``like``) ahead of time."""
        channel = self._channel("grad", src, tag)
        if src == self.rank or not like or channel.posted is not None:
            return
        metas = metas_of(like)
        flat = torch.empty(payload_size(metas, header=0), dtype=torch.uint8, device=self.device)
        channel.posted = (dist.irecv(flat, src=src, tag=tag), flat, metas)

    def _recv_meta(self, src: int, tag: int, what: str) -> tuple[TensorMeta, ...]:
        encoded = torch.empty(_META_LEN, dtype=torch.int64, device=self.device)
        self._recv(encoded, src, tag, what)
        return decode_meta(encoded.cpu())

    # -- gradients: layout known from the activation they belong to ------------------
    def send_grads(self, grads: Sequence[torch.Tensor], dst: int, tag: int) -> None:
        """Send gradients (one per floating-point activation) without waiting."""
        if dst == self.rank:
            self._channel("send", dst, tag).local.append([g.detach() for g in grads])
            return
        if grads:
            self._isend(pack(grads, header=False), dst, tag, "sending gradients to")

    def recv_grads(self, like: Sequence[torch.Tensor], src: int, tag: int) -> list[torch.Tensor]:
        """Receive gradients shaped like ``like`` from ``src`` (blocking, bounded)."""
        if src == self.rank:
            return self._pop_local(tag, "gradient receive")
        if not like:
            return []
        what = "receiving gradients from"
        channel = self._channel("grad", src, tag)
        if channel.posted is not None:
            work, flat, metas = channel.posted
            channel.posted = None
            if metas != metas_of(like):
                raise PeerError(
                    f"{self.describe(self.rank)}: a gradient receive was posted for shapes "
                    f"{[m.shape for m in metas]} but {[t.shape for t in like]} are expected; "
                    "gradients must come back in the order the schedule planned"
                )
            self._wait(work, src, what)
            return unpack(flat, metas, header=False)
        metas = metas_of(like)
        flat = torch.empty(payload_size(metas, header=0), dtype=torch.uint8, device=self.device)
        self._recv(flat, src, tag, what)
        return unpack(flat, metas, header=False)
