"""Loading a checkpoint saved with any number of stages (or DeepSpeed's layer files).

Loading checks the manifest and names any missing or torn file; it never loads
part of a checkpoint silently: every rank votes, and every rank raises when any
rank failed. RNG states are restored only when the topology is unchanged (a
rank's random stream has no meaning on another layout). Tensor-parallel
(``model`` axis) degrees must match between save and load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from stagewise.checkpoint.files import load_file
from stagewise.checkpoint.layout import (
    ENGINE_STATES,
    LATEST,
    MANIFEST,
    layer_file_name,
    rank_file_name,
    read_latest,
    read_manifest,
    verify_manifest,
)
from stagewise.checkpoint.optim_state import load_optimizer_state
from stagewise.checkpoint.save import agree_on_tag
from stagewise.checkpoint.state import CheckpointView, LoadResult, TrainingCounters, set_rng_state
from stagewise.errors import CheckpointError

__all__ = ["load_checkpoint"]

logger = logging.getLogger(__name__)


def _load_module(view: CheckpointView, tag_dir: str, strict: bool) -> None:
    table, suffix = view.table, view.rank_repr
    done: set[str] = set()
    for idx, layer in sorted(view.layers.items()):
        key = table.tied_key(idx)
        if key is not None:
            if key in done:
                continue
            done.add(key)
            candidates = [
                os.path.join(tag_dir, layer_file_name(i, "model", suffix)) for i in table.tied[key]
            ]
            found = [p for p in candidates if os.path.isfile(p)]
            what = f"tied module {key!r} (layers {table.tied[key]})"
            path = found[0] if found else candidates[table.tied[key].index(table.canonical[key])]
        else:
            path = os.path.join(tag_dir, layer_file_name(idx, "model", suffix))
            what = f"layer {idx} ({type(layer).__name__})"
        if not os.path.isfile(path) and not layer.state_dict():
            continue  # nothing to load (e.g. an activation module)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"checkpoint {tag_dir} has no weights for {what}: {path} is missing; was it "
                f"saved from the same layer list? ({table.num_layers} layers here)"
            )
        state = load_file(path, f"weights of {what}")
        try:
            layer.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path} does not fit {what}: {exc}; check the layer list (or pass "
                "load_module_strict=False to skip missing and unexpected keys)"
            ) from exc


def _load_training_state(
    view: CheckpointView,
    tag_dir: str,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
) -> tuple[TrainingCounters, dict[str, Any], Any]:
    """Scheduler, loss scale, optimizer and (same layout only) RNG; the counters, the client
    state and this rank's data-loader position (same layout only, else None)."""
    states = load_file(os.path.join(tag_dir, ENGINE_STATES), "engine state")
    if states.get("num_layers") != view.table.num_layers:
        raise CheckpointError(
            f"{tag_dir} was saved from a model of {states.get('num_layers')} layers but this "
            f"one has {view.table.num_layers}; build the PipelineModule from the same layer list"
        )
    counters = TrainingCounters(
        global_steps=int(states["global_steps"]),
        global_samples=int(states["global_samples"]),
        skipped_steps=int(states["skipped_steps"]),
    )
    if view.loss_scaler is not None and states.get("loss_scaler") is not None:
        view.loss_scaler.load_state_dict(states["loss_scaler"])
    if load_optimizer_states and view.optimizer is not None:
        target = view.optimizer
        if view.sharded_optimizer is not None:  # ZeRO-1: this replica keeps its share
            target = view.sharded_optimizer.unsharded_loader()
        load_optimizer_state(
            target, view.layers, view.table, tag_dir, view.rank_repr, type(view.optimizer).__name__
        )
    if (
        load_lr_scheduler_states
        and view.lr_scheduler is not None
        and states.get("lr_scheduler") is not None
    ):
        view.lr_scheduler.load_state_dict(states["lr_scheduler"])
    client_state: dict[str, Any] = dict(states.get("client_state") or {})
    data_state = None
    if states.get("topology") == view.topology:
        mine = load_file(
            os.path.join(tag_dir, rank_file_name(view.global_rank)), "this rank's RNG state"
        )
        set_rng_state(mine["rng"], view.device)
        client_state = dict(mine.get("client_state") or {})
        data_state = mine.get("data")
    elif view.global_rank == 0:
        logger.warning(
            "%s was saved with topology %s, now %s: RNG states and data-loader positions are "
            "not restored (a rank's random stream and share of the data are only meaningful "
            "on the same layout): stagewise's loaders start their epoch afresh, so skip the "
            "samples already trained on yourself if that matters",
            tag_dir,
            states.get("topology"),
            view.topology,
        )
    return counters, client_state, data_state


