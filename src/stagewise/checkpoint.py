"""Checkpoints: one file per layer, loadable with any number of stages, written atomically.

On disk (``save_dir/tag/``, ``tag`` defaulting to DeepSpeed's ``global_step{N}``)::

    layer_00-model_states.pt      a layer's state dict, DeepSpeed's name and format
    layer_00-optim_states.pt      the optimizer state of that layer's parameters, by name
    engine_states.pt              global: step counters, scheduler, loss scale, topology
    rank_000-states.pt            per rank: RNG states of Python, NumPy and torch, client state
    manifest.json                 every file with its size, the tied keys, the module's
                                  checkpoint_metadata (under "metadata")
    ../latest                     the newest tag (DeepSpeed's file)

With a ``model`` axis in the topology the layer files carry DeepSpeed's suffix,
``layer_00-model_01-model_states.pt``. A layer gets a model file exactly when
DeepSpeed writes one (its forward function is an ``nn.Module``: a
``TiedLayerSpec`` with a ``forward_fn`` gets none), plus the first layer of a
tied key whose every layer has a ``forward_fn``. A tied module is saved once
per file-holding layer and restored on every stage that holds a copy, from the
first of its files; its optimizer state lives beside that first file.

Optimizer state is keyed by layer index and parameter name, never by position,
so a run saved with 4 stages resumes on 2 or 8 with its momentum and Adam
moments. Data-parallel replicas hold identical state: data-parallel rank 0 of
each stage writes the layer files. RNG states are restored only when the
topology is unchanged (a rank's stream has no meaning on another layout).

Atomicity: every rank writes into a hidden temporary directory; once every rank
reports success (a collective bounded by ``pipeline.timeout_s``) rank 0 writes
the manifest, renames the directory to ``tag`` and then replaces ``latest``
(write to a temporary file, ``os.replace``). A crash at any point leaves the
previous checkpoint loadable and ``latest`` naming it. Loading checks the
manifest and names any missing or torn file; it never loads part of a
checkpoint silently.

Limits: every rank must see ``save_dir`` (one machine, or a shared file
system), as for DeepSpeed's pipeline checkpoints. Re-saving an existing tag
moves the old directory aside and the new one into place in two renames; a
crash between them leaves that tag missing (``load_checkpoint`` then names it).
Files are read with ``torch.load(weights_only=False)``, as DeepSpeed reads
them: load checkpoints you trust. Tensor-parallel (``model`` axis) degrees
must match between save and load.

Export: :func:`export_checkpoint` writes one consolidated state dict (``.pt``
or ``.safetensors``) whose keys are those of
:func:`stagewise.models.reference.build_reference` (``"3.weight"``,
``"tied_modules.embed.wte.weight"``); :func:`import_state_dict` splits one back
into layer files that ``load_checkpoint(..., load_module_only=True)`` reads.
From the shell::

    stagewise export CKPT_DIR model.safetensors       # --tag TAG, default: latest
    stagewise export --split model.pt CKPT_DIR --tied embed=0,6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stagewise.dist_utils import wait_bounded
from stagewise.errors import CheckpointError
from stagewise.spec import LayerSpec, TiedLayerSpec

if TYPE_CHECKING:
    from stagewise.engine import PipelineEngine

__all__ = [
    "CheckpointError",
    "LayerTable",
    "export_checkpoint",
    "export_main",
    "import_state_dict",
    "layer_file_name",
    "load_checkpoint",
    "read_latest",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "stagewise-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINE_STATES = "engine_states.pt"
LATEST = "latest"
_LAYER_FILE = re.compile(r"^layer_(\d+)(?:-(.+?))?-model_states\.pt$")


# -- names and the layer table (pure) ----------------------------------------------------


def layer_file_name(layer_idx: int, kind: str = "model", rank_repr: str = "") -> str:
    """DeepSpeed's file name of a layer: ``layer_03-model_states.pt``.

    ``kind`` is ``"model"`` or ``"optim"``; ``rank_repr`` is the topology's
    ``get_rank_repr`` (``"model_01"`` with tensor parallelism, else empty).

    >>> layer_file_name(3)
    'layer_03-model_states.pt'
    >>> layer_file_name(12, "optim", "model_01")
    'layer_12-model_01-optim_states.pt'
    """
    name = f"layer_{layer_idx:02d}"
    if rank_repr:
        name += f"-{rank_repr}"
    return f"{name}-{kind}_states.pt"


def rank_file_name(rank: int) -> str:
    """The per-rank state file (RNG states, client state)."""
    return f"rank_{rank:03d}-states.pt"


def _has_module_file(spec: Any) -> bool:
    """DeepSpeed writes a layer file when the layer's forward function is an ``nn.Module``."""
    if isinstance(spec, TiedLayerSpec):
        return spec.forward_fn is None
    return isinstance(spec, (LayerSpec, nn.Module))


