"""Checkpoint layout: file names, the layer table and the manifest (pure, no process group).

On disk (``save_dir/tag/``, ``tag`` defaulting to DeepSpeed's ``global_step{N}``)::

    layer_00-model_states.pt      a layer's state dict, DeepSpeed's name and format
    layer_00-optim_states.pt      the optimizer state of that layer's parameters, by name
    engine_states.pt              global: step counters, scheduler, loss scale, topology
    rank_000-states.pt            per rank: RNG states of Python, NumPy and torch, client state
    manifest.json                 every file of the checkpoint with its size and SHA-256,
                                  the tied keys and the module's metadata
    ../latest                     the newest tag (DeepSpeed's file)

With a ``model`` axis in the topology the layer files carry DeepSpeed's suffix,
``layer_00-model_01-model_states.pt``. A layer gets a model file exactly when
DeepSpeed writes one (its forward function is an ``nn.Module``: a
``TiedLayerSpec`` with a ``forward_fn`` gets none), plus the first layer of a
tied key whose every layer has a ``forward_fn``. A tied module is saved once
per file-holding layer and restored on every stage that holds a copy, from the
first of its files; its optimizer state lives beside that first file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from stagewise.checkpoint.files import LATEST, MANIFEST, file_digest, write_text_atomic
from stagewise.errors import CheckpointError
from stagewise.spec import LayerSpec, TiedLayerSpec

__all__ = [
    "ENGINE_STATES",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "LAYER_FILE",
    "MANIFEST",
    "LayerTable",
    "check_tag",
    "digests_file_name",
    "layer_file_name",
    "rank_file_name",
    "read_latest",
    "read_manifest",
    "verify_manifest",
    "write_manifest",
]

FORMAT = "stagewise-checkpoint"
FORMAT_VERSION = 1
ENGINE_STATES = "engine_states.pt"
LAYER_FILE = re.compile(r"^layer_(\d+)(?:-(.+?))?-model_states\.pt$")


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


def digests_file_name(rank: int) -> str:
    """The hidden file in which a rank leaves its files' hashes for rank 0's manifest."""
    return f".digests-{rank:05d}.json"


_DIGESTS_FILE = re.compile(r"^\.digests-\d+\.json$")


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


# -- tags, `latest` and the manifest ------------------------------------------------------


def check_tag(tag: str) -> None:
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


def read_manifest(tag_dir: str) -> dict[str, Any] | None:
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


def verify_manifest(tag_dir: str, manifest: Mapping[str, Any]) -> None:
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
        if os.path.isfile(os.path.join(tag_dir, name))
        and name != MANIFEST
        and not _DIGESTS_FILE.match(name)
    }


def _collect_digests(tag_dir: str, names: Sequence[str]) -> dict[str, str]:
    """The hashes the ranks left in ``tag_dir`` (removing their files); the rest computed."""
    digests: dict[str, str] = {}
    for name in sorted(os.listdir(tag_dir)):
        if _DIGESTS_FILE.match(name):
            path = os.path.join(tag_dir, name)
            with open(path, encoding="utf-8") as handle:
                digests.update(json.load(handle))
            os.remove(path)
    return {name: digests.get(name) or file_digest(os.path.join(tag_dir, name)) for name in names}


def write_manifest(
    tag_dir: str,
    tag: str,
    kind: str,
    table: LayerTable,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``manifest.json``: every file of ``tag_dir`` with its size and SHA-256 (from
    the ranks' digest files, else computed here), the tied keys, and the module's
    JSON-able ``metadata`` (``PipelineModule.checkpoint_metadata``)."""
    files = _scan_files(tag_dir)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tag": tag,
        "kind": kind,
        "num_layers": table.num_layers,
        "tied": {key: list(indices) for key, indices in table.tied.items()},
        "metadata": dict(metadata or {}),
        "files": files,
        "sha256": _collect_digests(tag_dir, list(files)),
    }
    write_text_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
