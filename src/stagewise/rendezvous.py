"""A fresh key space for each incarnation of a job in a store that outlives restarts.

Under torchrun, workers meet in the agent's TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``),
and that store lives across ``--max-restarts``: with the default (static)
rendezvous and with ``c10d``/``--standalone`` alike, the restarted workers find
the keys of the incarnation that died (``torch.distributed`` adds no prefix per
attempt, although its comment in ``_create_c10d_store`` says the store is new
for every retry). A new rank 0 that reads a dead peer's gloo address fails in
``connectFullMesh`` with "Connection refused"; a stale barrier count leaves
the group waiting at start. ``TORCHELASTIC_RESTART_COUNT`` is no cure across
machines: each agent counts its own restarts, and an agent that restarts because
another node failed does not count it, so the counts drift apart.

:func:`incarnation_store` gives the ranks of one incarnation a prefix of their
own, agreed through the store without trusting anything already in it: each
rank writes a fresh random nonce; rank 0 draws a fresh token and publishes it
with the nonces it reads, again whenever they change, until every rank has
acknowledged that token with its own nonce. A rank accepts only a publication
that carries its own nonce, which no earlier incarnation can have written.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch.distributed as dist

from stagewise.errors import PeerError

__all__ = ["incarnation_store"]

_BASE = "stagewise/incarnation"


def _read(store: Any, key: str) -> str | None:
    if not store.check([key]):
        return None
    return bytes(store.get(key)).decode()


def incarnation_store(
    store: Any, rank: int, world_size: int, timeout_s: float = 300.0, poll_s: float = 0.01
) -> Any:
    """``store`` under a prefix that only this incarnation's ranks share.

    Every rank of the incarnation must call it. Raises :class:`PeerError` when the
    ranks did not all arrive within ``timeout_s``, naming those that did not answer.
    """
    if world_size == 1:
        return dist.PrefixStore(f"{_BASE}/{secrets.token_hex(8)}/", store)
    nonce = secrets.token_hex(8)
    store.set(f"{_BASE}/hello/{rank}", nonce)
    deadline = time.monotonic() + timeout_s
    poll_s = max(poll_s, world_size / 2000)  # rank 0 reads 2 keys per rank per poll
    token = secrets.token_hex(8) if rank == 0 else ""
    published = ""
    while time.monotonic() < deadline:
        if rank == 0:
            hellos = [_read(store, f"{_BASE}/hello/{r}") or "-" for r in range(world_size)]
            hellos[0] = nonce
            offer = f"{token}:{','.join(hellos)}"
            if offer != published:
                store.set(f"{_BASE}/offer", offer)
                published = offer
            acks = [_read(store, f"{_BASE}/ack/{r}") for r in range(1, world_size)]
            if all(ack == f"{token}:{hellos[r]}" for r, ack in enumerate(acks, start=1)):
                return dist.PrefixStore(f"{_BASE}/{token}/", store)
            missing = [r for r, ack in enumerate(acks, start=1) if ack != f"{token}:{hellos[r]}"]
        else:
            offer = _read(store, f"{_BASE}/offer") or ""
            offered, _, nonces = offer.partition(":")
            listed = nonces.split(",")
            if len(listed) == world_size and listed[rank] == nonce:
                store.set(f"{_BASE}/ack/{rank}", f"{offered}:{nonce}")
                return dist.PrefixStore(f"{_BASE}/{offered}/", store)
            missing = [0]
        time.sleep(poll_s)
    raise PeerError(
        f"rank {rank}: the ranks of this job did not all meet in the store within "
        f"{timeout_s:g} s (still waiting for rank(s) {missing}); are all {world_size} "
        "processes running?"
    )