@dataclass
class LayerTable:
    """Which layers of a model get files, and where each tied module is stored.

    Attributes:
        num_layers: the number of layers of the model.
        module_files: indices of the layers that get a ``-model_states.pt`` file.
        tied: every tied key with the indices of its layers, in order.
        canonical: per tied key, the index whose files hold the module and its
            optimizer state (the first layer with a file).
    """

    num_layers: int
    module_files: list[int] = field(default_factory=list)
    tied: dict[str, list[int]] = field(default_factory=dict)
    canonical: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_specs(cls, specs: Sequence[Any]) -> LayerTable:
        """The table of a layer list as ``PipelineModule`` takes it."""
        table = cls(num_layers=len(specs))
        for idx, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                table.tied.setdefault(spec.key, []).append(idx)
        for key, indices in table.tied.items():
            with_file = [i for i in indices if _has_module_file(specs[i])]
            table.canonical[key] = with_file[0] if with_file else indices[0]
        canonical = set(table.canonical.values())
        table.module_files = [
            idx for idx, spec in enumerate(specs) if _has_module_file(spec) or idx in canonical
        ]
        return table

    @classmethod
    def from_tied(cls, tied: Mapping[str, Sequence[int]], num_layers: int) -> LayerTable:
        """A table that knows only the tied keys (each module filed at its first index)."""
        table = cls(num_layers=num_layers)
        for key, indices in tied.items():
            ordered = sorted(int(i) for i in indices)
            if not ordered:
                raise ValueError(f"tied key {key!r} has no layer indices")
            table.tied[key] = ordered
            table.canonical[key] = ordered[0]
        return table

    def tied_key(self, layer_idx: int) -> str | None:
        """The tied key of a layer, or None."""
        for key, indices in self.tied.items():
            if layer_idx in indices:
                return key
        return None

    def owner(self, layer_idx: int) -> int:
        """The index whose files hold this layer's weights' optimizer state."""
        key = self.tied_key(layer_idx)
        return self.canonical[key] if key is not None else layer_idx


# -- small file helpers -------------------------------------------------------------------


def _cpu_copy(value: Any) -> Any:
    """Tensors cloned to the CPU (compact storage); containers walked; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, _cpu_copy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_file(obj: Any, path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk before returning."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and move it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _load_file(path: str, what: str) -> Any:
    """``torch.load`` a checkpoint file on the CPU; a missing or unreadable file is named."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"{what}: cannot read {path} ({type(exc).__name__}: {exc}); the file is torn or "
            "corrupt: load an earlier checkpoint (pass tag=) or save again"
        ) from exc


def _check_tag(tag: str) -> None:
    if not tag or tag in (".", "..", LATEST) or tag.startswith(".") or "/" in tag or os.sep in tag:
        raise ValueError(
            f"checkpoint tag {tag!r} is not usable as a directory name; give a name without "
            "path separators that does not start with '.' and is not 'latest'"
        )


def read_latest(load_dir: str | os.PathLike[str]) -> str | None:
    """The tag named by ``load_dir/latest``, or None when there is no such file."""
    path = os.path.join(os.fspath(load_dir), LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        tag = handle.read().strip()
    if not tag:
        raise CheckpointError(f"{path} is empty; pass tag= to load_checkpoint")
    return tag


def _read_manifest(tag_dir: str) -> dict[str, Any] | None:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest: dict[str, Any] = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); the checkpoint is damaged") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a stagewise manifest (format={manifest.get('format')!r})"
        )
    return manifest


def _verify_manifest(tag_dir: str, manifest: Mapping[str, Any]) -> None:
    """Every file the manifest lists is there with its recorded size."""
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"checkpoint file {path} is missing (listed in {MANIFEST}); the checkpoint is "
                "incomplete: load an earlier tag or restore the file"
            )
        actual = os.path.getsize(path)
        if actual != int(size):
            raise CheckpointError(
                f"checkpoint file {path} has {actual} bytes but {MANIFEST} records {size}; "
                "the file is torn or was overwritten: load an earlier tag or save again"
            )


