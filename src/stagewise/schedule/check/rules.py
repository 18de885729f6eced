"""The rules each stage keeps on its own: order, reductions, buffers.

1. *Order on each stage.* Every micro-batch passes through every virtual stage
   (model chunk) forward once and, when training, backward once: a ``B``, or an
   ``I`` then a ``W`` for a split backward, after its ``F``. An activation is
   received (``RA``) before the forward that uses it and sent (``SA``) after the
   forward that makes it; a gradient is received (``RG``) before the backward that
   uses it and sent (``SG``) after the backward that makes it; the first and the
   last virtual stage load (``L``) the micro-batch before its forward, and no other
   stage loads. Micro-batch, chunk and buffer ids are in range.
2. *Reductions.* When training, ``RDG`` and ``OPT`` come exactly once and
   ``RTG`` at most once on every stage, after all compute, ``OPT`` last; inference
   has none of them.
3. *Buffers.* A buffer (per stage and chunk) holds one micro-batch from its first
   use to its last; no other micro-batch touches it in between.

``CUSTOM`` instructions are passed over by every rule.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedule.check.state import Bools, CheckState, Ints
from stagewise.schedule.kinds import Kind, kind_mask

__all__ = ["check_stage"]


def check_stage(state: CheckState, stage: int) -> None:
    """Check the rules of one stage."""
    program = state.program.stages[stage]
    kinds = program.kind
    buffered = kind_mask("is_buffer_op")[kinds]
    if buffered.all():
        rows = np.arange(len(kinds))
        mb, chunk, buffer, kind = program.micro_batch, program.chunk, program.buffer, kinds
    else:
        rows = np.flatnonzero(buffered)
        mb, chunk, buffer = program.micro_batch[rows], program.chunk[rows], program.buffer[rows]
        kind = kinds[rows]
    kind = kind.astype(np.int64)  # keys below multiply kinds
    _check_ranges(state, stage, rows, mb, chunk, buffer)
    micro_batches, chunks = state.micro_batches, state.chunks

    # Where each (kind, chunk, micro-batch) runs; all but loads run once.
    is_load = kind == Kind.LOAD
    once = ~is_load
    key = (kind[once] * chunks + chunk[once]) * micro_batches + mb[once]
    once_rows = rows[once]
    first_at = np.full(len(Kind) * chunks * micro_batches, -1, np.int64)
    first_at[key[::-1]] = once_rows[::-1]  # the earliest row wins
    repeats = np.flatnonzero(first_at[key] != once_rows)
    if repeats.size:
        again = once_rows[repeats[0]]
        before = first_at[key[repeats[0]]]
        code = Kind(int(kind[once][repeats[0]])).code
        raise state.fail(
            f"stage {stage}: {state.where(stage, before)} and again "
            f"{state.where(stage, again)}: each micro-batch runs {code} once per chunk",
            (stage, before),
            (stage, again),
        )
    at = first_at.reshape(len(Kind), chunks, micro_batches)
    loads = np.full(micro_batches, -1, np.int64)
    loads[mb[is_load][::-1]] = rows[is_load][::-1]  # each micro-batch's first load
    _check_order(state, stage, at, loads)
    load_counts = np.bincount(mb[is_load], minlength=micro_batches)
    _check_load_counts(state, stage, load_counts, rows[is_load], mb[is_load])
    compute = np.flatnonzero(kind_mask("is_compute")[kinds])
    last_compute = int(compute[-1]) if compute.size else -1
    _check_reductions(state, stage, kinds, last_compute)
    _check_buffers(state, stage, rows, mb, chunk, buffer)


def _check_ranges(
    state: CheckState, stage: int, rows: Ints, mb: Ints, chunk: Ints, buffer: Ints
) -> None:
    """Micro-batch, chunk and buffer ids within the schedule's sizes."""
    if not rows.size:
        return
    micro_batches, chunks = state.micro_batches, state.chunks
    if mb.min() < 0 or mb.max() >= micro_batches:
        bad = np.flatnonzero((mb < 0) | (mb >= micro_batches))
        row = rows[bad[0]]
        raise state.fail(
            f"stage {stage}: {state.where(stage, row)} names micro-batch {mb[bad[0]]}, "
            f"but the batch has micro-batches 0..{micro_batches - 1}",
            (stage, row),
        )
    if chunk.max() >= chunks:
        bad = np.flatnonzero(chunk >= chunks)
        row = rows[bad[0]]
        raise state.fail(
            f"stage {stage}: {state.where(stage, row)} names chunk {chunk[bad[0]]}, but "
            f"the schedule places {chunks} chunk(s) per stage",
            (stage, row),
        )
    if state.num_buffers is not None and buffer.max() >= state.num_buffers[stage]:
        limit = state.num_buffers[stage]
        bad = np.flatnonzero(buffer >= limit)
        row = rows[bad[0]]
        raise state.fail(
            f"stage {stage}: {state.where(stage, row)} uses buffer {buffer[bad[0]]}, "
            f"but num_pipe_buffers() is {limit}: raise num_pipe_buffers() or "
            f"reuse a lower buffer",
            (stage, row),
        )