def load_checkpoint(
    view: CheckpointView,
    load_dir: str | os.PathLike[str],
    tag: str | None = None,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
) -> LoadResult:
    """Load one rank's share of a checkpoint into the modules and optimizer of ``view``.

    Every rank must call it. With ``tag=None`` the tag is read from
    ``load_dir/latest``; when that file does not exist nothing is loaded and a
    warning is logged, as DeepSpeed does (so a script can resume when a
    checkpoint is there and start afresh otherwise). A ``load_dir`` that does
    not exist is an error (DeepSpeed returns ``(None, None)`` there too, which
    hides a mistyped path). Every file read is checked against the size and
    SHA-256 that the manifest records.

    ``load_module_only=True`` loads the layer weights alone: this is how
    checkpoints written by DeepSpeed or :func:`import_state_dict` are read.

    Returns:
        The tag directory, the client state and the saved counters (for the caller
        to apply; None with ``load_module_only``).

    Raises:
        CheckpointError: naming the file when one is missing, torn or does not fit;
            every rank raises when any rank failed, so no rank trains on a half load.
    """
    load_path = os.fspath(load_dir)
    if not os.path.isdir(load_path):
        raise CheckpointError(
            f"checkpoint directory {load_path} does not exist; check the path (a directory "
            "without a 'latest' file loads nothing, but a missing one is a mistake)"
        )
    if tag is None:
        tag = read_latest(load_path)
        if tag is None:
            if view.global_rank == 0:
                logger.warning(
                    "no %s file in %s: nothing loaded; pass tag= to load a given checkpoint",
                    LATEST,
                    load_path,
                )
            return LoadResult(None, None)
    tag = str(tag)
    collectives = view.collectives.with_hint(
        "a peer may have died or be stuck reading; the checkpoint was not loaded"
    )
    view = dataclasses.replace(view, collectives=collectives)
    agree_on_tag(view, tag)
    tag_dir = os.path.join(load_path, tag)
    error: BaseException | None = None
    client_state: dict[str, Any] = {}
    counters: TrainingCounters | None = None
    data_state: Any = None
    try:
        if not os.path.isdir(tag_dir):
            raise CheckpointError(
                f"checkpoint directory {tag_dir} does not exist; check load_dir and tag"
            )
        manifest = read_manifest(tag_dir)
        if manifest is not None:
            verify_manifest(tag_dir, manifest)
        if not load_module_only:
            if not os.path.isfile(os.path.join(tag_dir, ENGINE_STATES)):
                raise CheckpointError(
                    f"{tag_dir} holds weights only (no {ENGINE_STATES}: written by DeepSpeed or "
                    "import_state_dict); load it with load_module_only=True"
                )
            if manifest is None:
                raise CheckpointError(
                    f"{tag_dir} has {ENGINE_STATES} but no {MANIFEST}: it was not completed by "
                    "stagewise; load an earlier tag or use load_module_only=True"
                )
        _load_module(view, tag_dir, load_module_strict)
        if not load_module_only:
            counters, client_state, data_state = _load_training_state(
                view, tag_dir, load_optimizer_states, load_lr_scheduler_states
            )
        elif os.path.isfile(os.path.join(tag_dir, ENGINE_STATES)):
            states = load_file(os.path.join(tag_dir, ENGINE_STATES), "engine state")
            client_state = dict(states.get("client_state") or {})
    except Exception as exc:
        error = exc
    failed = view.collectives.failed_ranks(
        error is not None, f"loading checkpoint {tag_dir}", view.device
    )
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"loading {tag_dir} failed on rank(s) {failed} (see their errors); this rank's "
            "state is partly loaded: do not train on it"
        )
    if view.global_rank == 0:
        logger.info("loaded checkpoint %s", tag_dir)
    return LoadResult(tag_dir, client_state, counters, data_state)