def _scan_files(tag_dir: str) -> dict[str, int]:
    return {
        name: os.path.getsize(os.path.join(tag_dir, name))
        for name in sorted(os.listdir(tag_dir))
        if os.path.isfile(os.path.join(tag_dir, name)) and name != MANIFEST
    }


def _write_manifest(
    tag_dir: str,
    tag: str,
    kind: str,
    table: LayerTable,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tag": tag,
        "kind": kind,
        "num_layers": table.num_layers,
        "tied": {key: list(indices) for key, indices in table.tied.items()},
        "files": _scan_files(tag_dir),
        "metadata": dict(metadata or {}),
    }
    _write_text_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def _commit_dir(tmp_dir: str, save_dir: str, tag: str, save_latest: bool) -> str:
    """Move a complete temporary directory to ``save_dir/tag``, then point ``latest`` at it."""
    final = os.path.join(save_dir, tag)
    old: str | None = None
    if os.path.exists(final):
        old = os.path.join(save_dir, f".{tag}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp_dir, final)
    _fsync_dir(save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for entry in os.listdir(save_dir):  # leftovers of earlier saves of this tag that died
        if entry.startswith(f".{tag}.tmp-"):
            shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
    if save_latest:
        _write_text_atomic(os.path.join(save_dir, LATEST), tag)
    return final


# -- collectives bounded in time ---------------------------------------------------------


def _timeout_s(engine: PipelineEngine) -> float:
    return float(engine.config.pipeline.timeout_s)


def _all_reduce(engine: PipelineEngine, tensor: torch.Tensor, op: Any, what: str) -> None:
    work = dist.all_reduce(tensor, op=op, async_op=True)
    hint = "a peer may have died or be stuck writing; the checkpoint was not committed"
    wait_bounded(work, _timeout_s(engine), f"rank {engine.global_rank}", what, hint)


def _agree(engine: PipelineEngine, tag: str) -> int:
    """Check every rank uses ``tag``; return a number rank 0 chose, the same everywhere."""
    digest = int.from_bytes(hashlib.sha1(tag.encode()).digest()[:7], "big")
    nonce = int.from_bytes(os.urandom(6), "big") if engine.global_rank == 0 else 0
    values = torch.tensor([digest, -digest, nonce], dtype=torch.int64, device=engine.device)
    _all_reduce(engine, values, dist.ReduceOp.MAX, f"agreeing on checkpoint tag {tag!r}")
    if int(values[0]) != digest or int(values[1]) != -digest:
        raise CheckpointError(
            f"rank {engine.global_rank} uses checkpoint tag {tag!r} but another rank uses a "
            "different one; every rank must pass the same tag (or none)"
        )
    return int(values[2])


def _vote(engine: PipelineEngine, failed: bool, what: str) -> list[int]:
    """Share whether each rank succeeded; return the ranks that failed."""
    flags = torch.zeros(engine.world_size, dtype=torch.int64, device=engine.device)
    flags[engine.global_rank] = int(failed)
    _all_reduce(engine, flags, dist.ReduceOp.SUM, what)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def _topology_info(engine: PipelineEngine) -> dict[str, Any]:
    topo = engine.grid.topology()
    axes = list(topo.get_axis_names())
    return {"axes": axes, "dims": [topo.get_dim(axis) for axis in axes]}


def _rank_repr(engine: PipelineEngine) -> str:
    return engine.grid.topology().get_rank_repr(rank=engine.global_rank)


# -- optimizer state by layer and parameter name -----------------------------------------


def _param_names(engine: PipelineEngine, table: LayerTable) -> dict[int, tuple[int, str]]:
    """``id(param) -> (owner layer index, name inside the layer module)`` for this rank."""
    module = engine.module
    where: dict[int, tuple[int, str]] = {}
    for idx in module.local_layer_ids():
        layer = module.layer_module(idx)
        if layer is None:
            continue
        owner = table.owner(idx)
        for name, param in layer.named_parameters():
            where.setdefault(id(param), (owner, name))
    return where


def _optimizer_layer_state(optimizer: Any, layer: nn.Module) -> dict[str, Any]:
    """The optimizer state of one layer's parameters, keyed by parameter name."""
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    params: dict[str, Any] = {}
    groups: dict[int, Any] = {}
    for name, param in layer.named_parameters():
        g = group_of.get(id(param))
        if g is None:
            continue
        params[name] = {"group": g, "state": _cpu_copy(dict(optimizer.state.get(param, {})))}
        groups[g] = {k: v for k, v in optimizer.param_groups[g].items() if k != "params"}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "optimizer": type(optimizer).__name__,
        "params": params,
        "param_groups": _cpu_copy(groups),
    }


def _load_optimizer(engine: PipelineEngine, table: LayerTable, tag_dir: str) -> None:
    optimizer = engine.optimizer
    where = _param_names(engine, table)
    suffix = _rank_repr(engine)
    files: dict[int, dict[str, Any]] = {}
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    next_id = 0
    for group in optimizer.param_groups:
        ids: list[int] = []
        hyper: dict[str, Any] | None = None
        for param in group["params"]:
            if id(param) not in where:
                raise CheckpointError(
                    f"the optimizer holds a parameter of shape {tuple(param.shape)} that belongs "
                    "to no layer of this stage; optimizer state is stored per layer, so build "
                    "the optimizer over module.parameters() (or pass load_optimizer_states=False)"
                )
            owner, name = where[id(param)]
            if owner not in files:
                path = os.path.join(tag_dir, layer_file_name(owner, "optim", suffix))
                data = _load_file(path, f"optimizer state of layer {owner}")
                saved_cls = data.get("optimizer")
                if saved_cls != type(optimizer).__name__:
                    raise CheckpointError(
                        f"{path} holds {saved_cls} state but the optimizer is "
                        f"{type(optimizer).__name__}; use the same optimizer or pass "
                        "load_optimizer_states=False"
                    )
                files[owner] = data
            entry = files[owner]["params"].get(name)
            if entry is None:
                raise CheckpointError(
                    f"{layer_file_name(owner, 'optim', suffix)} in {tag_dir} has no state for "
                    f"parameter {name!r} of layer {owner}; it was not optimized when saved: "
                    "pass load_optimizer_states=False"
                )
            if entry["state"]:
                state[next_id] = entry["state"]
            if hyper is None:
                hyper = files[owner]["param_groups"][entry["group"]]
            ids.append(next_id)
            next_id += 1
        merged = {k: v for k, v in group.items() if k != "params"}
        merged.update(hyper or {})
        merged["params"] = ids
        groups.append(merged)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- RNG ---------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- save --------------------------------------------------------------------------------


def _write_rank_files(
    engine: PipelineEngine,
    tmp_dir: str,
    table: LayerTable,
    client_state: Mapping[str, Any],
) -> None:
    """This rank's share of a checkpoint: its layers (data-parallel rank 0), its own state."""
    module = engine.module
    suffix = _rank_repr(engine)
    optimizer = engine.optimizer
    if engine.grid.get_data_parallel_rank() == 0:
        for idx in module.local_layer_ids():
            if idx not in table.module_files:
                continue
            layer = module.layer_module(idx)
            if layer is None:
                continue
            _save_file(
                _cpu_copy(layer.state_dict()),
                os.path.join(tmp_dir, layer_file_name(idx, "model", suffix)),
            )
            has_params = any(True for _ in layer.parameters())
            if optimizer is not None and table.owner(idx) == idx and has_params:
                _save_file(
                    _optimizer_layer_state(optimizer, layer),
                    os.path.join(tmp_dir, layer_file_name(idx, "optim", suffix)),
                )
    if engine.global_rank == 0:
        scheduler = engine.lr_scheduler
        scaler = engine.loss_scaler
        engine_states = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loss_scaler": scaler.state_dict() if scaler is not None else None,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "topology": _topology_info(engine),
            "num_layers": table.num_layers,
            "parts": list(module.parts),
            "client_state": dict(client_state),
        }
        _save_file(engine_states, os.path.join(tmp_dir, ENGINE_STATES))
    rank_states = {
        "format": FORMAT,
        "rank": engine.global_rank,
        "topology": _topology_info(engine),
        "rng": _rng_state(engine.device),
        "client_state": dict(client_state),
    }
    _save_file(rank_states, os.path.join(tmp_dir, rank_file_name(engine.global_rank)))


