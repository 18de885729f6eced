"""DeepSpeed's balanced split, computed as DeepSpeed computes it, to break ties its way.

DeepSpeed 0.19.8's ``partition_balanced`` is a dynamic programme over
``(items, parts)``: for items ``[0, i)`` in ``j`` parts it tries every last
part ``[k, i)`` and keeps the one whose split has the smallest spread
(heaviest minus lightest part, computed from the heaviest and lightest of the
best split of ``[0, k)`` into ``j - 1`` parts), a later ``k`` winning a tie,
all in float64 from NumPy's prefix sums. Its answer is not always the lightest
heaviest part, but where it is, users' layers sit where DeepSpeed put them
(a dropout or an in-place layer on the same rank), so :func:`partition_balanced`
returns it then. :func:`deepspeed_split` reproduces it exactly, vectorised over
``k`` and over blocks of ``i``; rows that cannot reach the final split are skipped.

Its cost grows as ``parts * (n - parts)**2``; above :data:`BUDGET` element steps
(about 1,000 layers into 64 parts; DeepSpeed itself takes minutes there)
:func:`deepspeed_split` returns None and the caller keeps its own tie-break.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["BUDGET", "deepspeed_split"]

#: The most ``parts * (n - parts)**2`` element steps :func:`deepspeed_split` takes on.
BUDGET = 1 << 26

_BLOCK = 64  # rows of i per vectorised step


def deepspeed_split(weights: Sequence[float], num_parts: int) -> list[int] | None:
    """DeepSpeed's boundaries for ``weights`` in ``num_parts`` parts (None above the budget).

    Call with more items than parts and valid weights (finite, non-negative).

    >>> deepspeed_split([1, 0, 0, 1], 2)
    [0, 3, 4]
    """
    n, parts = len(weights), num_parts
    if parts * (n - parts) ** 2 > BUDGET:
        return None
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    inf = np.inf
    heavy = np.full(n + 1, inf)  # the best split's heaviest part, per row (level j - 1)
    light = np.full(n + 1, inf)  # its lightest part
    heavy[0] = 0.0  # zero items in zero parts: DeepSpeed starts its maximum at 0, minimum at inf
    choice = np.zeros((parts + 1, n + 1), dtype=np.int64)
    for j in range(1, parts + 1):
        next_heavy = np.full(n + 1, inf)
        next_light = np.full(n + 1, inf)
        first_row, last_row = j, n - (parts - j)  # rows that can still end in the final split
        for top in range(first_row, last_row + 1, _BLOCK):
            rows = np.arange(top, min(top + _BLOCK, last_row + 1))
            ks = np.arange(j - 1, rows[-1])  # the last part [k, i), k < i
            span = prefix[rows, None] - prefix[None, ks]  # (rows, ks)
            hi = np.maximum(heavy[None, ks], span)
            lo = np.minimum(light[None, ks], span)
            spread = hi - lo
            spread[ks[None, :] >= rows[:, None]] = inf
            # DeepSpeed keeps the last k of the smallest spread (its `>=` comparison).
            last = spread.shape[1] - 1 - np.argmin(spread[:, ::-1], axis=1)
            at = np.arange(len(rows))
            next_heavy[rows] = hi[at, last]
            next_light[rows] = lo[at, last]
            choice[j, rows] = ks[last]
        heavy, light = next_heavy, next_light
    boundaries = [n]
    for j in range(parts, 0, -1):
        boundaries.append(int(choice[j, boundaries[-1]]))
    boundaries.reverse()
    return boundaries