def _check_order(state: CheckState, stage: int, at: Ints, loads: Ints) -> None:
    """Forward, backward, exchanges and loads of every micro-batch, in order.

    ``at[kind, chunk, mb]`` is the row of that instruction (-1 when absent) and
    ``loads[mb]`` the row of the micro-batch's first load.
    """
    roles = state.roles[stage]
    first = np.array([[role.first] for role in roles])  # (chunks, 1)
    last = np.array([[role.last] for role in roles])
    forward = at[Kind.FORWARD]

    def locate(mask: Bools) -> tuple[int, int, str] | None:
        hits = np.flatnonzero(mask)
        if not hits.size:
            return None
        chunk, mb = divmod(int(hits[0]), state.micro_batches)
        tag = f"{mb}c{chunk}" if chunk else f"{mb}"
        return chunk, mb, tag

    def where(chunk: int) -> str:
        return f"stage {stage} (virtual stage {roles[chunk].virtual})"

    def need(kind: Kind, expected: Bools, missing: str, extra: str) -> Ints:
        rows = at[kind]
        code = kind.code
        hit = locate(expected & (rows < 0))
        if hit is not None:
            chunk, mb, tag = hit
            raise state.fail(
                f"{where(chunk)} has no {code}{tag}: {missing}", (stage, forward[chunk, mb])
            )
        hit = locate(~expected & (rows >= 0))
        if hit is not None:
            chunk, mb, _ = hit
            raise state.fail(
                f"{where(chunk)}: {state.where(stage, rows[chunk, mb])} is out of place: {extra}",
                (stage, rows[chunk, mb]),
            )
        return rows

    def before(earlier: Ints, later: Ints, rule: str) -> None:
        hit = locate((earlier >= 0) & (later >= 0) & (earlier > later))
        if hit is not None:
            chunk, mb, _ = hit
            a, b = earlier[chunk, mb], later[chunk, mb]
            raise state.fail(
                f"{where(chunk)}: {state.where(stage, a)} comes after "
                f"{state.where(stage, b)}: {rule}",
                (stage, a),
                (stage, b),
            )

    everywhere = np.ones_like(forward, dtype=bool)
    hit = locate(forward < 0)
    if hit is not None:
        chunk, _, tag = hit
        raise state.fail(
            f"{where(chunk)} never runs F{tag}: every micro-batch must pass forward "
            f"through every virtual stage once"
        )
    recv = need(
        Kind.RECV_ACTIVATION,
        ~first & everywhere,
        "every virtual stage but the first receives its input",
        "the first virtual stage receives no activation",
    )
    before(recv, forward, "an activation is received before the forward that uses it")
    loaded = (first | last) & everywhere
    hit = locate(loaded & (loads[None, :] < 0))
    if hit is not None:
        chunk, mb, _ = hit
        raise state.fail(
            f"{where(chunk)} never loads micro-batch {mb}: the first and the last "
            f"virtual stage load each micro-batch (inputs, labels) before its forward",
            (stage, forward[chunk, mb]),
        )
    before(
        np.where(loaded, loads[None, :], -1),
        forward,
        "a micro-batch is loaded before its forward",
    )
    send = need(
        Kind.SEND_ACTIVATION,
        ~last & everywhere,
        "every virtual stage but the last sends its output on",
        "the last virtual stage sends no activation",
    )
    before(forward, send, "an activation is sent after the forward that makes it")

    if not state.training:
        for kind in (
            Kind.BACKWARD,
            Kind.BACKWARD_INPUT,
            Kind.BACKWARD_WEIGHT,
            Kind.RECV_GRAD,
            Kind.SEND_GRAD,
        ):
            need(kind, ~everywhere, "", "an inference schedule has no backward")
        return
    whole, split_input, split_weight = (
        at[Kind.BACKWARD],
        at[Kind.BACKWARD_INPUT],
        at[Kind.BACKWARD_WEIGHT],
    )
    hit = locate((whole >= 0) & ((split_input >= 0) | (split_weight >= 0)))
    if hit is not None:
        chunk, mb, _ = hit
        other = max(split_input[chunk, mb], split_weight[chunk, mb])
        raise state.fail(
            f"{where(chunk)} runs both {state.where(stage, whole[chunk, mb])} and "
            f"{state.where(stage, other)}: a micro-batch's backward is one B, or an I "
            f"and a W",
            (stage, whole[chunk, mb]),
            (stage, other),
        )
    hit = locate((whole < 0) & ((split_input < 0) | (split_weight < 0)))
    if hit is not None:
        chunk, mb, tag = hit
        has_input, has_weight = split_input[chunk, mb] >= 0, split_weight[chunk, mb] >= 0
        missing = (
            Kind.BACKWARD_WEIGHT
            if has_input
            else Kind.BACKWARD_INPUT
            if has_weight
            else Kind.BACKWARD
        ).code
        raise state.fail(
            f"{where(chunk)} never runs {missing}{tag}: every micro-batch must pass "
            f"backward through every virtual stage once (a B, or an I then a W)",
            (stage, forward[chunk, mb]),
        )
    backward = np.where(whole >= 0, whole, split_input)
    before(forward, backward, "a micro-batch's forward runs before its backward")
    before(
        split_input,
        split_weight,
        "the input gradient (I) runs before the weight gradient (W)",
    )
    recv_grad = need(
        Kind.RECV_GRAD,
        ~last & everywhere,
        "every virtual stage but the last receives its output's gradient",
        "the last virtual stage receives no gradient",
    )
    before(recv_grad, backward, "a gradient is received before the backward that uses it")
    send_grad = need(
        Kind.SEND_GRAD,
        ~first & everywhere,
        "every virtual stage but the first sends its input's gradient back",
        "the first virtual stage sends no gradient",
    )
    before(backward, send_grad, "a gradient is sent after the backward that makes it")