def save_checkpoint(
    engine: PipelineEngine,
    save_dir: str | os.PathLike[str],
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    save_latest: bool = True,
) -> bool:
    """Save ``engine``'s model, optimizer and training state under ``save_dir/tag``.

    Every rank must call it (as in DeepSpeed). ``tag`` defaults to
    ``global_step{engine.global_steps}``. The files appear together or not at
    all: each rank writes into a temporary directory, and rank 0 renames it to
    ``tag`` once every rank has finished, then updates ``latest`` (when
    ``save_latest``). Re-saving an existing tag replaces it.

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
    tag = f"global_step{engine.global_steps}" if tag is None else str(tag)
    _check_tag(tag)
    table = LayerTable.from_specs(engine.module.layer_specs)
    nonce = _agree(engine, tag)
    tmp_dir = os.path.join(save_path, f".{tag}.tmp-{nonce:012x}")

    error: BaseException | None = None
    try:
        os.makedirs(tmp_dir, exist_ok=True)
        _write_rank_files(engine, tmp_dir, table, client_state or {})
    except Exception as exc:
        error = exc
    failed = _vote(engine, error is not None, f"waiting for every rank to write {tag!r}")
    if failed:
        if engine.global_rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if error is not None:
            raise CheckpointError(
                f"rank {engine.global_rank} could not write checkpoint {tag!r} in {save_path}: "
                f"{type(error).__name__}: {error}"
            ) from error
        raise CheckpointError(
            f"checkpoint {tag!r} in {save_path} was not saved: rank(s) {failed} failed to write "
            "their files (see their errors); the previous checkpoint is unchanged"
        )

    final = os.path.join(save_path, tag)
    if engine.global_rank == 0:
        try:
            _write_manifest(tmp_dir, tag, "full", table, engine.module.checkpoint_metadata)
            _commit_dir(tmp_dir, save_path, tag, save_latest)
        except Exception as exc:
            error = exc
    failed = _vote(engine, error is not None, f"committing checkpoint {tag!r}")
    if failed:
        if error is not None:
            raise CheckpointError(
                f"could not commit checkpoint {tag!r} in {save_path}: {type(error).__name__}: "
                f"{error}"
            ) from error
        raise CheckpointError(
            f"rank 0 could not commit checkpoint {tag!r} in {save_path} (see its error)"
        )
    if engine.global_rank == 0:
        logger.info("saved checkpoint %s", final)
    return True


# -- load --------------------------------------------------------------------------------


def _load_module(engine: PipelineEngine, table: LayerTable, tag_dir: str, strict: bool) -> None:
    module = engine.module
    specs = module.layer_specs
    suffix = _rank_repr(engine)
    done: set[str] = set()
    for idx in module.local_layer_ids():
        layer = module.layer_module(idx)
        if layer is None:
            continue
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
                f"saved from the same layer list? ({len(specs)} layers here)"
            )
        state = _load_file(path, f"weights of {what}")
        try:
            layer.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path} does not fit {what}: {exc}; check the layer list (or pass "
                "load_module_strict=False to skip missing and unexpected keys)"
            ) from exc


def _load_engine_state(
    engine: PipelineEngine,
    table: LayerTable,
    tag_dir: str,
    load_optimizer_states: bool,
    load_lr_scheduler_states: bool,
) -> dict[str, Any]:
    """Counters, scheduler, loss scale, optimizer and (same layout only) RNG; the client state."""
    states = _load_file(os.path.join(tag_dir, ENGINE_STATES), "engine state")
    if states.get("num_layers") != table.num_layers:
        raise CheckpointError(
            f"{tag_dir} was saved from a model of {states.get('num_layers')} layers but this "
            f"one has {table.num_layers}; build the PipelineModule from the same layer list"
        )
    engine.global_steps = int(states["global_steps"])
    engine.global_samples = int(states["global_samples"])
    engine.skipped_steps = int(states["skipped_steps"])
    if engine.loss_scaler is not None and states.get("loss_scaler") is not None:
        engine.loss_scaler.load_state_dict(states["loss_scaler"])
    if load_optimizer_states and engine.optimizer is not None:
        _load_optimizer(engine, table, tag_dir)
    if (
        load_lr_scheduler_states
        and engine.lr_scheduler is not None
        and states.get("lr_scheduler") is not None
    ):
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    client_state: dict[str, Any] = dict(states.get("client_state") or {})
    if states.get("topology") == _topology_info(engine):
        mine = _load_file(
            os.path.join(tag_dir, rank_file_name(engine.global_rank)), "this rank's RNG state"
        )
        _set_rng_state(mine["rng"], engine.device)
        client_state = dict(mine.get("client_state") or {})
    elif engine.global_rank == 0:
        logger.warning(
            "%s was saved with topology %s, now %s: RNG states are not restored (a rank's "
            "random stream is only meaningful on the same layout)",
            tag_dir,
            states.get("topology"),
            _topology_info(engine),
        )
    return client_state


def load_checkpoint(
    engine: PipelineEngine,
    load_dir: str | os.PathLike[str],
    tag: str | None = None,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
) -> tuple[str | None, dict[str, Any] | None]:
    """Load a checkpoint saved with any number of stages (or DeepSpeed's layer files).

    Every rank must call it. With ``tag=None`` the tag is read from
    ``load_dir/latest``; when that file does not exist this returns
    ``(None, None)`` and logs a warning, as DeepSpeed does (so a script can
    resume when a checkpoint is there and start afresh otherwise).

    ``load_module_only=True`` loads the layer weights alone: this is how
    checkpoints written by DeepSpeed or :func:`import_state_dict` are read.

    Returns:
        ``(path of the tag directory, client_state)``.

    Raises:
        CheckpointError: naming the file when one is missing, torn or does not fit;
            every rank raises when any rank failed, so no rank trains on a half load.
    """
    load_path = os.fspath(load_dir)
    if tag is None:
        tag = read_latest(load_path)
        if tag is None:
            if engine.global_rank == 0:
                logger.warning(
                    "no %s file in %s: nothing loaded; pass tag= to load a given checkpoint",
                    LATEST,
                    load_path,
                )
            return None, None
    tag = str(tag)
    _agree(engine, tag)
    tag_dir = os.path.join(load_path, tag)
    table = LayerTable.from_specs(engine.module.layer_specs)
    error: BaseException | None = None
    client_state: dict[str, Any] = {}
    try:
        if not os.path.isdir(tag_dir):
            raise CheckpointError(
                f"checkpoint directory {tag_dir} does not exist; check load_dir and tag"
            )
        manifest = _read_manifest(tag_dir)
        if manifest is not None:
            _verify_manifest(tag_dir, manifest)
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
        _load_module(engine, table, tag_dir, load_module_strict)
        if not load_module_only:
            client_state = _load_engine_state(
                engine, table, tag_dir, load_optimizer_states, load_lr_scheduler_states
            )
        elif os.path.isfile(os.path.join(tag_dir, ENGINE_STATES)):
            states = _load_file(os.path.join(tag_dir, ENGINE_STATES), "engine state")
            client_state = dict(states.get("client_state") or {})
    except Exception as exc:
        error = exc
    failed = _vote(engine, error is not None, f"loading checkpoint {tag_dir}")
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"loading {tag_dir} failed on rank(s) {failed} (see their errors); this rank's "
            "state is partly loaded: do not train on it"
        )
    if engine.global_rank == 0:
        logger.info("loaded checkpoint %s", tag_dir)
    return tag_dir, client_state


# -- export and import (one process, no process group) -----------------------------------


def _resolve_tag_dir(path: str, tag: str | None) -> str:
    """A tag directory from a save directory (with ``latest`` or ``tag``) or a tag directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if tag is not None:
        tag_dir = os.path.join(path, tag)
    elif any(_LAYER_FILE.match(n) for n in os.listdir(path)) or os.path.isfile(
        os.path.join(path, MANIFEST)
    ):
        tag_dir = path
    else:
        latest = read_latest(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds no layer files and no {LATEST} file; give a checkpoint's tag "
                "directory or its save directory"
            )
        tag_dir = os.path.join(path, latest)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"checkpoint directory {tag_dir} does not exist")
    return tag_dir


