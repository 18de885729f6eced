"""Saving a checkpoint: every rank writes its share, rank 0 commits it atomically.

Data-parallel replicas hold identical state: data-parallel rank 0 of each stage
writes the layer files. Every rank writes its own RNG state, client state and
data-loader position. Every rank must see ``save_dir`` (one machine, or a
shared file system), as for DeepSpeed's pipeline checkpoints.

A save has two phases. :func:`capture` copies this rank's share to host memory
(file name -> object to ``torch.save``); :func:`write_and_commit` writes those
files into a temporary directory (each with its SHA-256), lets every rank vote,
and has rank 0 write the manifest, commit, remove what earlier saves that died
left behind and rotate old periodic checkpoints. :func:`save_checkpoint` runs
both in the caller; :class:`~stagewise.checkpoint.async_save.AsyncSaver` runs
the second in a background thread.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from stagewise.checkpoint.files import commit_dir, cpu_copy, save_file, write_text_atomic
from stagewise.checkpoint.layout import (
    ENGINE_STATES,
    FORMAT,
    FORMAT_VERSION,
    check_tag,
    digests_file_name,
    layer_file_name,
    rank_file_name,
    write_manifest,
)
from stagewise.checkpoint.optim_state import layer_optimizer_state
from stagewise.checkpoint.periodic import rotate
from stagewise.checkpoint.state import CheckpointView, rng_state
from stagewise.errors import CheckpointError

__all__ = ["agree_on_tag", "capture", "save_checkpoint", "write_and_commit"]

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


def capture(view: CheckpointView, client_state: Mapping[str, Any]) -> dict[str, Any]:
    """This rank's share of a checkpoint, copied to host memory: file name -> object.

    Training may change every live object as soon as this returns.
    """
    table, optimizer, suffix = view.table, view.optimizer, view.rank_repr
    client = cpu_copy(copy.deepcopy(dict(client_state)))
    files: dict[str, Any] = {}
    source = optimizer  # what the layers' optimizer files are read from
    if view.sharded_optimizer is not None:  # ZeRO-1: every replica sends its share
        source = view.sharded_optimizer.gather_unsharded()
    if view.writes_layers:
        for idx, layer in sorted(view.layers.items()):
            if idx not in table.module_files:
                continue
            files[layer_file_name(idx, "model", suffix)] = cpu_copy(layer.state_dict())
            has_params = any(True for _ in layer.parameters())
            if source is not None and table.owner(idx) == idx and has_params:
                files[layer_file_name(idx, "optim", suffix)] = layer_optimizer_state(
                    source, layer, type(optimizer).__name__
                )
    if view.global_rank == 0:
        scheduler, scaler, counters = view.lr_scheduler, view.loss_scaler, view.counters
        files[ENGINE_STATES] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "global_steps": counters.global_steps,
            "global_samples": counters.global_samples,
            "skipped_steps": counters.skipped_steps,
            "lr_scheduler": copy.deepcopy(scheduler.state_dict())
            if scheduler is not None
            else None,
            "loss_scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "topology": copy.deepcopy(view.topology),
            "num_layers": table.num_layers,
            "parts": list(view.parts),
            "client_state": client,
        }
    files[rank_file_name(view.global_rank)] = {
        "format": FORMAT,
        "rank": view.global_rank,
        "topology": copy.deepcopy(view.topology),
        "rng": rng_state(view.device),
        "client_state": client,
        "data": cpu_copy(copy.deepcopy(view.data_state)),
    }
    return files


def write_and_commit(
    view: CheckpointView,
    save_path: str,
    tag: str,
    files: Mapping[str, Any],
    save_latest: bool = True,
    keep_last: int = 0,
) -> str:
    """Write a captured share into ``save_path/tag`` and commit it; the tag directory.

    Every rank must call it with its own ``files``. It uses only ``view``'s table,
    metadata, rank, device and collectives (so it may run beside training, over
    collectives of its own). With ``keep_last`` > 0, rank 0 then deletes all but the
    newest ``keep_last`` complete ``global_step<N>`` checkpoints.

    Raises:
        CheckpointError: when any rank failed to write its files (the previous
            checkpoint stays as it was).
        PeerError: when a rank died or did not finish within ``pipeline.timeout_s``.
    """
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
        digests = {name: save_file(obj, os.path.join(tmp_dir, name)) for name, obj in files.items()}
        write_text_atomic(os.path.join(tmp_dir, digests_file_name(rank)), json.dumps(digests))
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
            rotate(save_path, keep_last)
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
    return final


def save_checkpoint(
    view: CheckpointView,
    save_dir: str | os.PathLike[str],
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    save_latest: bool = True,
    keep_last: int = 0,
) -> bool:
    """Save one rank's share of a checkpoint under ``save_dir/tag``.

    Every rank must call it (as in DeepSpeed). ``tag`` defaults to
    ``global_step{N}``. The files appear together or not at all: each rank
    writes into a temporary directory, and rank 0 renames it to ``tag`` once
    every rank has finished, then updates ``latest`` (when ``save_latest``).
    Re-saving an existing tag replaces it. ``keep_last`` > 0 rotates periodic
    checkpoints after the commit (see :func:`write_and_commit`).

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
    files = capture(view, client_state or {})
    write_and_commit(view, save_path, tag, files, save_latest, keep_last)
    return True