def _check_load_counts(state: CheckState, stage: int, counts: Ints, rows: Ints, mbs: Ints) -> None:
    """Loads only on the first and last virtual stages, once per such stage held."""
    allowed = sum(1 for role in state.roles[stage] if role.first or role.last)
    over = np.flatnonzero(counts > allowed)
    if not over.size:
        return
    mb = int(over[0])
    indices = rows[mbs == mb]
    holds = (
        "neither the first nor the last virtual stage"
        if allowed == 0
        else f"{allowed} of the first and last virtual stages"
    )
    raise state.fail(
        f"stage {stage} loads micro-batch {mb} {len(indices)} time(s) but holds "
        f"{holds}: load once per first or last virtual stage held",
        *((stage, i) for i in indices),
    )


def _check_reductions(state: CheckState, stage: int, kinds: Ints, last_compute: int) -> None:
    """RTG at most once, RDG and OPT exactly once, after all compute, OPT last."""
    found: dict[Kind, list[int]] = {}
    for row in np.flatnonzero(kind_mask("closes_batch")[kinds]).tolist():
        found.setdefault(Kind(int(kinds[row])), []).append(row)
    if not state.training:
        for rows in found.values():
            raise state.fail(
                f"stage {stage}: {state.where(stage, rows[0])} in an inference "
                f"schedule: only training reduces gradients and steps the optimizer",
                (stage, rows[0]),
            )
        return
    for kind in (Kind.REDUCE_TIED, Kind.REDUCE_GRADS, Kind.OPTIMIZER_STEP):
        rows = found.get(kind, [])
        code = kind.code
        if len(rows) > 1:
            raise state.fail(
                f"stage {stage} runs {code} {len(rows)} times (steps "
                f"{', '.join(str(state.pos(stage, row).step) for row in rows)}): it "
                f"belongs once, at the end of the batch",
                *((stage, row) for row in rows),
            )
        if not rows and kind != Kind.REDUCE_TIED:
            what = "RDG (reduce gradients)" if kind == Kind.REDUCE_GRADS else "OPT (optimizer step)"
            raise state.fail(
                f"stage {stage} never runs {code}: a training schedule ends with {what} "
                f"on every stage"
            )
        if rows and rows[0] < last_compute:
            raise state.fail(
                f"stage {stage}: {state.where(stage, rows[0])} comes before "
                f"{state.where(stage, last_compute)}: reductions and the optimizer step "
                f"come after all compute",
                (stage, rows[0]),
                (stage, last_compute),
            )
    step = found[Kind.OPTIMIZER_STEP][0]
    for kind in (Kind.REDUCE_TIED, Kind.REDUCE_GRADS):
        for row in found.get(kind, []):
            if row > step:
                raise state.fail(
                    f"stage {stage}: {state.where(stage, row)} comes after "
                    f"{state.where(stage, step)}: gradients are reduced before the "
                    f"optimizer step",
                    (stage, row),
                    (stage, step),
                )