def _tied_table(
    layers: Sequence[Any] | None, tied: Mapping[str, Sequence[int]] | None, num_layers: int
) -> LayerTable:
    if layers is not None and tied is not None:
        raise ValueError("give layers= or tied=, not both")
    if layers is not None:
        return LayerTable.from_specs(layers)
    return LayerTable.from_tied(tied or {}, num_layers)


def export_checkpoint(
    ckpt_dir_or_tag_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    tag: str | None = None,
    layers: Sequence[Any] | None = None,
    tied: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """Write a checkpoint's weights as one state dict with ``build_reference``'s keys.

    Args:
        ckpt_dir_or_tag_dir: a save directory (its ``latest``, or ``tag``) or a tag
            directory.
        out_path: ``*.safetensors`` (needs the ``safetensors`` package) or any other
            name for ``torch.save``.
        tag: the tag to export from a save directory (default: ``latest``).
        layers, tied: where the checkpoint has no manifest (DeepSpeed's), the layer
            list or ``{key: [layer indices]}`` telling which files hold tied modules;
            without them every file is exported as a plain layer.

    Returns:
        ``out_path``. Keys read ``"{idx}.{param}"`` and ``"tied_modules.{key}.{param}"``.
    """
    tag_dir = _resolve_tag_dir(os.fspath(ckpt_dir_or_tag_dir), tag)
    manifest = _read_manifest(tag_dir)
    if manifest is not None:
        _verify_manifest(tag_dir, manifest)
    files: dict[int, str] = {}
    for name in sorted(os.listdir(tag_dir)):
        match = _LAYER_FILE.match(name)
        if match is None:
            continue
        if match.group(2):
            raise CheckpointError(
                f"{tag_dir} holds model-parallel shards ({name}); exporting one state dict "
                "from tensor-parallel shards is not supported"
            )
        files[int(match.group(1))] = os.path.join(tag_dir, name)
    if not files:
        raise CheckpointError(f"{tag_dir} holds no layer_*-model_states.pt files")
    if manifest is not None and layers is None and tied is None:
        table = LayerTable.from_tied(manifest.get("tied", {}), int(manifest["num_layers"]))
    else:
        if layers is None and tied is None:
            logger.warning(
                "%s has no %s: tied modules cannot be recognised and are exported as plain "
                "layers; pass layers= (or --tied KEY=INDEX) to name them",
                tag_dir,
                MANIFEST,
            )
        table = _tied_table(layers, tied, max(files) + 1)
    state: dict[str, torch.Tensor] = {}
    exported: set[str] = set()
    for idx in sorted(files):
        key = table.tied_key(idx)
        if key is not None and key in exported:
            continue
        prefix = f"tied_modules.{key}." if key is not None else f"{idx}."
        layer_state = _load_file(files[idx], f"weights of layer {idx}")
        for name, value in layer_state.items():
            if isinstance(value, torch.Tensor):
                state[prefix + name] = value
        if key is not None:
            exported.add(key)
    out = os.fspath(out_path)
    _write_state_dict(state, out)
    return out


def _write_state_dict(state: Mapping[str, torch.Tensor], out: str) -> None:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    if out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError as exc:
            raise ImportError(
                f"writing {out} needs the safetensors package (pip install safetensors); or "
                "give a .pt name"
            ) from exc
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
            tmp,
            metadata={"format": "pt"},
        )
    else:
        _save_file({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    os.replace(tmp, out)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"state dict {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot read state dict {path} ({type(exc).__name__}: {exc}); the file is torn "
            "or not a state dict"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return dict(state)


_PLAIN_KEY = re.compile(r"^(\d+)\.(.+)$")
_TIED_KEY = re.compile(r"^tied_modules\.([^.]+)\.(.+)$")


def import_state_dict(
    state_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tag: str = "global_step0",
    layers: Sequence[Any] | None = None,
    tied: Mapping[str, Sequence[int]] | None = None,
    save_latest: bool = True,
) -> str:
    """Split a consolidated state dict into layer files a pipeline can start from.

    The inverse of :func:`export_checkpoint`: keys ``"{idx}.{param}"`` go to
    ``layer_{idx:02d}-model_states.pt`` and ``"tied_modules.{key}.{param}"`` to
    the files of the key's layers, which ``layers`` (the layer list) or ``tied``
    (``{key: [layer indices]}``) tell. Read it with
    ``engine.load_checkpoint(out_dir, load_module_only=True)``.

    Returns:
        The tag directory written (atomically; ``latest`` names it when ``save_latest``).
    """
    _check_tag(tag)
    state = _read_state_dict(os.fspath(state_path))
    plain: dict[int, dict[str, torch.Tensor]] = {}
    tied_states: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        match = _PLAIN_KEY.match(name)
        if match is not None:
            plain.setdefault(int(match.group(1)), {})[match.group(2)] = value
            continue
        match = _TIED_KEY.match(name)
        if match is not None:
            tied_states.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        raise CheckpointError(
            f"key {name!r} of {os.fspath(state_path)} is neither '<layer index>.<name>' nor "
            "'tied_modules.<key>.<name>'; export the model built by build_reference"
        )
    top = max([*plain, *(i for ids in (tied or {}).values() for i in ids), -1]) + 1
    table = _tied_table(layers, tied, top)
    missing = sorted(set(tied_states) - set(table.tied))
    if missing:
        raise CheckpointError(
            f"tied module(s) {missing} in {os.fspath(state_path)} have no layer indices; pass "
            "layers=<the layer list> (or --tied KEY=INDEX,...) to place them"
        )
    for key, indices in table.tied.items():
        clash = sorted(set(indices) & set(plain))
        if clash:
            raise CheckpointError(
                f"{os.fspath(state_path)} has plain weights for layer(s) {clash}, which tie "
                f"module {key!r}; a layer is either plain ('{clash[0]}.<name>') or tied "
                f"('tied_modules.{key}.<name>'), so check the tied layer indices"
            )
    out_path = os.fspath(out_dir)
    os.makedirs(out_path, exist_ok=True)
    tmp_dir = os.path.join(out_path, f".{tag}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    for idx, layer_state in sorted(plain.items()):
        if idx >= table.num_layers:
            raise CheckpointError(
                f"{os.fspath(state_path)} has weights for layer {idx} but the layer list has "
                f"{table.num_layers} layers"
            )
        _save_file(layer_state, os.path.join(tmp_dir, layer_file_name(idx)))
    for key, layer_state in tied_states.items():
        indices = [i for i in table.tied[key] if i in table.module_files] or [table.canonical[key]]
        for idx in indices:
            _save_file(layer_state, os.path.join(tmp_dir, layer_file_name(idx)))
    _write_manifest(tmp_dir, tag, "module", table)
    return _commit_dir(tmp_dir, out_path, tag, save_latest)


# -- the `stagewise export` command -------------------------------------------------------


def _tied_arg(text: str) -> tuple[str, list[int]]:
    key, sep, rest = text.partition("=")
    try:
        indices = [int(i) for i in rest.split(",") if i.strip()]
    except ValueError:
        indices = []
    if not sep or not key or not indices:
        raise argparse.ArgumentTypeError(
            f"expected KEY=INDEX[,INDEX...], e.g. embed=0,6, got {text!r}"
        )
    return key, indices


def build_export_parser(prog: str = "stagewise export") -> argparse.ArgumentParser:
    """The argument parser of ``stagewise export``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Write a checkpoint's weights as one consolidated state dict (.pt or "
            ".safetensors) with the keys of a one-process model, or with --split turn such "
            "a state dict into layer files a pipeline loads with load_module_only=True."
        ),
    )
    parser.add_argument(
        "source", help="checkpoint (save or tag directory); with --split a state dict"
    )
    parser.add_argument("out", help="the state dict to write; with --split the save directory")
    parser.add_argument(
        "--split", action="store_true", help="split a consolidated state dict into layer files"
    )
    parser.add_argument(
        "--tag",
        help="the checkpoint to export (default: latest); with --split the tag to write "
        "(default: global_step0)",
    )
    parser.add_argument(
        "--tied",
        action="append",
        type=_tied_arg,
        default=[],
        metavar="KEY=INDEX[,INDEX...]",
        help="the layers of a tied module (needed by --split, and to export a checkpoint "
        "without a manifest, e.g. DeepSpeed's); repeat per key",
    )
    return parser


def export_main(argv: Sequence[str] | None = None) -> int:
    """Run ``stagewise export`` with ``argv``; return the exit status."""
    parser = build_export_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    tied = dict(args.tied) or None
    try:
        if args.split:
            written = import_state_dict(
                args.source, args.out, tag=args.tag or "global_step0", tied=tied
            )
            print(f"layer files written to {written}")
        else:
            written = export_checkpoint(args.source, args.out, tag=args.tag, tied=tied)
            print(f"state dict written to {written}")
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        print(f"stagewise export: {error}", file=sys.stderr)
        return 1
    return 0
