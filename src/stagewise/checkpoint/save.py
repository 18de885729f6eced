"""Saving a checkpoint: every rank writes its share, rank 0 commits it atomically.

Data-parallel replicas hold identical state: data-parallel rank 0 of each stage
writes the layer files. Every rank writes its own RNG state and client state.
Every rank must see ``save_dir`` (one machine, or a shared file system), as for
DeepSpeed's pipeline checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from stagewise.checkpoint.files import commit_dir, cpu_copy, save_file
from stagewise.checkpoint.layout import (
    ENGINE_STATES,
    FORMAT,
    FORMAT_VERSION,
    check_tag,
    layer_file_name,
    rank_file_name,
    write_manifest,
)
from stagewise.checkpoint.optim_state import layer_optimizer_state
from stagewise.checkpoint.state import CheckpointView, rng_state
from stagewise.errors import CheckpointError

__all__ = ["agree_on_tag", "save_checkpoint"]

logger = logging.getLogger(__name__)


def agree_on_tag(view: CheckpointView, tag: str) -> int:
    """Check every rank uses ``tag``; return a number rank 0 chose, the same everywhere."""
    digest = int.from_bytes(hashlib.sha1(tag.encode()).digest()[:7], "big")
    nonce = int.from_bytes(os.urandom(6), "big") if view.global_rank == 0 else 0
    values = torch.tensor([digest, -digest, nonce], dtype=torch.int64, device=view.device)
    view.collectives.all_reduce(values, f"agreeing on checkpoint tag {tag!r}", op=dist.ReduceOp.MAX)
    if int(values[0]) != digest or int(values[1]) != -digest:
        raise CheckpointError(
            f"rank {view.global_rank} uses checkpoint tag {tag!r} but another rank uses a "
            "different one; every rank must pass the same tag (or none)"
        )
    return int(values[2])


def _write_rank_files(view: CheckpointView, tmp_dir: str, client_state: Mapping[str, Any]) -> None:
    """This rank's share of a checkpoint: its layers (data-parallel rank 0), its own state."""
    table, optimizer, suffix = view.table, view.optimizer, view.rank_repr
    source = optimizer  # what the layers' optimizer files are read from
    if view.sharded_optimizer is not None:  # ZeRO-1: every replica sends its share
        source = view.sharded_optimizer.gather_unsharded()
    if view.writes_layers:
        for idx, layer in sorted(view.layers.items()):
            if idx not in table.module_files:
                continue
            save_file(
                cpu_copy(layer.state_dict()),
                os.path.join(tmp_dir, layer_file_name(idx, "model", suffix)),
            )
            has_params = any(True for _ in layer.parameters())
            if source is not None and table.owner(idx) == idx and has_params:
                save_file(
                    layer_optimizer_state(source, layer, type(optimizer).__name__),
                    os.path.join(tmp_dir, layer_file_name(idx, "optim", suffix)),
                )
    if view.global_rank == 0:
        scheduler, scaler, counters = view.lr_scheduler, view.loss_scaler, view.counters
        engine_states = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "global_steps": counters.global_steps,
            "global_samples": counters.global_samples,
            "skipped_steps": counters.skipped_steps,
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loss_scaler": scaler.state_dict() if scaler is not None else None,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "topology": view.topology,
            "num_layers": table.num_layers,
            "parts": list(view.parts),
            "client_state": dict(client_state),
        }
        save_file(engine_states, os.path.join(tmp_dir, ENGINE_STATES))
    rank_states = {
        "format": FORMAT,
        "rank": view.global_rank,
        "topology": view.topology,
        "rng": rng_state(view.device),
        "client_state": dict(client_state),
    }
    save_file(rank_states, os.path.join(tmp_dir, rank_file_name(view.global_rank)))


def save_checkpoint(
    view: CheckpointView,
    save_dir: str | os.PathLike[str],
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    save_latest: bool = True,
) -> bool:
    """Save one rank's share of a checkpoint under ``save_dir/tag``.

    Every rank must call it (as in DeepSpeed). ``tag`` defaults to
    ``global_step{N}``. The files appear together or not at all: each rank
    writes into a temporary directory, and rank 0 renames it to ``tag`` once
    every rank has finished, then updates ``latest`` (when ``save_latest``).
    Re-saving an existing tag replaces it.

    Returns:
        True, as DeepSpeed does.

    Raises:
        CheckpointError: when any rank failed to write its files (the previous
            checkpoint stays as it was).
        PeerError: when a rank died or did not finish within ``pipeline.timeout_s``.
    """
    save_path = os.fspath(save_dir)
    if not save_path:
        raise ValueError(f"save_dir must be a non-empty path, got {save_dir!r}")
    tag = f"global_step{view.counters.global_steps}" if tag is None else str(tag)
    check_tag(tag)
    collectives = view.collectives.with_hint(
        "a peer may have died or be stuck writing; the checkpoint was not committed"
    )
    view = dataclasses.replace(view, collectives=collectives)
    nonce = agree_on_tag(view, tag)
    tmp_dir = os.path.join(save_path, f".{tag}.tmp-{nonce:012x}")
    rank = view.global_rank

    error: BaseException | None = None
    try:
        os.makedirs(tmp_dir, exist_ok=True)
        _write_rank_files(view, tmp_dir, client_state or {})
    except Exception as exc:
        error = exc
    failed = view.collectives.failed_ranks(
        error is not None, f"waiting for every rank to write {tag!r}", view.device
    )
    if failed:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if error is not None:
            raise CheckpointError(
                f"rank {rank} could not write checkpoint {tag!r} in {save_path}: "
                f"{type(error).__name__}: {error}"
            ) from error
        raise CheckpointError(
            f"checkpoint {tag!r} in {save_path} was not saved: rank(s) {failed} failed to write "
            "their files (see their errors); the previous checkpoint is unchanged"
        )

    final = os.path.join(save_path, tag)
    if rank == 0:
        try:
            write_manifest(tmp_dir, tag, "full", view.table, view.metadata)
            commit_dir(tmp_dir, save_path, tag, save_latest)
        except Exception as exc:
            error = exc
    failed = view.collectives.failed_ranks(
        error is not None, f"committing checkpoint {tag!r}", view.device
    )
    if failed:
        if error is not None:
            raise CheckpointError(
                f"could not commit checkpoint {tag!r} in {save_path}: {type(error).__name__}: "
                f"{error}"
            ) from error
        raise CheckpointError(
            f"rank 0 could not commit checkpoint {tag!r} in {save_path} (see its error)"
        )
    if rank == 0:
        logger.info("saved checkpoint %s", final)
    return True