def _check_buffers(
    state: CheckState, stage: int, rows: Ints, mb: Ints, chunk: Ints, buffer: Ints
) -> None:
    """No micro-batch touches a buffer (per chunk) that another one still needs."""
    if not rows.size:
        return
    micro_batches = state.micro_batches
    last_use = np.full(state.chunks * micro_batches, -1, np.int64)
    last_use[chunk * micro_batches + mb] = rows  # the latest row wins
    # each buffer's users in program order: rows are in order, so a stable sort by
    # (chunk, buffer) alone does it (a radix sort when the key fits 16 bits)
    key = chunk * (int(buffer.max()) + 1) + buffer
    order = np.argsort(key.astype(np.int16) if key.max() < 2**15 else key, kind="stable")
    r, m, c, b = rows[order], mb[order], chunk[order], buffer[order]
    handover = (key[order][1:] == key[order][:-1]) & (m[1:] != m[:-1])
    early = handover & (last_use[c[:-1] * micro_batches + m[:-1]] > r[1:])
    bad = np.flatnonzero(early)
    if not bad.size:
        return
    first_bad = bad[np.argmin(r[1:][bad])]
    row, holder = r[1:][first_bad], int(m[:-1][first_bad])
    pending = last_use[c[:-1][first_bad] * micro_batches + holder]
    raise state.fail(
        f"stage {stage}: {state.where(stage, row)} uses buffer {b[1:][first_bad]} while "
        f"micro-batch {holder} still needs it (until {state.where(stage, pending)}): give "
        f"it another buffer or move it after that",
        (stage, row),
        (stage, pending),
    )
